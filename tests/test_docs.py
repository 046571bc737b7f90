"""The docs hold together: every relative link and every repository path named in README.md and docs/*.md
exists, README.md fits a first read, and no file of the repository refers to design notes outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A path written in backticks, from the repository root: a top-level folder or file of this repository.
TOP = ("leaf_ray/", "configs/", "docs/", "tests/", "jobs/", "scripts/", "kuberay/", ".ci/")
TOP_FILES = {"Makefile", "pyproject.toml", "constraints.txt", "README.md"}
CODE_PATH = re.compile(r"`([A-Za-z0-9_./-]+)`")


def named_paths(page: Path) -> list[tuple[str, Path]]:
    """(as written, resolved) for each relative link (from the page's folder) and each backticked repo path
    (from the repository root) of a page; `::name` suffixes and `#anchors` are cut."""
    text = page.read_text(encoding="utf-8")
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        out.append((target, page.parent / target.split("#", 1)[0]))
    for token in CODE_PATH.findall(text):
        path = token.split("::", 1)[0]
        if (path.startswith(TOP) or path in TOP_FILES) and "*" not in path:
            out.append((token, REPO / path))
    return out


def test_every_link_and_path_in_the_docs_exists():
    assert len(PAGES) >= 10
    missing = [f"{page.relative_to(REPO)}: {written}" for page in PAGES for written, path in named_paths(page)
               if not path.exists()]
    assert not missing, "named in the docs but not in the repository:\n" + "\n".join(missing)
    # the check sees what it should: README links the docs pages, ARCHITECTURE.md names the packages
    assert any(w == "docs/design.md" for w, _ in named_paths(REPO / "README.md"))
    assert any(w == "leaf_ray/experiments/focus/" for w, _ in named_paths(REPO / "docs" / "ARCHITECTURE.md"))


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / w).resolve() for w, _ in named_paths(REPO / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_readme_fits_a_first_read():
    size = len((REPO / "README.md").read_bytes())
    assert size <= 14 * 1024, f"README.md is {size} bytes; move detail to a docs/ page and link it"


def test_no_file_refers_to_notes_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\.\./shared|/work/shared|DESIGN §|DESIGN\.md|ENVIRONMENT\.md")
    hits = []
    for name in files:
        path = REPO / name
        if name == "tests/test_docs.py" or not path.is_file() or path.suffix in (".png", ".safetensors"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not hits, "references to design notes outside the repository (use docs/design.md or " \
                     "docs/environment.md and a section):\n" + "\n".join(hits)
