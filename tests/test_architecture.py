"""The import layers of dsrun/: every internal import points down (or within its layer), and there is no cycle.

The layers are written here once and in docs/architecture.md (a test compares the two). Imports inside functions
count like any other (they still run), and so do imports under `if TYPE_CHECKING:`: a type a module names in its
signatures is a dependency of its design even where it never runs, and hiding it there is how a layer leaks.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO

# Lowest first. A module may import modules of its own layer and of the layers below; a package (monitor/) covers
# its modules, and a package whose modules sit on several floors (run/) names each (run.ledger).
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["dsrun", "errors", "constants", "task_table", "signals", "lm", "run"]),
    ("tools", ["families", "precision", "hardware", "safe_read", "quiet", "run.files", "run.scratch", "help", "config_view",
               "allreduce", "chat", "loss", "grpo", "router_balance", "attention", "model_inputs", "packing", "activation_offload", "profiling", "run.ledger", "report"]),
    ("components", ["parallelize", "quantize", "adapters", "optim", "schedule", "sources", "data", "preference", "model",
                    "lora_folder", "run.checkpoint", "evaluate", "monitor/"]),
    ("schema", ["schema"]),
    ("processes", ["batch", "strategy"]),
    ("validation", ["config"]),
    ("planner", ["plan/"]),
    ("work", ["train", "reinforce", "export", "inference/", "doctor/", "resolve", "batch_size",
              "child", "sweep", "run.rollback", "run.folder", "keys", "paths"]),
    ("tasks", ["tasks"]),
    ("entry", ["cli", "__main__"]),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from pkg import module` counts as the module)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
                    break
        graph[name] = found
    return graph


def layer_of(module: str, package: str = "dsrun") -> int:
    short = module.removeprefix(package).lstrip(".") or package
    for i, (_, members) in enumerate(LAYERS):
        for member in members:
            name = member.rstrip("/")
            if short == name or (member.endswith("/") and short.startswith(name + ".")):
                return i
    raise AssertionError(f"{module}: in no layer; add it to LAYERS (tests/test_architecture.py) and to "
                         "docs/architecture.md")


def problems(graph: dict[str, set[str]]) -> list[str]:
    """Upward imports and cycles, one line each."""
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                found.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]}), a higher layer")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [component + component[:1] for component in components]


def test_imports_point_down_and_never_loop():
    assert problems(imports(REPO / "dsrun")) == []


def test_a_planted_back_import_and_a_cycle_are_found(tmp_path):
    """The test of the test: the real package copied, then a config module that imports the planner (upward) and
    a batch module that imports the config (a cycle with config -> batch)."""
    copy = tmp_path / "dsrun"
    shutil.copytree(REPO / "dsrun", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert problems(imports(copy)) == []
    with (copy / "config.py").open("a") as f:
        f.write("\n\ndef planned(cfg):\n    from dsrun.plan import plan  # deferred, still an import\n\n"
                "    return plan(cfg)\n")
    with (copy / "batch.py").open("a") as f:
        f.write("\nfrom dsrun import config  # noqa: E402\n")
    found = problems(imports(copy))
    assert "dsrun.config (validation) imports dsrun.plan (planner), a higher layer" in found
    assert "dsrun.batch (processes) imports dsrun.config (validation), a higher layer" in found
    assert any(p.startswith("import cycle:") and "dsrun.batch" in p and "dsrun.config" in p for p in found), found


def test_type_only_imports_are_counted():
    graph = imports_of_source("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dsrun.config import X\n")
    assert graph == {"dsrun.config"}


def imports_of_source(source: str) -> set[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "dsrun"
        root.mkdir()
        (root / "__init__.py").write_text("")
        (root / "config.py").write_text("")
        (root / "strategy.py").write_text(source)
        return imports(root)["dsrun.strategy"]


def test_the_layers_in_the_docs_are_the_layers_here():
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("<!-- layers -->")[1]
    rows = re.findall(r"^\| \d+ \| (\w+) \| (.*?) \|$", block, re.MULTILINE)
    documented = [(name, [m.strip().strip("`") for m in members.split(",")]) for name, members in rows]
    assert documented == list(reversed(LAYERS)) or documented == LAYERS, documented


@pytest.mark.parametrize("module", ["dsrun.config", "dsrun.task_table", "dsrun.batch"])
def test_the_low_modules_load_without_torch(module):
    """validate() and the registries it reads are importable without torch (the pre-check, --help)."""
    import subprocess
    import sys

    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_each_option_group_is_one_registry_that_validate_and_the_reference_read():
    """The allowed names of every option group are its builder's table: validate() refuses anything else, and the
    configuration reference lists exactly those names (no second list of them lives in config.py)."""
    from omegaconf import OmegaConf

    from dsrun.config import REGISTRIES, choice_problems
    from dsrun.schema import RunConfig

    reference = (REPO / "docs" / "configuration.md").read_text()
    config_source = (REPO / "dsrun" / "config.py").read_text()
    for key, table in REGISTRIES.items():
        row = next(line for line in reference.splitlines() if line.startswith("|") and f"`{key}`" in line)
        named = set(re.findall(r"`([\w.-]+)`", row.split("|")[2]))
        assert set(table) <= named, (key, set(table) - named)
        cfg = OmegaConf.structured(RunConfig)
        for name in table:  # every registry name is valid, and one outside it is refused naming them all
            OmegaConf.update(cfg, key, name, force_add=True)
            assert choice_problems(cfg, key) == []
        OmegaConf.update(cfg, key, "no_such_option", force_add=True)
        assert choice_problems(cfg, key) == [f"{key}=no_such_option: unknown; choose one of {', '.join(table)}"]
        quoted = ", ".join(f'"{name}"' for name in table)
        assert quoted not in config_source, f"config.py spells {key}'s names again"


def test_v3_router_biases_move_against_the_load_and_only_after_a_step():
    """Auxiliary-loss-free balancing: an expert the routers overload loses `rate` of bias, an underloaded one gains
    it (centred per layer); eval forwards count nothing; a skipped step changes nothing."""
    import torch

    from dsrun.model import architecture, build_model
    from dsrun.router_balance import BIAS, RouterBalance
    from tests.conftest import model_cfg

    tiny = model_cfg("tiny")
    model = build_model(tiny, architecture(tiny), seed=0)
    balance = RouterBalance(model, rate=0.01)
    assert balance.routers, "the tiny model's MoE layers have V3 routers"
    router = balance.routers[0]
    getattr(router, BIAS).copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # expert 0 wins every token's first pick
    ids = torch.randint(0, 1000, (2, 16))
    model.eval()
    with torch.no_grad():
        model(ids)
    assert router.dsrun_load.sum() == 0, "an eval forward counts nothing"
    model.train()
    model(ids)
    load = router.dsrun_load.clone()
    assert load.sum() == 2 * 16 * model.config.num_experts_per_tok and load[0] == 32
    balance.update(torch.tensor(False), lambda t: t)
    assert getattr(router, BIAS).tolist() == [5.0, 0.0, 0.0, 0.0] and router.dsrun_load.sum() == 0
    model(ids)
    load = router.dsrun_load.clone()
    balance.update(torch.tensor(True), lambda t: t)
    change = getattr(router, BIAS) - torch.tensor([5.0, 0.0, 0.0, 0.0])
    assert change[0] < 0 and abs(float(change.sum())) < 1e-6
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(change, expected - expected.mean())
    for parameter in model.parameters():  # a frozen base (an adapter's): its routers are left alone
        parameter.requires_grad_(False)
    assert RouterBalance(model, rate=0.01).routers == []
