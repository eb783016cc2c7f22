"""Both command lines answer --help at once in plain text, and refuse a bad environment variable or a
missing model path with one line naming it (exit status 2), before Redis, torch or diffusers start."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from starlette.testclient import TestClient

from actgen_generator.api import create_app
from actgen_generator.serve import docs_note
from actgen_shared.settings import Settings

HEAVY = ("torch", "diffusers", "transformers", "uvicorn", "redis")
# What python -c pass costs, times this, bounds a CLI's --help: importing torch and diffusers for the
# help text (before: 7 s, about 300x) fails it; the light path measures about 5x on a 2-core machine.
HELP_RATIO = 25.0
CLIS = {
    "actgen_generator.cli": "actgen-generator",
    "actgen_trainer.cli": "actgen-trainer",
    "actgen_lab.cli": "actgen-lab",
}


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _best_of(code: str, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        done = _python(code)
        best = min(best, time.perf_counter() - start)
        assert done.returncode == 0, done.stderr
    return best


def _main_then_modules(module: str, argv: list[str]) -> str:
    """Code that runs ``module``'s main(argv) and prints which heavy modules it imported, then exits with its code."""
    return (
        "import sys\n"
        f"from {module} import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"print('IMPORTED', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "sys.exit(code)\n"
    )


@pytest.mark.parametrize("module", sorted(CLIS))
def test_help_is_plain_text_and_imports_nothing_heavy(module: str) -> None:
    done = _python(_main_then_modules(module, ["--help"]))
    assert done.returncode == 0, done.stderr
    assert "IMPORTED []" in done.stdout, done.stdout
    assert f"usage: {CLIS[module]}" in done.stdout and "``" not in done.stdout  # no reST markup
    baseline = _best_of("pass")
    helped = _best_of(f"from {module} import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert helped / baseline < HELP_RATIO, f"--help took {helped:.3f}s, python -c pass {baseline:.3f}s"


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("actgen_generator.cli", ["serve", "--port", "1"]),
        ("actgen_trainer.cli", ["train", "--config", "configs/demo.yaml"]),
        ("actgen_lab.cli", ["ablate", "--arms", "real"]),  # it starts a generator that reads them all
    ],
)
def test_a_bad_environment_variable_is_one_line_and_exit_2(module: str, argv: list[str]) -> None:
    done = _python(_main_then_modules(module, argv), env={"ACTGEN_MAX_BATCH": "abc"})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "environment variable ACTGEN_MAX_BATCH" in lines[0] and "'abc'" in lines[0]
    if module == "actgen_generator.cli":  # refused before Redis, torch or uvicorn
        assert "IMPORTED []" in done.stdout and "embedded Redis" not in done.stdout


def test_serve_refuses_a_missing_model_path_before_anything_starts() -> None:
    done = _python(_main_then_modules("actgen_generator.cli", ["serve", "--model", "/no/such/dir"]))
    assert done.returncode == 2
    assert done.stderr.strip() == "actgen-generator serve: error: model path /no/such/dir does not exist"
    assert "IMPORTED []" in done.stdout and "embedded Redis" not in done.stdout


def test_the_start_banner_says_who_may_read_the_docs(redis_url: str, key_prefix: str) -> None:
    """With a key the docs need it (401 without), unless ACTGEN_PUBLIC_DOCS=1; the banner says which."""
    keyed = Settings(redis_url=redis_url, key_prefix=key_prefix, api_key="k")
    public = keyed.model_copy(update={"public_docs": True})
    assert "with the API key" in docs_note(keyed) and "ACTGEN_PUBLIC_DOCS=1" in docs_note(keyed)
    assert docs_note(public) == docs_note(keyed.model_copy(update={"api_key": None})) == "docs at /docs"
    with TestClient(create_app(keyed, worker=False)) as client:
        assert client.get("/docs").status_code == 401
        assert client.get("/docs", headers={"Authorization": "Bearer k"}).status_code == 200
    with TestClient(create_app(public, worker=False)) as client:
        assert client.get("/docs").status_code == 200
