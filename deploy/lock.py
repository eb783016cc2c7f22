"""Write constraints.txt, the one set of versions `make setup`, CI and both images install with.

    python deploy/lock.py        # or: make lock (after a deliberate upgrade of the venv)

Two parts: the exact versions of the test venv (``pip freeze``, the three editable packages left
out), which the tests ran with; then the packages only an image installs (the trainer's
``[tensorboard]`` extra: installed in the venv it would make every test run write TensorBoard
logs), resolved by pip against the first part and pinned the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
IMAGE_ONLY = ["tensorboard>=2.14"]  # services/trainer/pyproject.toml, extra "tensorboard"
IMAGE_ONLY_HEADER = "# image-only: the trainer image's [tensorboard] extra, resolved against the pins above"
HEADER = """\
# The one set of versions (`make lock` writes it; deploy/lock.py says how). `make setup`, .ci/run (via
# make) and both Dockerfiles install with `pip install -c constraints.txt`; tests/test_packaging.py
# checks the images' torch against it and the locked transformers' torch requirement.
# Tested: the exact versions of the test venv (pip freeze, the editable packages left out)."""


def _pip(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], check=True, capture_output=True, text=True
    ).stdout


def main() -> int:
    frozen = [line for line in _pip("freeze", "--exclude-editable").splitlines() if "==" in line]
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp) / "pins.txt"
        pins.write_text("\n".join(frozen) + "\n")
        report = Path(tmp) / "report.json"
        _pip("install", "--dry-run", "--quiet", "--report", str(report), "-c", str(pins), *IMAGE_ONLY)
        extra = sorted(
            f"{item['metadata']['name']}=={item['metadata']['version']}"
            for item in json.loads(report.read_text())["install"]
        )
    LOCK.write_text("\n".join([HEADER, *frozen, IMAGE_ONLY_HEADER, *extra]) + "\n")
    print(f"wrote {LOCK.relative_to(ROOT)}: {len(frozen)} tested pins, {len(extra)} image-only")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
