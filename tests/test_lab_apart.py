"""The lab stays apart from the product: no module of the services or of shared imports it, and
the trainer still finds the lab's data set through its entry point (lab/pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from actgen_trainer.config import DataConfig
from actgen_trainer.data import DataError, load_sources, plugin_sources

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("services", "shared")


def lab_imports(path: Path) -> list[str]:
    """The ``actgen_lab`` imports of one module, as ``line: module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found += [f"{node.lineno}: {n}" for n in names if n == "actgen_lab" or n.startswith("actgen_lab.")]
    return found


def test_lab_imports_are_found_by_hand(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom actgen_lab.oracle import x\ndef f():\n    import actgen_lab\n")
    assert lab_imports(module) == ["2: actgen_lab.oracle", "4: actgen_lab"]


def test_no_service_or_shared_module_imports_the_lab() -> None:
    modules = [p for top in PRODUCT for p in (REPO / top).rglob("*.py") if ".egg-info" not in str(p)]
    assert len(modules) > 50  # the packages were found
    offenders = {str(p.relative_to(REPO)): hits for p in modules if (hits := lab_imports(p))}
    assert offenders == {}


def test_the_trainer_loads_the_backgrounds_through_the_entry_point() -> None:
    train, test = load_sources(DataConfig(dataset="backgrounds"))  # v3: 300 validation images follow
    assert len(train) == 1438 + 300 and len(test) == 7180 and train.classes[3] == "three"
    train, _ = load_sources(DataConfig(dataset="backgrounds-v2"))
    assert len(train) == 1438
    train, test = load_sources(DataConfig(dataset="backgrounds-shift"))  # the slice and test: the shift
    assert len(train) == 1438 + 300 and len(test) == 7180


def test_an_unregistered_data_set_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    cfg = DataConfig(dataset="backgrounds")  # registered when the config is read ...
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    with pytest.raises(ValidationError, match="data.dataset=backgrounds is neither built in"):
        DataConfig(dataset="backgrounds")  # ... a config read without the lab names what to install
    with pytest.raises(DataError, match="data.dataset=backgrounds comes from a package"):
        plugin_sources(cfg)  # ... and one read before it went, when the data set loads
