"""The judge of `dsrun doctor`: plain readings of a machine (dsrun/doctor/probe.py, or a test's fake) in, findings
out. Nothing here reads the machine; a finding is {level: note | warn | fail, topic, message}."""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from dsrun.hardware import gpu_catalog, match_gpu, pcie_gbs

if TYPE_CHECKING:
    from dsrun.hardware import HardwareConfig

COMPAT_PATH = Path(__file__).with_name("compat.yaml")
LEVELS = ("ok", "note", "warn", "fail")  # worst last


@functools.cache
def compatibility() -> dict[str, Any]:
    return yaml.safe_load(COMPAT_PATH.read_text())


@functools.cache
def tested_ranges() -> dict[str, str]:
    """Package -> the version range dsrun pins (pyproject.toml, as installed), plus 'python'."""
    try:
        requires = importlib.metadata.requires("dsrun") or []
        python = importlib.metadata.metadata("dsrun")["Requires-Python"]
    except importlib.metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, never installed
        try:
            import tomllib  # Python >= 3.11

            project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
        except (ImportError, OSError):
            return {}  # no pins to judge against: every version reads "ok"
        requires, python = project["dependencies"], project.get("requires-python")
    ranges = {r.name.lower(): str(r.specifier) for r in map(Requirement, requires) if r.marker is None}
    return {**ranges, **({"python": python} if python else {})}


def finding(level: str, topic: str, message: str) -> dict[str, str]:
    return {"level": level, "topic": topic, "message": message}


def _older(version: str, than: str) -> bool:
    try:
        return Version(version) < Version(than)
    except InvalidVersion:
        return False


def software_verdicts(found: dict[str, str | None], ranges: dict[str, str], compat: dict[str, Any],
                      driver: str | None) -> dict[str, tuple[str, str]]:
    """Per software line: (level, verdict in words)."""
    verdicts: dict[str, tuple[str, str]] = {}
    for name, version in found.items():
        spec = ranges.get(name)
        why = compat["known_bad"].get(name, {}).get(version)
        if version is None:
            use = compat["optional"].get(name)
            verdicts[name] = (("note", f"not installed: {use} unavailable") if use else
                              ("ok", "not in this torch build") if name in ("torch_cuda", "cudnn", "nccl") else
                              ("fail", "not installed"))
        elif why:
            verdicts[name] = ("fail", f"{version} has {why}; install another release within {spec or 'the pins'}")
        elif spec and not SpecifierSet(spec).contains(version, prereleases=True):
            verdicts[name] = ("warn", f"outside dsrun's tested range {spec}")
        else:
            verdicts[name] = ("ok", f"within {spec}" if spec else "ok")
    cuda = found.get("torch_cuda")
    if driver and cuda:
        family = compat["driver_for_cuda_major"].get(cuda.split(".")[0])
        release = compat["driver_for_cuda"].get(cuda)
        if family and _older(driver, family):
            verdicts["driver"] = ("fail", f"torch's CUDA {cuda} needs driver >= {family}; update the driver or "
                                          "install a torch built for an older CUDA")
        elif release and _older(driver, release):
            verdicts["driver"] = ("warn", f"below CUDA {cuda}'s {release}: runs by minor-version compatibility, "
                                          "without PTX JIT (new kernels may fail to load)")
        else:
            verdicts["driver"] = ("ok", f"runs torch's CUDA {cuda}")
    elif driver:
        verdicts["driver"] = ("ok", "present")
    return verdicts


