"""GPU catalog access, detection of this machine's accelerators, and `hardware=auto` resolution."""

from __future__ import annotations

import functools
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import yaml


@dataclass
class HardwareConfig:
    name: str = "cpu"
    accelerator: str = "cpu"  # cpu | cuda | auto (detect)
    gpu: Optional[str] = None  # key into dsrun/gpus.yaml
    devices: Optional[int] = 1  # processes per node (CPU processes on accelerator=cpu); null: every GPU found
    # (hardware=auto's default)
    num_nodes: int = 1
    interconnect: str = "none"  # within a node: none | pcie | nvlink
    network: str = "none"  # between nodes: none | ethernet | infiniband
    env: Dict[str, str] = field(default_factory=dict)  # NCCL/Gloo variables applied before the process group starts
    emulate: bool = False  # cap a bigger GPU to this profile's VRAM
    memory_cap_gib: Optional[float] = None  # cap what training may allocate per process (GPU allocator; CPU heap)


CATALOG_PATH = Path(__file__).with_name("gpus.yaml")


@functools.cache
def gpu_catalog() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(CATALOG_PATH.read_text())


def match_gpu(device_name: str) -> str | None:
    """Catalog key of a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None."""
    best = None
    for key, spec in gpu_catalog().items():
        for pattern in spec.get("match", []):
            # the longest pattern wins, so 'RTX 4060 Ti' beats 'RTX 4060'
            if pattern.lower() in device_name.lower() and (best is None or len(pattern) > best[1]):
                best = (key, len(pattern))
    return best[0] if best else None


def detect() -> dict[str, Any]:
    """What this machine has: {'accelerator', 'devices', 'gpu', 'device_name'}."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        name = torch.cuda.get_device_name(0)
        return {"accelerator": "cuda", "devices": torch.cuda.device_count(), "gpu": match_gpu(name),
                "device_name": name}
    return {"accelerator": "cpu", "devices": 1, "gpu": None, "device_name": "cpu"}


def cuda_devices_present() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# PCIe payload bandwidth per lane and direction, GB/s (128b/130b encoding from gen 3 on)
PCIE_LANE_GBS = {"3.0": 0.985, "4.0": 1.969, "5.0": 3.938}


def pcie_gbs(spec: dict[str, Any]) -> float:
    """One direction of a catalog GPU's host link, e.g. '4.0 x16' -> 31.5 GB/s."""
    generation, lanes = spec["pcie"].split(" x")
    return PCIE_LANE_GBS[generation] * int(lanes)


def host_memory_gib() -> float:
    """This machine's physical memory (what hardware=cpu plans against)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def measured_path() -> Path:
    """Where `dsrun doctor` keeps this machine's measured collective bandwidth ($DSRUN_DOCTOR_DIR or
    outputs/doctor, one file per host name)."""
    return Path(os.environ.get("DSRUN_DOCTOR_DIR") or "outputs/doctor") / f"{socket.gethostname()}.json"


def measured_links(hardware_cfg: HardwareConfig) -> dict[str, dict[str, Any]]:
    """The all-reduce measurements `dsrun doctor` saved on this machine that fit a hardware option: by scope
    ('local': within a node, 'network': across nodes), only those taken on the device the option plans for
    (its catalog GPU, or CPU processes). The planner's one lookup of measured bandwidth (docs/planner.md)."""
    try:
        saved = json.loads(measured_path().read_text())
    except (OSError, ValueError):
        return {}
    device = "cpu" if hardware_cfg.accelerator == "cpu" else hardware_cfg.gpu
    return {scope: entry for scope, entry in saved.items()
            if isinstance(entry, dict) and entry.get("device") == device and entry.get("bus_bandwidth_gbs")}


def memory_cap(hw: HardwareConfig) -> float | None:
    """GiB a process may allocate: hardware.memory_cap_gib, else under hardware.emulate the emulated card's VRAM."""
    return hw.memory_cap_gib or (gpu_catalog()[hw.gpu]["vram_gib"] if hw.emulate and hw.gpu else None)


def emulate_memory(hardware_cfg: HardwareConfig, device: Any) -> float | None:
    """Cap what this process may allocate: hardware.memory_cap_gib, or under hardware.emulate the profile's VRAM
    (a 4060 recipe proven on an H100). GPU: the caching allocator's fraction of the card. CPU: the heap may grow
    by the cap from here (RLIMIT_DATA), so a too-large step fails as an allocation, not by the kernel's OOM killer."""
    import resource

    import torch

    cap_gib = memory_cap(hardware_cfg)
    if cap_gib is None:
        return None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), device)
    else:
        in_use = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith("VmData:"))
        resource.setrlimit(resource.RLIMIT_DATA, (in_use + int(cap_gib * 2**30), resource.RLIM_INFINITY))
    return cap_gib


def lift_memory_cap() -> bool:
    """Remove the CPU heap limit emulate_memory set (recording and explaining a failure need memory the cap may no
    longer have: a lazy import under it fails as a SystemError). Returns whether one was set."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if soft == resource.RLIM_INFINITY:
        return False
    resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
    return True


def devices_per_node(hw: HardwareConfig) -> int:
    """hardware.devices once resolve() has filled it (null in hardware=auto means every GPU found)."""
    assert hw.devices is not None, "hardware.devices is read before resolve() filled it"
    return hw.devices


def hardware_problems(hw: HardwareConfig, catalog: dict[str, dict[str, Any]]) -> list[str]:
    """The hardware group's own values (validate() adds the rules that span groups)."""
    p = []
    if hw.memory_cap_gib is not None and hw.memory_cap_gib <= 0:
        p.append(f"hardware.memory_cap_gib={hw.memory_cap_gib}: must be > 0 (GiB a process may allocate)")
    if hw.gpu is not None and hw.gpu not in catalog:
        p.append(f"hardware.gpu={hw.gpu}: not in the GPU catalog; known: {', '.join(sorted(catalog))}")
    if hw.emulate and hw.accelerator != "cuda":
        p.append("hardware.emulate=true: emulation caps a bigger GPU to a GPU profile's memory; pick a GPU hardware "
                 "option (e.g. hardware=1x3060) on a machine with a GPU")
    if hw.accelerator == "cuda" and hw.gpu is None and hw.name != "auto":
        p.append("hardware.gpu: a cuda hardware option must name its GPU from the catalog")
    return p
