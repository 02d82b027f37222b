"""Project invariants: CI runs exactly the README's test command; the package ships its examples."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick, flags=re.S)


def test_readme_gives_two_commands_and_ci_runs_the_test_one():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "fsdiff demo" in cmds[0]
    assert "pytest" in cmds[1]
    ci_lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    assert cmds[1].strip() in ci_lines


def test_bundled_examples_exist_and_are_licensed():
    ex = REPO / "src" / "fsdiff" / "assets" / "examples"
    manifest = json.loads((ex / "examples.json").read_text())
    licences = (ex / "LICENSES.md").read_text()
    for photo in manifest["photos"].values():
        assert (ex / photo["image"]).is_file() and (ex / photo["mask"]).is_file(), photo
        assert f"| {photo['image']} |" in licences, f"{photo['image']} has no licence line"
    shipped = {p.name for p in ex.iterdir()} - {"examples.json", "LICENSES.md"}
    listed = {v for photo in manifest["photos"].values() for v in photo.values()}
    assert shipped == listed, "every bundled file is a listed photo or mask"


_DESIGN_NOTE = "METHODS" + ".md"
"""The name of the methods design note; spelled in two parts so that this file never mentions it itself."""


def _scanned_files() -> list[Path]:
    """README.md and every file under src/, tests/, benchmarks/, docs/ (bytecode caches left out)."""
    files = [REPO / "README.md"]
    for top in ("src", "tests", "benchmarks", "docs"):
        for path in sorted((REPO / top).rglob("*")):
            parts = path.relative_to(REPO).parts
            if path.is_file() and "__pycache__" not in parts and not any(p.endswith(".egg-info") for p in parts):
                files.append(path)
    return files


def test_no_citation_of_files_outside_the_repository():
    """Docstrings cite papers (arXiv id, section, equation) or the repository's own docs, never the methods design
    note that lives outside the repository: a mention of that name is allowed only as ``docs/<name>``, and only
    once that file exists in docs/."""
    in_repo = (REPO / "docs" / _DESIGN_NOTE).is_file()
    offending = []
    for path in _scanned_files():
        data = path.read_bytes()
        if b"\0" in data:  # binary: images, checkpoints
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            for match in re.finditer(re.escape(_DESIGN_NOTE), line):
                if in_repo and line[: match.start()].endswith("docs/"):
                    continue
                offending.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offending, (
        f"{len(offending)} mention(s) of a file outside the repository; cite the paper (arXiv id, section, "
        "equation), the reference code, or a docs/ file of this repository instead:\n" + "\n".join(offending)
    )
