"""Registries hold facts (issue #29): a strategy and a quant method added from outside the package — one record and
one YAML each, nothing else touched — are honoured by validation, the planner's memory and speed, and a CPU run.

The twins copy an existing entry's facts under a new name (the quant twin with half the matmul speed), so every
answer can be compared with the original's: the code must read the records, not the names."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dsrun.config import validate
from dsrun.schema import register_configs
from dsrun.constants import CONF_DIR
from dsrun.errors import ConfigError
from dsrun.hardware import gpu_catalog
from dsrun.plan import plan
from dsrun.quantize import QUANT_METHODS
from dsrun.resolve import resolve
from dsrun.strategy import STRATEGIES
from tests.conftest import FAST, REPO, read_metrics, small_vocabulary

# what a user's own module adds: one record each (run before dsrun starts)
REGISTER = """
import dataclasses
from dsrun.quantize import QUANT_METHODS
from dsrun.strategy import STRATEGIES

STRATEGIES["fsdp_twin"] = dataclasses.replace(STRATEGIES["fsdp"])
QUANT_METHODS["nf4_twin"] = dataclasses.replace(QUANT_METHODS["nf4"], compute_efficiency=0.2)
"""
LAUNCH = "import sys; import register; from dsrun.cli import entry; entry()\n"


@pytest.fixture
def extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The YAML of each (in a config folder added to Hydra's search path), the records (here, and in a module a
    launcher imports before dsrun's entry point: Fabric's second rank runs the launcher again)."""
    for group, source, name in (("parallel", "fsdp", "fsdp_twin"), ("quant", "nf4", "nf4_twin")):
        text = (CONF_DIR / group / f"{source}.yaml").read_text()
        folder = tmp_path / "conf" / group
        folder.mkdir(parents=True)
        (folder / f"{name}.yaml").write_text(text.replace(f"name: {source}", f"name: {name}")
                                             .replace(f"strategy: {source}", f"strategy: {name}")
                                             .replace(f"method: {source}", f"method: {name}"))
    (tmp_path / "register.py").write_text(REGISTER)
    (tmp_path / "launch.py").write_text(LAUNCH)
    monkeypatch.setitem(STRATEGIES, "fsdp_twin", dataclasses.replace(STRATEGIES["fsdp"]))
    monkeypatch.setitem(QUANT_METHODS, "nf4_twin", dataclasses.replace(QUANT_METHODS["nf4"], compute_efficiency=0.2))
    return tmp_path


def composed(extension: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"hydra.searchpath=[file://{extension / 'conf'}]"])
    resolve(cfg)
    validate(cfg, gpu_catalog())
    return cfg


def problems(extension: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        composed(extension, *overrides)
    return "\n".join(caught.value.problems)


def test_validation_treats_each_twin_as_its_original(extension):
    for strategy in ("fsdp", "fsdp_twin"):  # a quantized base cannot be sharded: the record says it shards weights
        assert "use parallel=ddp" in problems(extension, "hardware=cpu", "hardware.devices=2", f"parallel={strategy}",
                                              "quant=nf4", "adapter=lora")
    for quant in ("nf4", "nf4_twin"):  # quantized weights train only under adapters
        assert "add adapter=lora" in problems(extension, "hardware=cpu", f"quant={quant}", "adapter=none")
    composed(extension, "hardware=cpu", "hardware.devices=2", "parallel=fsdp_twin")  # and accepts what it runs


def test_the_planner_counts_the_twins_from_their_records(extension):
    job = ("task=plan", "hardware=4x4060", "model=r1_distill_qwen_7b", "adapter=lora", "train.seq_len=1024")
    sharded = {name: plan(composed(extension, *job, f"parallel={name}")) for name in ("fsdp", "fsdp_twin")}
    assert sharded["fsdp_twin"].components == sharded["fsdp"].components
    assert sharded["fsdp_twin"].tokens_per_s == pytest.approx(sharded["fsdp"].tokens_per_s)
    one = ("task=plan", "hardware=1x4060", "model=r1_distill_qwen_7b", "adapter=lora", "train.seq_len=1024")
    quantized = {name: plan(composed(extension, *one, f"quant={name}")) for name in ("nf4", "nf4_twin")}
    assert quantized["nf4_twin"].components == quantized["nf4"].components  # the same bytes per weight
    # half the matmul speed (compute_efficiency 0.2 against nf4's 0.4): a slower step, read from the record
    assert quantized["nf4_twin"].step_time_s > 1.3 * quantized["nf4"].step_time_s, quantized


@pytest.mark.slow
def test_cpu_runs_under_the_twins(extension, tmp_path):
    """Two ranks under the strategy twin (FSDP2's sharded checkpoint), then a QLoRA step on the quant twin: what
    the originals do, under names only the records know."""
    env = {**os.environ, "PYTHONPATH": f"{extension}{os.pathsep}{REPO}"}
    common = [*FAST, *small_vocabulary(), "train.max_steps=2", "train.seq_len=32", "train.micro_batch=2",
              f"hydra.searchpath=[file://{extension / 'conf'}]"]
    for name, extra in (("strategy", ["parallel=fsdp_twin", "hardware.devices=2", "train.checkpoint_every=2"]),
                        ("quant", ["quant=nf4_twin", "adapter=lora"])):
        run = tmp_path / name
        proc = subprocess.run([sys.executable, str(extension / "launch.py"), *common, *extra, f"hydra.run.dir={run}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = read_metrics(run)
        assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
        if name == "strategy":  # two ranks, each saving its shard of FSDP2's distributed checkpoint
            checkpoint = run / "checkpoints" / "step-00000002"
            assert {p.name for p in checkpoint.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
            assert len(list((checkpoint / "state").glob("*.distcp"))) == 2
        else:
            assert "nf4_twin" in (run / "config.yaml").read_text()
