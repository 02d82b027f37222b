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
