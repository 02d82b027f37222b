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
    for ep in manifest["episodes"]:
        for item in ep["support"] + ep["queries"]:
            for key in ("image", "mask", "reference_mask"):
                if key in item:
                    assert (ex / item[key]).is_file(), item[key]
                    assert item[key] in licences, f"{item[key]} has no licence line"
