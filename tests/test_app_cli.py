"""``fsdiff app``: the subcommand's flags, and gradio staying out of every other command's imports."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

from fsdiff.cli import build_parser


def test_app_flags_and_defaults():
    args = build_parser().parse_args(["app"])
    assert (args.command, args.host, args.port, args.share) == ("app", "127.0.0.1", 7860, False)
    args = build_parser().parse_args(["app", "--host", "0.0.0.0", "--port", "9000", "--share"])
    assert (args.host, args.port, args.share) == ("0.0.0.0", 9000, True)


def test_gradio_is_imported_only_by_the_app():
    code = ("import sys, fsdiff, fsdiff.api, fsdiff.cli, fsdiff.app, fsdiff.app.actions\n"
            "from fsdiff.cli import build_parser\n"
            "build_parser().parse_args(['segment', '--support', 'a.jpg', '--box', '1,2,3,4', '--query', 'b.jpg', '--out', 'o'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'gradio_client')))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
