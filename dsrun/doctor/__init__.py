"""`dsrun doctor` (task=doctor): check this machine against the hardware option before training. Read the machine
(dsrun/doctor/probe.py), measure an all-reduce sweep (dsrun/allreduce.py), judge (dsrun/doctor/checks.py), then
print the report, keep it as doctor.json in the run folder, and save the measured bandwidth where the planner
looks for it (hardware.measured_path). docs/doctor.md."""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from dsrun import allreduce
from dsrun.doctor import checks, probe
from dsrun.batch import data_parallel_size
from dsrun.errors import UserError
from dsrun.hardware import devices_per_node, match_gpu, measured_path
from dsrun.plan import plan
from dsrun.plan.memory import bytes_per_param
from dsrun.plan.overrides import apply_overrides
from dsrun.run.files import rank_zero, write_json
from dsrun.strategy import apply_environment

if TYPE_CHECKING:
    from dsrun.hardware import HardwareConfig
    from dsrun.schema import RunConfig

CPU_MAX_BYTES, GPU_MAX_BYTES = 4 * 2**20, 256 * 2**20
COLOURS = {"ok": "green", "note": "cyan", "warn": "yellow", "fail": "red"}


def doctor_argv(args: list[str]) -> list[str]:
    """`dsrun doctor [overrides]` is `python -m dsrun task=doctor [overrides]`."""
    return ["task=doctor", *args]


def readings(hardware: HardwareConfig) -> dict[str, Any]:
    """Everything the judge needs from this machine, as plain data."""
    return {"hostname": platform.node(), "software": probe.software(), "nvml": probe.read_gpus(),
            "cuda": probe.cuda_view(), "network": probe.network(),
            "env": probe.environment(dict(hardware.env))}


