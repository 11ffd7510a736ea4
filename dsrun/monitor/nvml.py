"""Hardware telemetry any monitor can read: per-GPU readings through NVML, host memory and network from /proc.

Every reading is optional: a machine without NVML yields no GPU readings, a GPU that does not report power
(or PCIe throughput) yields a reading without it, a system without /proc yields no host readings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def pcie(nv: Any, handle: Any, direction: str) -> float:
    """NVML reports PCIe throughput in KB/s, sampled over 20 ms."""
    return 1024 * nv.nvmlDeviceGetPcieThroughput(handle, getattr(nv, f"NVML_PCIE_UTIL_{direction}_BYTES"))


# reading name (unit in the name) -> (description, how to read it from an NVML device handle)
GPU_READINGS: dict[str, tuple[str, Callable[[Any, Any], float]]] = {
    "utilization_ratio": ("Fraction of the last sample period in which a kernel ran",
                          lambda nv, h: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100),
    "memory_used_bytes": ("GPU memory in use (all processes)", lambda nv, h: nv.nvmlDeviceGetMemoryInfo(h).used),
    "memory_total_bytes": ("GPU memory installed", lambda nv, h: nv.nvmlDeviceGetMemoryInfo(h).total),
    "temperature_celsius": ("GPU core temperature",
                            lambda nv, h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
    "power_watts": ("GPU power draw", lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1000),  # NVML: milliwatts
    "pcie_transmit_bytes_per_second": ("PCIe throughput, GPU to host", lambda nv, h: pcie(nv, h, "TX")),
    "pcie_receive_bytes_per_second": ("PCIe throughput, host to GPU", lambda nv, h: pcie(nv, h, "RX")),
}


class Gpus:
    """The GPUs NVML sees on this host, indexed as NVML numbers them (which ignores CUDA_VISIBLE_DEVICES)."""

    def __init__(self) -> None:
        self.nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no package, no driver library, no GPU: all mean "no GPU readings", not a failed run
            return
        self.nvml = pynvml

    def read(self) -> list[dict[str, float]]:
        """One dict per GPU holding the readings that GPU reports."""
        nv = self.nvml
        if nv is None:
            return []
        gpus: list[dict[str, float]] = []
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError:
            return gpus
        for index in range(count):
            readings: dict[str, float] = {}
            gpus.append(readings)  # a GPU the driver lost reads empty; the others keep their index and series
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
            except nv.NVMLError:
                continue
            for name, (_, read) in GPU_READINGS.items():
                try:
                    readings[name] = float(read(nv, handle))
                except nv.NVMLError:  # NVML_ERROR_NOT_SUPPORTED and kin: this GPU does not report it
                    pass
        return gpus

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.nvmlShutdown()
            self.nvml = None


def host_memory(meminfo: Path = Path("/proc/meminfo")) -> dict[str, float]:
    """used_bytes / total_bytes; used is what the kernel could not hand out (total - MemAvailable), as `free` says."""
    try:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()}
    except OSError:
        return {}
    return {"used_bytes": fields["MemTotal"] - fields["MemAvailable"], "total_bytes": fields["MemTotal"]}


def host_network(netdev: Path = Path("/proc/net/dev")) -> dict[str, tuple[int, int]]:
    """Bytes received and transmitted since boot, per interface (loopback left out: it is not the network)."""
    try:
        lines = netdev.read_text().splitlines()[2:]  # two header lines
    except OSError:
        return {}
    counts = {}
    for line in lines:
        name, data = line.split(":", 1)
        fields = data.split()
        if name.strip() != "lo":
            counts[name.strip()] = (int(fields[0]), int(fields[8]))
    return counts
