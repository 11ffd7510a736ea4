"""`dsrun doctor`: a real run on this CPU machine (no GPU, Gloo all-reduce between 2 local processes), the same
across two network-namespace "nodes" under torchrun, the judge fed a fake NVML reading, the planner reading the
saved bandwidth, and GPU checks for the device machine (docs/doctor.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from dsrun.config import validate
from dsrun.schema import register_configs
from dsrun.doctor.checks import ifname_missing, judge
from dsrun.hardware import gpu_catalog
from dsrun.plan import plan
from dsrun.resolve import resolve
from tests.conftest import REPO, dsrun
from tests.test_multinode import veth_pair  # noqa: F401 (the two-host fixture)


SMALL = ["doctor.json=true", "doctor.max_bytes=65536", "doctor.iterations=5"]  # 8 B, x4 to 32 KiB, 64 KiB


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    resolve(cfg)
    validate(cfg, gpu_catalog())
    return cfg


def assert_swept(result: dict, ranks: int, nodes: int) -> None:
    assert (result["backend"], result["ranks"], result["nodes"]) == ("gloo", ranks, nodes), result
    sizes = [row["bytes"] for row in result["rows"]]
    assert sizes == sorted(sizes) and len(sizes) == 8 and (sizes[0], sizes[-1]) == (8, 65536)
    assert all(row["busbw_gbs"] > 0 and row["time_us"] > 0 for row in result["rows"])
    for row in result["rows"]:  # nccl-tests' definition: busbw = algbw x 2(n-1)/n
        assert row["busbw_gbs"] == pytest.approx(row["algbw_gbs"] * 2 * (ranks - 1) / ranks)
    assert result["bus_bandwidth_gbs"] == result["rows"][-1]["busbw_gbs"]


def test_doctor_on_a_cpu_machine_reports_no_gpu_and_measures_gloo(tmp_path, monkeypatch):
    saved = tmp_path / "saved"
    proc = dsrun("doctor", *SMALL, run_dir=tmp_path / "run", env={"DSRUN_DOCTOR_DIR": str(saved)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads((tmp_path / "run" / "doctor.json").read_text())
    assert report["gpus"] == [] and report["cuda"]["devices"] == 0
    assert not [f for f in report["findings"] if f["topic"] == "gpu"]
    assert report["software"]["torch"]["version"] == torch.__version__
    assert_swept(report["allreduce"], ranks=2, nodes=1)
    assert report["gradient_sync"]["model"] == "tiny" and report["gradient_sync"]["seconds"] > 0
    # the planner now plans this box's CPU processes with the measured bandwidth
    monkeypatch.setenv("DSRUN_DOCTOR_DIR", str(saved))
    p = plan(composed("task=plan", "hardware=cpu", "hardware.devices=2", "parallel=ddp"))
    assert any("measured by dsrun doctor" in a for a in p.assumptions), p.assumptions


def test_hardware_naming_more_gpus_than_present_is_flagged_not_a_crash(tmp_path):
    proc = dsrun("doctor", "hardware=4x4090", *SMALL, run_dir=tmp_path / "run",
                 env={"DSRUN_DOCTOR_DIR": str(tmp_path / "saved")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    flagged = [f for f in report["findings"] if f["topic"] == "hardware"]
    assert flagged and flagged[0]["level"] == "warn", report["findings"]
    assert "expects 4 x rtx4090" in flagged[0]["message"] and "has 0 CUDA GPU" in flagged[0]["message"]
    assert report["verdict"] == "warn"
    assert_swept(report["allreduce"], ranks=2, nodes=1)  # what this machine has, said to be CPU processes
    assert any(f["topic"] == "allreduce" and "not the links" in f["message"] for f in report["findings"])


def test_doctor_across_two_network_namespace_nodes(veth_pair, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    nodes = [subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
         "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr", "10.231.0.1", "--master_port", "29641",
         "-m", "dsrun", "doctor", *SMALL, "hardware=cpu", "hardware.num_nodes=2", "hardware.network=ethernet",
         "+hardware.env.GLOO_SOCKET_IFNAME=dsr0", f"hydra.run.dir={run_dir}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "DSRUN_DOCTOR_DIR": str(tmp_path / "saved")})
        for rank, ns in enumerate(veth_pair)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    report = json.loads(outputs[0][0])
    assert_swept(report["allreduce"], ranks=2, nodes=2)
    assert report["env"]["GLOO_SOCKET_IFNAME"]["effective"] == "dsr0"
    assert "dsr0" in report["network"]["interfaces"]
    assert not [f for f in report["findings"] if f["level"] in ("warn", "fail")], report["findings"]
    saved = json.loads(next((tmp_path / "saved").glob("*.json")).read_text())
    assert saved["network"]["nodes"] == 2 and saved["network"]["bus_bandwidth_gbs"] > 0


# --- the judge, fed a reading of a machine this one is not ------------------------------------------------------

def fake_4090(index: int, width: int) -> dict:
    return {"index": index, "name": "NVIDIA GeForce RTX 4090", "vram_gib": 23.6, "pcie_gen": 4, "pcie_gen_max": 4,
            "pcie_width": width, "pcie_width_max": 16, "nvlink_active": 0, "ecc": None, "temperature_c": 41,
            "power_limit_w": 450.0, "power_limit_default_w": 450.0}


def fake_reading(width: int, ifname: str) -> dict:
    names = ["NVIDIA GeForce RTX 4090"] * 4
    return {"hostname": "box", "software": {"python": "3.11.7", "torch": "2.11.0", "torch_cuda": "12.8"},
            "nvml": {"driver": "570.86.10", "cuda_driver": "12.8", "error": None,
                     "gpus": [fake_4090(0, width), *(fake_4090(i, 16) for i in (1, 2, 3))]},
            "cuda": {"devices": 4, "names": names,
                     "p2p": [{"from": i, "to": j, "access": False} for i in range(4) for j in range(4) if i != j]},
            "network": {"interfaces": {"lo": {"state": "unknown", "speed_mbps": None},
                                       "eth0": {"state": "up", "speed_mbps": 2500}}, "infiniband": []},
            "env": {"NCCL_SOCKET_IFNAME": {"option": ifname, "effective": ifname},
                    "NCCL_P2P_DISABLE": {"option": "1", "effective": "1"}}}


def test_gpus_hidden_by_cuda_visible_devices_are_left_out_of_the_checks_and_named():
    """NVML lists every GPU of the box; a process started with CUDA_VISIBLE_DEVICES=0 on a 2-GPU NVLink machine
    must be judged on its one GPU (no peer), with the other named as hidden (matched by UUID, NVML's 'GPU-' prefix
    and case aside)."""
    hardware = composed("hardware=4x4090", "precision=bf16", "hardware.devices=1").hardware
    reading = fake_reading(width=16, ifname="eth")
    cards = [{**fake_4090(i, 16), "uuid": f"GPU-ABCD-000{i}"} for i in (0, 1)]
    reading["nvml"]["gpus"] = cards
    reading["cuda"] = {"devices": 1, "names": ["NVIDIA GeForce RTX 4090"], "p2p": [], "uuids": ["abcd-0000"]}
    report = judge(hardware, reading)
    assert [g["index"] for g in report["gpus"]] == [0] and [g["index"] for g in report["hidden_gpus"]] == [1]
    notes = [f["message"] for f in report["findings"] if f["topic"] == "gpu"]
    assert notes and "1 more GPU(s)" in notes[0] and "hidden" in notes[0], report["findings"]
    reading["cuda"]["uuids"] = ["abcd-0000", "abcd-0001"]  # both visible: nothing hidden, no note
    both = judge(hardware, reading)
    assert len(both["gpus"]) == 2 and not both["hidden_gpus"]
    assert not [f for f in both["findings"] if f["topic"] == "gpu"]


def test_fake_reading_of_a_card_at_x8_of_x16_and_a_missing_interface_is_flagged():
    hardware = composed("hardware=4x4090", "precision=bf16").hardware
    report = judge(hardware, fake_reading(width=8, ifname="enp5s0"))
    warnings = [f["message"] for f in report["findings"] if f["level"] == "warn"]
    assert any("GPU 0" in w and "x8 of x16" in w for w in warnings), warnings
    assert any("NCCL_SOCKET_IFNAME=enp5s0" in w and "no interface enp5s0" in w for w in warnings), warnings
    assert report["verdict"] == "warn"
    healthy = judge(hardware, fake_reading(width=16, ifname="eth"))  # 'eth' is a prefix: eth0 matches
    assert healthy["findings"] == [] and healthy["verdict"] == "ok", healthy["findings"]


def test_driver_below_the_cuda_family_fails_and_below_the_release_warns():
    hardware = composed("hardware=4x4090", "precision=bf16").hardware
    reading = fake_reading(width=16, ifname="eth0")
    reading["nvml"]["driver"] = "520.61.05"
    assert judge(hardware, reading)["software"]["driver"]["level"] == "fail"
    reading["nvml"]["driver"] = "550.54.14"
    assert judge(hardware, reading)["software"]["driver"]["level"] == "warn"


def test_ib_enabled_without_devices_and_nvlink_option_without_links_are_flagged():
    hardware = composed("hardware=8xh100", "precision=bf16").hardware  # network: infiniband, interconnect: nvlink
    reading = fake_reading(width=16, ifname="eth0")
    reading["env"] = {}
    messages = [f["message"] for f in judge(hardware, reading)["findings"]]
    assert any("/sys/class/infiniband has no device" in m for m in messages), messages
    assert any("no GPU has an active NVLink link" in m for m in messages), messages


def test_socket_ifname_lists_follow_nccl_rules():
    interfaces = ["lo", "eth0", "ib0"]
    assert ifname_missing("eth", interfaces, prefixes=True) == []
    assert ifname_missing("=eth", interfaces, prefixes=True) == ["=eth"]
    assert ifname_missing("^docker,lo", interfaces, prefixes=True) == []
    assert ifname_missing("eth0,enp1s0", interfaces, prefixes=False) == ["enp1s0"]


def test_planner_uses_a_saved_bandwidth_only_for_the_device_it_was_measured_on(tmp_path, monkeypatch):
    monkeypatch.setenv("DSRUN_DOCTOR_DIR", str(tmp_path))
    args = ("task=plan", "hardware=4x4090", "precision=bf16", "parallel=ddp", "model=r1_distill_qwen_1_5b")
    catalog = plan(composed(*args))
    from dsrun.hardware import measured_path

    entry = {"backend": "nccl", "ranks": 4, "nodes": 1, "bus_bandwidth_gbs": 1.0, "latency_us": 50.0,
             "message_bytes": 2**28, "measured_at": "2026-11-29 12:00", "device_name": "NVIDIA GeForce RTX 4090"}
    measured_path().write_text(json.dumps({"local": {**entry, "device": "rtx3090"}}))
    assert plan(composed(*args)).step_time_s == catalog.step_time_s  # another card: ignored
    measured_path().write_text(json.dumps({"local": {**entry, "device": "rtx4090"}}))
    slow = plan(composed(*args))  # 1 GB/s instead of the catalog's ~25
    assert slow.step_time_s > catalog.step_time_s
    assert any("within the node 1.00 GB/s" in a for a in slow.assumptions), slow.assumptions


# --- GPU (device machine) ---------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run through the device tool")


@pytest.mark.gpu
@gpu
def test_doctor_reads_the_gpus_through_nvml(tmp_path):
    proc = dsrun("doctor", "doctor.json=true", run_dir=tmp_path / "run", env={"DSRUN_DOCTOR_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    print(json.dumps({k: report[k] for k in ("gpus", "cuda", "software", "findings", "allreduce",
                                             "gradient_sync")}, indent=1))
    n = torch.cuda.device_count()
    assert len(report["gpus"]) == n and report["cuda"]["devices"] == n, "the GPUs this process uses"
    assert all(g["uuid"] for g in report["gpus"])
    first = report["gpus"][0]
    assert first["name"] == torch.cuda.get_device_name(0)
    assert abs(first["vram_gib"] - torch.cuda.get_device_properties(0).total_memory / 2**30) < 1
    assert first["pcie_width"] and first["pcie_width_max"] and first["pcie_gen_max"]
    assert report["software"]["driver"]["version"] and report["software"]["nccl"]["version"]
    if n == 1:
        assert report["cuda"]["p2p"] == [] and report["allreduce"].get("skipped")
    else:
        assert all(p["access"] for p in report["cuda"]["p2p"]), "P2P on between every pair (NVLink)"
        assert all(g["nvlink_active"] > 0 for g in report["gpus"][:n])
        result = report["allreduce"]
        assert (result["backend"], result["ranks"]) == ("nccl", n)
        assert result["bus_bandwidth_gbs"] > 50, "NVLink, not PCIe"
