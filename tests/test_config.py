"""Config composition: every option of every group (discovered from conf/), a pairwise matrix, the user's example."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dsrun.config import PENDING, validate
from dsrun.schema import register_configs
from dsrun.resolve import resolve
from dsrun.errors import ConfigError
from dsrun.hardware import gpu_catalog
from tests.conftest import REPO, dsrun

CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "recipe"))  # +recipe= below


def options(group: str) -> list[str]:
    return sorted(p.relative_to(CONF / group).with_suffix("").as_posix() for p in (CONF / group).rglob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_context():
    """One Hydra context for the module: initialising it per test costs more than composing."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def composed(*overrides: str):
    return compose(config_name="config", overrides=["hardware=cpu", *overrides])


def check(cfg) -> None:
    resolve(cfg)
    validate(cfg, gpu_catalog())


EVERY_OPTION = [(group, option) for group in GROUPS for option in options(group)]


def test_groups_are_the_documented_ones():
    assert set(GROUPS) >= {"hardware", "parallel", "precision", "quant", "model", "monitor", "data", "optim", "train",
                           "task", "adapter"}
    assert len(EVERY_OPTION) > 50


# What a CPU machine refuses for an option on its own (with defaults elsewhere), and the words it says so with.
EXPECTED_REFUSALS = {
    ("parallel", "zero2"): "DeepSpeed needs CUDA GPUs",
    ("parallel", "zero3"): "DeepSpeed needs CUDA GPUs",
    ("parallel", "zero3_offload"): "DeepSpeed needs CUDA GPUs",
    ("precision", "fp16"): "fp16 autocast needs a GPU",
    ("precision", "fp8"): "fp8 needs a Hopper or Ada GPU",
    ("quant", "int8"): "add adapter=lora",
    ("quant", "nf4"): "add adapter=lora",
    ("data", "jsonl"): "set data.path",
    ("parallel", "tp"): "tensor parallel covers dense attention/MLP models",
    ("task", "export"): "task=export needs task.source=RUN_DIR",
}


@pytest.mark.parametrize("group,option", EVERY_OPTION, ids=[f"{g}={o}" for g, o in EVERY_OPTION])
def test_every_option_composes_and_validates_or_is_refused_with_its_message(group, option):
    overrides = [f"{group}={option}"]
    if group == "hardware" and option not in ("cpu", "auto"):
        overrides.append("precision=bf16")
    cfg = composed(*overrides)
    expected = [msg for (g, o), msg in EXPECTED_REFUSALS.items() if (g, o) == (group, option)]
    pending = [f"lands with {issue}" for (g, o), issue in PENDING.items() if (g, o) == (group, option)]
    if group == "parallel" and option.startswith("zero"):
        pending = []  # refused on CPU before its landing matters
    try:
        check(cfg)
    except ConfigError as exc:
        wanted = expected + pending
        assert wanted, f"{group}={option} refused unexpectedly: {exc}"
        assert any(w in str(exc) for w in wanted), str(exc)
    else:
        assert not expected and not pending, f"{group}={option} should be refused"


HARDWARE = [o for o in options("hardware") if o != "auto"]


def all_pairs(factors: list[list[str]]) -> list[tuple[str, ...]]:
    """A small set of rows in which every pair of values of any two factors appears at least once (greedy)."""
    n = len(factors)
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(n), 2) for a in factors[i] for b in factors[j]}
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row: list = [None] * n
        row[i], row[j] = a, b
        for k in range(n):
            if row[k] is None:
                row[k] = max(factors[k], key=lambda v, k=k: sum(
                    (min(p, k), row[p] if p < k else v, max(p, k), v if p < k else row[p]) in uncovered
                    for p in range(n) if row[p] is not None))
        uncovered -= {(p, row[p], q, row[q]) for p, q in itertools.combinations(range(n), 2)}
        rows.append(tuple(row))
    return rows


PAIRS = all_pairs([HARDWARE, options("parallel"), options("precision"), options("quant")])


@pytest.mark.parametrize("hw,par,prec,quant", PAIRS)
def test_pairwise_matrix_composes_and_every_refusal_is_one_actionable_line(hw, par, prec, quant):
    """Every pair of hardware, parallel, precision and quant options appears in some row: each row composes, and
    either validates or every problem is a single line naming the key."""
    cfg = composed(f"hardware={hw}", f"parallel={par}", f"precision={prec}", f"quant={quant}", "adapter=lora")
    try:
        check(cfg)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert "\n" not in problem
            assert "=" in problem.split(":")[0] or problem.split(":")[0].count(".") >= 1, problem


def test_pairwise_matrix_covers_every_pair():
    factors = [HARDWARE, options("parallel"), options("precision"), options("quant")]
    for i, j in itertools.combinations(range(4), 2):
        assert {(row[i], row[j]) for row in PAIRS} == set(itertools.product(factors[i], factors[j]))
    assert len(PAIRS) < 0.25 * len(list(itertools.product(*factors))), "pairwise, not the full product"


def test_gpu_hardware_options_name_a_catalog_gpu_and_ethernet_clusters_set_nccl():
    for option in HARDWARE:
        cfg = composed(f"hardware={option}")
        if cfg.hardware.accelerator == "cuda":
            assert cfg.hardware.gpu in gpu_catalog(), option
        if cfg.hardware.network == "ethernet":
            assert cfg.hardware.env["NCCL_IB_DISABLE"] == "1"
            assert "NCCL_SOCKET_IFNAME" in cfg.hardware.env


def test_users_example_composes_and_validates_on_cpu():
    proc = dsrun("hardware=4x4090", "parallel=fsdp", "precision=bf16", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "gpu: rtx4090" in proc.stdout and "strategy: fsdp" in proc.stdout and "mode: bf16-mixed" in proc.stdout


def test_dry_run_prints_resolved_config_and_global_batch(tmp_path):
    proc = dsrun("hardware=4x4090", "parallel=fsdp", "precision=bf16", "task=dry_run", "train.accumulation=2",
                 run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "global batch 32 = micro_batch 4 x accumulation 2 x data-parallel 4" in proc.stdout
    assert "config valid" in proc.stdout


RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe):
    cfg = compose(config_name="config", overrides=[f"+recipe={recipe}", "task=dry_run"])
    check(cfg)
    first_line = (REPO / "recipes" / f"{recipe}.yaml").read_text().splitlines()[1]
    assert first_line.startswith("# ") and len(first_line) > 20, "each recipe says what it is in one line"
    assert cfg.hardware.name != "auto", "a recipe names its hardware"


def test_auto_hardware_keeps_the_devices_the_user_gave(monkeypatch):
    """On a 2-GPU box `hardware=auto hardware.devices=1` is one process (it used to mean "all GPUs"); unset, every
    GPU found. detect() is this machine's answer, replaced by a 2-GPU box's."""
    from dsrun import hardware

    monkeypatch.setattr(hardware, "detect", lambda: {"accelerator": "cuda", "devices": 2, "gpu": "h200",
                                                     "device_name": "NVIDIA H200"})
    one = composed("hardware=auto", "hardware.devices=1")
    resolve(one)
    assert (one.hardware.devices, one.parallel.strategy) == (1, "single")
    every = composed("hardware=auto")
    resolve(every)
    assert (every.hardware.devices, every.parallel.strategy) == (2, "ddp")
