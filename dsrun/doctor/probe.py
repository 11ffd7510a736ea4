"""What `dsrun doctor` reads from this machine: software versions, GPUs through NVML, peer access, network
interfaces and InfiniBand devices. Each reader returns plain data; dsrun/doctor/checks.py judges it, so a test can
hand the judge a reading of a machine it does not have."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any, Callable

# the packages whose versions decide whether a run works (the list; peft for LoRA)
PACKAGES = ("torch", "lightning", "transformers", "peft", "deepspeed", "bitsandbytes", "nvidia-ml-py")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cudnn(number: int | None) -> str | None:
    """cuDNN's integer: 8902 is 8.9.2 (major x 1000 before 9), 90100 is 9.1.0 (major x 10000 from 9 on)."""
    if not number:
        return None
    return f"{number // 10000}.{number // 100 % 100}.{number % 100}" if number >= 10000 else \
        f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def software() -> dict[str, str | None]:
    """Python, the packages, and what torch was built with (CUDA, cuDNN, NCCL); None where absent."""
    import torch

    found: dict[str, str | None] = {"python": platform.python_version()}
    found.update({package: _version(package) for package in PACKAGES})
    found["torch_cuda"] = torch.version.cuda
    found["cudnn"] = _cudnn(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    try:
        found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError):  # a CPU build has no NCCL
        found["nccl"] = None
    return found


def _optional(read: Callable[[], Any]) -> Any:
    """One NVML field; None where this GPU or driver does not report it (NVML_ERROR_NOT_SUPPORTED and kin)."""
    try:
        return read()
    except Exception:
        return None


def _gpu(nv: Any, index: int) -> dict[str, Any]:
    h = nv.nvmlDeviceGetHandleByIndex(index)
    name = nv.nvmlDeviceGetName(h)
    links = [_optional(lambda: nv.nvmlDeviceGetNvLinkState(h, i)) for i in range(nv.NVML_NVLINK_MAX_LINKS)]
    ecc = _optional(lambda: nv.nvmlDeviceGetEccMode(h))  # (current, pending)
    limit = _optional(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
    default = _optional(lambda: nv.nvmlDeviceGetPowerManagementDefaultLimit(h))
    uuid = _optional(lambda: nv.nvmlDeviceGetUUID(h))
    return {
        "index": index,
        "name": name.decode() if isinstance(name, bytes) else name,
        "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
        "vram_gib": nv.nvmlDeviceGetMemoryInfo(h).total / 2**30,
        "pcie_gen": _optional(lambda: nv.nvmlDeviceGetCurrPcieLinkGeneration(h)),
        "pcie_gen_max": _optional(lambda: nv.nvmlDeviceGetMaxPcieLinkGeneration(h)),  # of the card in this slot
        "pcie_width": _optional(lambda: nv.nvmlDeviceGetCurrPcieLinkWidth(h)),
        "pcie_width_max": _optional(lambda: nv.nvmlDeviceGetMaxPcieLinkWidth(h)),
        "nvlink_active": sum(1 for state in links if state == nv.NVML_FEATURE_ENABLED),
        "ecc": None if ecc is None else bool(ecc[0]),
        "temperature_c": _optional(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
        "power_limit_w": None if limit is None else limit / 1000,  # NVML: milliwatts
        "power_limit_default_w": None if default is None else default / 1000,
    }


def read_gpus() -> dict[str, Any]:
    """Every GPU NVML sees and the driver: {'driver': str | None, 'gpus': [...], 'error': why none, or None}.
    The one place doctor touches NVML."""
    try:
        import pynvml as nv

        nv.nvmlInit()
    except Exception as exc:  # no package, no driver library, no GPU
        return {"driver": None, "cuda_driver": None, "gpus": [], "error": str(exc) or type(exc).__name__}
    try:
        driver = nv.nvmlSystemGetDriverVersion()
        cuda = _optional(nv.nvmlSystemGetCudaDriverVersion)  # e.g. 12080 for 12.8
        gpus = [_gpu(nv, i) for i in range(nv.nvmlDeviceGetCount())]
        return {"driver": driver.decode() if isinstance(driver, bytes) else driver,
                "cuda_driver": None if cuda is None else f"{cuda // 1000}.{cuda % 1000 // 10}", "gpus": gpus,
                "error": None}
    finally:
        nv.nvmlShutdown()


def cuda_view() -> dict[str, Any]:
    """What torch sees: the CUDA devices it can use and peer access between each pair (NVLink or PCIe P2P)."""
    import torch

    if not torch.cuda.is_available():
        return {"devices": 0, "names": [], "p2p": []}
    n = torch.cuda.device_count()
    pairs = [{"from": i, "to": j, "access": torch.cuda.can_device_access_peer(i, j)}
             for i in range(n) for j in range(n) if i != j]
    uuids = [_optional(lambda: str(torch.cuda.get_device_properties(i).uuid)) for i in range(n)]
    return {"devices": n, "names": [torch.cuda.get_device_name(i) for i in range(n)], "p2p": pairs, "uuids": uuids}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # e.g. speed of a link that is down or virtual: EINVAL
        return None


def network(sys_class: Path = Path("/sys/class")) -> dict[str, Any]:
    """Interfaces (state, speed in Mb/s) and InfiniBand devices, from sysfs."""
    interfaces = {}
    for entry in sorted((sys_class / "net").iterdir()) if (sys_class / "net").is_dir() else []:
        speed = _read(entry / "speed")
        interfaces[entry.name] = {"state": _read(entry / "operstate"),
                                  "speed_mbps": int(speed) if speed and speed.lstrip("-").isdigit()
                                  and int(speed) > 0 else None}
    ib = sys_class / "infiniband"
    return {"interfaces": interfaces, "infiniband": sorted(p.name for p in ib.iterdir()) if ib.is_dir() else []}


def environment(hardware_env: dict[str, str]) -> dict[str, dict[str, str | None]]:
    """Each NCCL/Gloo variable the hardware option sets or the user exported: the option's value and the one that
    takes effect (an exported variable wins, as strategy.apply_environment does)."""
    names = sorted({*hardware_env, *(k for k in os.environ if k.startswith(("NCCL_", "GLOO_")))})
    return {name: {"option": hardware_env.get(name), "effective": os.environ.get(name, hardware_env.get(name))}
            for name in names}
