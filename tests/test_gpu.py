"""GPU tests, run through the device tool (`python -m pytest -m gpu tests/test_gpu.py`); skipped on CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from tests.conftest import REPO, dsrun, read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                 reason="needs a CUDA GPU: run through the device tool")]

# a small real shape: R1-Distill-Qwen-1.5B's width, 4 of its 28 layers, bf16, FSDP2
SMALL = ["hardware=auto", "hardware.devices=1", "model=r1_distill_qwen_1_5b", "model.fields.num_hidden_layers=4",
         "data=synthetic_tokens", "train.seq_len=1024", "train.micro_batch=2", "precision=bf16", "parallel=fsdp",
         "monitor=none", "train.log_every=1", "train.max_steps=12", "train.lr=1e-4", "optim.warmup_steps=2"]


def test_fsdp_bf16_interrupt_and_resume_matches_within_1e3(tmp_path):
    full = dsrun(*SMALL, "train.checkpoint_every=-1", run_dir=tmp_path / "full", timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    reference = [row["loss"] for row in read_metrics(tmp_path / "full")]
    run_dir = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "dsrun", *SMALL, "train.checkpoint_every=0",
                             f"hydra.run.dir={run_dir}"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    while not ((run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    resumed = dsrun("resume", str(run_dir), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = [row["loss"] for row in read_metrics(run_dir)]
    assert got == pytest.approx(reference, rel=1e-3)
    print("losses", json.dumps({"reference": reference, "resumed": got}))


def test_prometheus_exporter_reports_real_nvml_values_during_training(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dsrun", *SMALL, "train.max_steps=60", "parallel=single",
                             "train.checkpoint_every=-1", "monitor=[prometheus]", "monitor.prometheus.port=0",
                             f"hydra.run.dir={run_dir}"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stderr:
        if "prometheus metrics on" in line:
            url = line.split(" on ")[1].strip()
            break
    assert url, "the exporter printed its address"
    best = {}
    while proc.poll() is None:
        try:
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            break
        for line in text.splitlines():
            if line.startswith("dsrun_gpu_"):
                name, value = line.rsplit(" ", 1)
                best[name] = max(best.get(name, 0.0), float(value))
        time.sleep(0.5)
    proc.wait(timeout=300)
    print("nvml", json.dumps(best))
    util = [v for k, v in best.items() if k.startswith("dsrun_gpu_utilization_ratio")]
    assert util and max(util) > 0, best
    assert any(k.startswith("dsrun_gpu_memory_used_bytes") and v > 2**30 for k, v in best.items()), best
    assert any(k.startswith("dsrun_gpu_temperature_celsius") and v > 0 for k, v in best.items()), best


@pytest.mark.parametrize("model", ["tiny_qwen2", "tiny"])
def test_varlen_flash_kernel_matches_transformers_packed_sdpa_in_bf16(model):
    """The CUDA path of dsrun/attention.py (torch.nn.attention.varlen flash kernel, no mask) against
    transformers' own packed-sequence SDPA mask: same loss and gradients within bf16 tolerance."""
    from hydra import compose, initialize_config_dir

    from dsrun import attention
    from dsrun.schema import register_configs
    from dsrun.loss import attach_chunked_loss
    from dsrun.model import architecture, build_model
    from tests.test_finetune import _packed_batch

    if attention._varlen() is None:  # noqa: SLF001
        pytest.skip("this torch has no torch.nn.attention.varlen")
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hardware=cpu", f"model={model}"])
    device = torch.device("cuda")
    ids, positions = _packed_batch()
    nets = [attach_chunked_loss(build_model(cfg.model, architecture(cfg.model), seed=0)).to(device, torch.bfloat16)
            for _ in range(2)]
    attention.use_varlen_attention(nets[1])
    kernel_calls, flash = [], attention._flash

    def spy(*args):
        out = flash(*args)
        kernel_calls.append(out is not None)
        return out

    attention._flash = spy
    try:
        ours, _ = nets[1](input_ids=ids.to(device), labels=ids.to(device),
                          **attention.batch_kwargs(positions, device))
    finally:
        attention._flash = flash
    reference, _ = nets[0](input_ids=ids.to(device), labels=ids.to(device), position_ids=positions.to(device))
    # MLA's narrower value head runs the kernel only where torch's varlen takes it (the SDPA fallback otherwise)
    assert kernel_calls and (all(kernel_calls) or model == "tiny"), kernel_calls
    torch.testing.assert_close(ours.float(), reference.float(), rtol=2e-2, atol=1e-2)
    ours.backward()
    reference.backward()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(b.grad.float(), a.grad.float(), rtol=5e-2, atol=5e-3, msg=name)


def test_qlora_with_the_embedding_in_host_memory_matches_it_on_the_gpu_and_holds_less(tmp_path):
    """parallel.offload_embedding on CUDA (pinned rows, non-blocking copies): the same losses as the table on
    the GPU, with less memory held."""
    job = [*SMALL, "parallel=single", "quant=nf4", "adapter=lora", "train.max_steps=6", "train.checkpoint_every=-1"]
    rows, peaks = {}, {}
    for offload in ("false", "true"):
        proc = dsrun(*job, f"parallel.offload_embedding={offload}", run_dir=tmp_path / offload, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[offload] = [row["loss"] for row in read_metrics(tmp_path / offload)]
        peaks[offload] = max(row["peak_allocated_gib"] for row in read_metrics(tmp_path / offload))
    print("losses", json.dumps(rows), "peaks", json.dumps(peaks))
    assert rows["true"] == pytest.approx(rows["false"], rel=1e-3)
    table_gib = 151_936 * 1536 * 2 / 2**30  # the 1.5B shape's bf16 input embedding
    assert peaks["false"] - peaks["true"] > 0.8 * table_gib, peaks
