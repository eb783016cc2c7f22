"""The words stay true: the README's shape, and every file the docs name exists in the repository."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a repository path in backticks or bare: docs/x.md, examples/y.py, configs/z.yaml, ...
PATH = re.compile(
    r"(?<![\w/.-])((?:docs|examples|configs|bench|deploy|models|tests|shared|services)/[\w./-]*\w)"
)


def test_readme_is_short_and_puts_serve_train_own_loop_and_rest_first() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines (at most 300)"
    headings = {line[3:].strip(): n for n, line in enumerate(lines, 1) if line.startswith("## ")}
    for wanted in (
        "The two commands",
        "On your GPU box",
        "With your data",
        "From your own training loop",
        "REST",
    ):
        assert wanted in headings, f"README.md lacks the section {wanted!r}"
        assert headings[wanted] <= 150, f"README.md's {wanted!r} starts at line {headings[wanted]}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_a_document_names_exists(doc: Path) -> None:
    text = doc.read_text()
    missing = sorted(
        {m for m in PATH.findall(text) if "*" not in m and "<" not in m and not (ROOT / m).exists()}
    )
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_no_tracked_file_cites_a_document_outside_the_repository() -> None:
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    citing = []
    for name in files:
        if name == "tests/test_docs.py" or not name.endswith(
            (".py", ".md", ".yaml", ".yml", ".toml", ".lua", ".sh", "Makefile")
        ):
            continue
        text = (ROOT / name).read_text(errors="replace")
        if "DESIGN.md" in text or "../shared/" in text:
            citing.append(name)
    assert not citing, f"these cite a file outside the repository (use docs/architecture.md): {citing}"