def gpu_findings(gpus: list[dict[str, Any]], compat: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for g in gpus:
        who = f"GPU {g['index']} ({g['name']})"
        spec = _catalog(g["name"])
        width, widest = g.get("pcie_width"), g.get("pcie_width_max")
        if width and widest and width < widest:
            out.append(finding("warn", "gpu", f"{who}: PCIe link at x{width} of x{widest}: it trained narrower than "
                                              "the slot allows (riser, seating, a shared slot); host and P2P copies "
                                              f"run at {width / widest:.0%} speed"))
        card_lanes = int(spec["pcie"].split(" x")[1]) if spec else None
        if spec and widest and card_lanes and widest < card_lanes:
            out.append(finding("warn", "gpu", f"{who}: in an x{widest} slot; the card has x{card_lanes} "
                                              f"({pcie_gbs(spec) * widest / card_lanes:.1f} instead of "
                                              f"{pcie_gbs(spec):.1f} GB/s each way)"))
        gen, top = g.get("pcie_gen"), g.get("pcie_gen_max")
        if gen and top and gen < top:
            out.append(finding("note", "gpu", f"{who}: PCIe gen {gen} of {top} now; idle GPUs lower the link "
                                              "generation, so check under load (nvidia-smi -q -d PCIE)"))
        temperature = g.get("temperature_c")
        if temperature is not None and temperature >= compat["temperature_warn_c"]:
            out.append(finding("warn", "gpu", f"{who}: {temperature} C before any work; check cooling"))
        limit, default = g.get("power_limit_w"), g.get("power_limit_default_w")
        if limit and default and limit < compat["power_cap_warn_fraction"] * default:
            out.append(finding("warn", "gpu", f"{who}: power capped at {limit:.0f} of its {default:.0f} W; clocks "
                                              "drop under load (nvidia-smi -pl)"))
        if g.get("ecc") is False and spec and spec["class"] == "datacenter":
            out.append(finding("note", "gpu", f"{who}: ECC off"))
    return out


def _catalog(device_name: str) -> dict[str, Any] | None:
    key = match_gpu(device_name)
    return gpu_catalog()[key] if key else None


def hardware_findings(hardware: HardwareConfig, nvml: dict[str, Any], cuda: dict[str, Any],
                      env: dict[str, dict[str, str | None]]) -> list[dict[str, str]]:
    """The hardware option against this machine."""
    out, option = [], f"hardware={hardware.name}"
    present, gpus = cuda["devices"], nvml["gpus"]
    if gpus and not present:
        out.append(finding("fail", "software", f"NVML lists {len(gpus)} GPU(s) but torch sees none: a CPU build of "
                                               "torch, or CUDA_VISIBLE_DEVICES hides them"))
    if hardware.accelerator == "cuda":
        if present < hardware.devices:
            out.append(finding("warn", "hardware", f"{option} expects {hardware.devices} x {hardware.gpu} per node; "
                                                   f"this machine has {present} CUDA GPU(s): set "
                                                   f"hardware.devices={present or 1} or pick another hardware option"))
        found = {match_gpu(name) for name in cuda["names"]}
        if present and hardware.gpu not in found:
            out.append(finding("warn", "hardware", f"{option} plans for {hardware.gpu}; this machine has "
                                                   f"{', '.join(sorted(set(cuda['names'])))}"))
    elif present:
        out.append(finding("note", "hardware", f"{option} runs on the CPU; this machine has {present} CUDA GPU(s)"))
    nvlink = any(g.get("nvlink_active") for g in gpus)
    if hardware.interconnect == "nvlink" and gpus and not nvlink:
        out.append(finding("warn", "hardware", f"{option} assumes NVLink; no GPU has an active NVLink link "
                                               "(nvidia-smi topo -m)"))
    blocked = [p for p in cuda["p2p"] if not p["access"]]
    if present > 1 and blocked and hardware.interconnect == "nvlink":
        out.append(finding("warn", "hardware", f"peer access off between {len(blocked)} GPU pair(s), e.g. "
                                               f"{blocked[0]['from']}->{blocked[0]['to']}: NCCL copies through host "
                                               "memory"))
    p2p_off = (env.get("NCCL_P2P_DISABLE") or {}).get("effective") == "1"
    if p2p_off and nvlink:
        out.append(finding("warn", "network", "NCCL_P2P_DISABLE=1 while NVLink is active: NCCL routes through "
                                              "host memory instead of NVLink; unset it"))
    return out


def ifname_missing(value: str, interfaces: list[str], prefixes: bool) -> list[str]:
    """Names in an NCCL_SOCKET_IFNAME-style list (comma-separated prefixes; '=' exact; '^' excludes) or a
    GLOO_SOCKET_IFNAME list (exact names) that match no interface here."""
    if value.startswith("^"):
        return []  # an exclusion list names what not to use
    missing = []
    for item in filter(None, value.split(",")):
        exact = not prefixes or item.startswith("=")
        name = item.lstrip("=")
        if not any(i == name if exact else i.startswith(name) for i in interfaces):
            missing.append(item)
    return missing


def network_findings(hardware: HardwareConfig, env: dict[str, dict[str, str | None]],
                     net: dict[str, Any]) -> list[dict[str, str]]:
    out, interfaces = [], net["interfaces"]
    for variable, prefixes in (("NCCL_SOCKET_IFNAME", True), ("GLOO_SOCKET_IFNAME", False)):
        value = (env.get(variable) or {}).get("effective")
        if not value:
            continue
        missing = ifname_missing(value, list(interfaces), prefixes)
        if missing:
            out.append(finding("warn", "network", f"{variable}={value}: no interface {', '.join(missing)} on this "
                                                  f"machine (it has {', '.join(interfaces) or 'none'}); collectives "
                                                  "fail to start. Set it to the interface on the cluster network "
                                                  "(ip -br addr)"))
        for name in value.lstrip("^").split(","):
            state = (interfaces.get(name.lstrip("=")) or {}).get("state")
            if not value.startswith("^") and state == "down":
                out.append(finding("warn", "network", f"{variable}: interface {name} is down"))
    ib_disable = (env.get("NCCL_IB_DISABLE") or {}).get("effective")
    wants_ib = hardware.network == "infiniband" or ib_disable == "0" or (env.get("NCCL_IB_HCA") or {}).get("effective")
    if wants_ib and ib_disable != "1" and not net["infiniband"]:
        out.append(finding("warn", "network", "InfiniBand enabled (hardware.network="
                                              f"{hardware.network}, NCCL_IB_DISABLE={ib_disable or 'unset'}) but "
                                              "/sys/class/infiniband has no device: NCCL falls back to TCP sockets; "
                                              "on Ethernet set NCCL_IB_DISABLE=1"))
    if hardware.network == "infiniband" and ib_disable == "1" and net["infiniband"]:
        out.append(finding("warn", "network", "NCCL_IB_DISABLE=1 on an InfiniBand cluster: NCCL uses TCP"))
    return out


def allreduce_findings(hardware: HardwareConfig, sweep: dict[str, Any]) -> list[dict[str, str]]:
    if sweep.get("error"):
        return [finding("warn", "allreduce", f"the all-reduce sweep failed: {sweep['error']}")]
    if sweep.get("skipped"):
        return [finding("note", "allreduce", sweep["skipped"])]
    out = []
    if hardware.accelerator == "cuda" and sweep.get("backend") == "gloo":
        out.append(finding("note", "allreduce", "no GPU here: measured Gloo between CPU processes, not the links of "
                                                f"hardware={hardware.name}"))
    if hardware.num_nodes > 1 and sweep.get("nodes", 1) < 2:
        out.append(finding("note", "allreduce", f"hardware={hardware.name} spans {hardware.num_nodes} nodes; this "
                                                "sweep stayed on one. Run doctor under torchrun --nnodes "
                                                f"{hardware.num_nodes} to measure the network"))
    return out


def worst(findings: list[dict[str, str]]) -> str:
    return max((f["level"] for f in findings), key=LEVELS.index, default="ok")


HARDWARE_FIELDS = ("name", "accelerator", "gpu", "devices", "num_nodes", "interconnect", "network")


def _uuid(value: str | None) -> str | None:
    """NVML says 'GPU-<uuid>', torch '<uuid>'."""
    return value.lower().removeprefix("gpu-") if value else None


def visible_gpus(nvml: dict[str, Any], cuda: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """NVML lists every GPU of the machine, CUDA_VISIBLE_DEVICES or not: (the ones this process uses, the hidden
    ones), matched by UUID. Without UUIDs on either side all count as used."""
    used = {_uuid(u) for u in cuda.get("uuids") or [] if u}
    if not used or not all(g.get("uuid") for g in nvml["gpus"]):
        return nvml["gpus"], []
    return ([g for g in nvml["gpus"] if _uuid(g["uuid"]) in used],
            [g for g in nvml["gpus"] if _uuid(g["uuid"]) not in used])


def judge(hardware: HardwareConfig, found: dict[str, Any]) -> dict[str, Any]:
    """The report: the readings, a verdict per software line, and every finding, worst level first. GPU checks
    cover the GPUs this process can use; hidden ones are named in a note."""
    compat, found_nvml = compatibility(), found["nvml"]
    used, hidden = visible_gpus(found_nvml, found["cuda"])
    nvml = {**found_nvml, "gpus": used}
    versions = {**found["software"], **({"driver": nvml["driver"]} if nvml["driver"] else {})}
    verdicts = software_verdicts(found["software"], tested_ranges(), compat, nvml["driver"])
    findings = [finding(level, "software", f"{name} {versions.get(name)}: {text}")
                for name, (level, text) in verdicts.items() if level != "ok"]
    findings += hardware_findings(hardware, nvml, found["cuda"], found["env"])
    findings += gpu_findings(nvml["gpus"], compat)
    findings += network_findings(hardware, found["env"], found["network"])
    findings += allreduce_findings(hardware, found.get("allreduce", {}))
    if hidden:
        findings.append(finding("note", "gpu", f"{len(hidden)} more GPU(s) on this machine are hidden from this "
                                               f"process (CUDA_VISIBLE_DEVICES): "
                                               f"{', '.join(str(g['index']) for g in hidden)}; the checks cover the "
                                               f"{len(used)} it uses"))
    findings.sort(key=lambda f: -LEVELS.index(f["level"]))
    return {"hostname": found.get("hostname"),
            "hardware": {**{k: getattr(hardware, k) for k in HARDWARE_FIELDS}, "env": dict(hardware.env)},
            "software": {name: {"version": versions.get(name), "level": level, "verdict": text}
                         for name, (level, text) in verdicts.items()},
            "gpus": used, "hidden_gpus": hidden, "nvml_error": nvml["error"], "cuda": found["cuda"],
            "network": found["network"],
            "env": found["env"], "allreduce": found.get("allreduce", {}), "findings": findings,
            "verdict": worst(findings)}