def sweep(cfg: RunConfig, cuda_devices: int) -> dict[str, Any]:
    """The all-reduce sweep this launch can run: across torchrun's ranks when it started us, else NCCL over the
    local GPUs, else Gloo over CPU processes. A failure is a result to report, not a crash."""
    d, hw = cfg.doctor, cfg.hardware
    gpus = cuda_devices > 0
    message_sizes = allreduce.sizes(d.min_bytes, d.max_bytes or (GPU_MAX_BYTES if gpus else CPU_MAX_BYTES))
    if allreduce.launched():
        try:
            rows, topology = allreduce.launched_sweep(message_sizes, d.iterations, d.timeout_s)
        except Exception as exc:
            return {"error": _first_line(exc)}
        return {**topology, "rows": rows}
    if cuda_devices == 1:
        return {"skipped": "one GPU: no peer to all-reduce with (run on a machine or launch with several)"}
    asked = devices_per_node(hw) if hw.accelerator == ("cuda" if gpus else "cpu") else 0
    ranks = (asked if 2 <= asked <= cuda_devices else cuda_devices) if gpus else max(2, asked)
    backend = "nccl" if gpus else "gloo"
    print(f"dsrun doctor: all-reduce over {ranks} {'GPUs' if gpus else 'CPU processes'} ({backend}), "
          f"{len(message_sizes)} sizes from {message_sizes[0]:,} to {message_sizes[-1]:,} bytes", file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory(prefix="dsrun-doctor-") as scratch:
            rows = allreduce.local_sweep(backend, ranks, message_sizes, d.iterations, d.timeout_s, Path(scratch))
    except Exception as exc:
        return {"backend": backend, "ranks": ranks, "nodes": 1, "error": _first_line(exc)}
    return {"backend": backend, "ranks": ranks, "nodes": 1, "rows": rows}


def measured_device(result: dict[str, Any], cuda: dict[str, Any]) -> dict[str, Any]:
    """Name what the sweep ran on as the planner names devices: a catalog GPU key, or 'cpu' for Gloo over CPU
    processes (on a GPU node under torchrun, this node's first GPU)."""
    if result.get("backend") == "nccl" and cuda["names"]:
        return {**result, "device": match_gpu(cuda["names"][0]) or cuda["names"][0], "device_name": cuda["names"][0]}
    return {**result, "device": "cpu", "device_name": "cpu"} if result.get("backend") == "gloo" else result


def _first_line(exc: BaseException) -> str:
    """The cause a failed rank reports (start_processes wraps it in a traceback), on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """nccl-tests' headline numbers: bus bandwidth at the largest message, the peak, and the smallest's time."""
    rows = result.get("rows")
    if not rows:
        return result
    return {**result, "bus_bandwidth_gbs": rows[-1]["busbw_gbs"], "peak_bus_bandwidth_gbs":
            max(r["busbw_gbs"] for r in rows), "latency_us": rows[0]["time_us"], "message_bytes": rows[-1]["bytes"]}


def gradient_sync(cfg: RunConfig, result: dict[str, Any]) -> dict[str, Any] | None:
    """What one DDP gradient all-reduce of the chosen model costs at the measured bus bandwidth (the planner
    counts the parameters; not hidden under backward here, so an upper bound per optimizer step)."""
    if not result.get("bus_bandwidth_gbs"):
        return None
    try:  # counted as a CPU plan: the count does not depend on the card, which may be missing from the catalog
        trainable = plan(apply_overrides(cfg, ["hardware.accelerator=cpu"])).parameters["trainable"]
    except UserError:  # e.g. model.init=pretrained without a local config.json
        return None
    gradient_bytes = trainable * bytes_per_param(cfg)["gradients"]
    planned = "cpu" if cfg.hardware.accelerator == "cpu" else cfg.hardware.gpu
    # the option's data-parallel size when the sweep ran on its device, else the ranks that were measured
    ranks = data_parallel_size(cfg) if planned == result["device"] and data_parallel_size(cfg) > 1 else result["ranks"]
    seconds = allreduce.all_reduce_seconds(gradient_bytes, ranks, result["bus_bandwidth_gbs"] * 1e9)
    return {"model": cfg.model.name, "trainable_parameters": trainable, "gradient_bytes": gradient_bytes,
            "ranks": ranks, "seconds": seconds}


def doctor_task(cfg: RunConfig) -> dict[str, Any] | None:
    found = readings(cfg.hardware) if rank_zero() else None
    apply_environment(cfg.hardware)  # measure with the NCCL/Gloo settings training would use
    result = summarise(sweep(cfg, found["cuda"]["devices"] if found else 0))
    if found is None:  # not rank zero
        return None
    result = measured_device(result, found["cuda"])
    found["allreduce"] = result
    report = checks.judge(cfg.hardware, found)
    report["gradient_sync"] = gradient_sync(cfg, result)
    report["saved_to"] = save_measurement(found, result)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        report["report"] = str(Path(HydraConfig.get().runtime.output_dir).absolute() / "doctor.json")
        write_json(Path(report["report"]), report)
    if cfg.doctor.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        render(report, Console(width=None if sys.stdout.isatty() else 120))
    return report


def save_measurement(found: dict[str, Any], result: dict[str, Any]) -> str | None:
    """Keep the headline bandwidth for the planner, one entry per scope ('local' within a node, 'network' across
    nodes) so a cluster run does not erase the box's own figure."""
    if not result.get("bus_bandwidth_gbs"):
        return None
    path = measured_path()
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    scope = "network" if result["nodes"] > 1 else "local"
    saved[scope] = {"device": result["device"], "device_name": result["device_name"],
                    "backend": result["backend"], "ranks": result["ranks"], "nodes": result["nodes"],
                    "bus_bandwidth_gbs": result["bus_bandwidth_gbs"], "latency_us": result["latency_us"],
                    "message_bytes": result["message_bytes"], "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, saved)
    return str(path)


def render(report: dict[str, Any], console: Console) -> None:
    hw = report["hardware"]
    console.print(f"[bold]dsrun doctor[/]: {report['hostname']} against hardware={hw['name']} "
                  f"({hw['devices']} x {hw['gpu'] or hw['accelerator']} per node, {hw['num_nodes']} node(s))")
    software = Table("software", "version", "verdict", title="software")
    for name, line in report["software"].items():
        software.add_row(name, line["version"] or "-", f"[{COLOURS[line['level']]}]{line['verdict']}")
    console.print(software)
    gpus = report["gpus"]
    if gpus:
        table = Table("#", "model", "VRAM GiB", "PCIe now / max", "NVLink", "ECC", "temp C", "power limit W",
                      title="GPUs (NVML)")
        for g in gpus:
            table.add_row(str(g["index"]), g["name"], f"{g['vram_gib']:.1f}",
                          f"gen {g['pcie_gen']} x{g['pcie_width']} / gen {g['pcie_gen_max']} x{g['pcie_width_max']}",
                          f"{g['nvlink_active']} links", {True: "on", False: "off"}.get(g["ecc"], "-"),
                          str(g["temperature_c"]), f"{g['power_limit_w'] or 0:.0f}")
        console.print(table)
        if report.get("hidden_gpus"):
            console.print("hidden from this process (CUDA_VISIBLE_DEVICES): " + ", ".join(
                f"{g['index']} {g['name']}" for g in report["hidden_gpus"]))
        pairs = report["cuda"]["p2p"]
        console.print("peer access: " + (", ".join(f"{p['from']}->{p['to']} {'yes' if p['access'] else 'no'}"
                                                   for p in pairs) or "no GPU pair"))
    else:
        console.print(f"GPUs: none ({report['nvml_error'] or 'NVML lists none'})")
    net = report["network"]
    console.print("interfaces: " + ", ".join(_interface(name, i) for name, i in net["interfaces"].items())
                  + f"; InfiniBand: {', '.join(net['infiniband']) or 'none'}")
    for name, value in report["env"].items():
        source = ("from the option" if value["effective"] == value["option"] else "exported" if value["option"] is None
                  else f"exported; the option says {value['option']}")
        console.print(f"  {name}={value['effective']} ({source})")
    _render_sweep(report, console)
    for f in report["findings"]:
        console.print(f"[{COLOURS[f['level']]}]{f['level']}[/] {f['topic']}: {f['message']}", soft_wrap=True)
    console.print(f"[bold {COLOURS[report['verdict']]}]verdict: {report['verdict']}[/] "
                  f"({len(report['findings'])} finding(s))" +
                  (f"; report saved as {report['report']}" if report.get("report") else ""), soft_wrap=True)


def _interface(name: str, reading: dict[str, Any]) -> str:
    speed = reading["speed_mbps"]
    return f"{name} {reading['state']}" + ("" if speed is None else f" {speed} Mb/s")


def _render_sweep(report: dict[str, Any], console: Console) -> None:
    result = report["allreduce"]
    if not result.get("rows"):
        return
    table = Table("bytes", "time us", "algbw GB/s", "busbw GB/s",
                  title=f"all-reduce: {result['backend']}, {result['ranks']} ranks on {result['nodes']} node(s)")
    for r in result["rows"]:
        table.add_row(f"{r['bytes']:,}", f"{r['time_us']:.1f}", f"{r['algbw_gbs']:.3f}", f"{r['busbw_gbs']:.3f}")
    console.print(table)
    console.print(f"bus bandwidth {result['bus_bandwidth_gbs']:.2f} GB/s at {result['message_bytes']:,} bytes "
                  f"(peak {result['peak_bus_bandwidth_gbs']:.2f}); latency {result['latency_us']:.1f} us")
    if sync := report.get("gradient_sync"):
        console.print(f"gradient sync for model={sync['model']} ({sync['trainable_parameters'] / 1e9:.3g} B trainable "
                      f"parameters, {sync['gradient_bytes'] / 1e9:.2f} GB of gradients) over {sync['ranks']} ranks: "
                      f"{sync['seconds'] * 1e3:.1f} ms per optimizer step at this bandwidth (DDP, before any overlap "
                      "with backward)", soft_wrap=True)
    if report.get("saved_to"):
        console.print(f"saved for the planner: plans for {result['device']} on this machine use this bandwidth "
                      f"({report['saved_to']})")
