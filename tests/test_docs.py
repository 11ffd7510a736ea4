"""Docs stay true to the code: every config key is documented; the README's commands are the CI's."""

from __future__ import annotations

from omegaconf import OmegaConf

from dsrun.schema import RunConfig
from tests.conftest import REPO


def leaf_keys(node, prefix=""):
    for key in node.keys():
        dotted = f"{prefix}{key}"
        value = node._get_node(key)
        if OmegaConf.is_dict(value) and key not in ("fields", "env"):
            yield from leaf_keys(value, dotted + ".")
        else:
            yield dotted


def test_configuration_reference_names_every_key():
    doc = (REPO / "docs" / "configuration.md").read_text()
    missing = [k for k in leaf_keys(OmegaConf.structured(RunConfig)) if f"`{k}`" not in doc]
    assert not missing, f"undocumented keys: {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    command = "./setup.sh --dev && .venv/bin/python -m pytest -q"
    assert command in readme
    assert command in (REPO / ".ci" / "run").read_text()
