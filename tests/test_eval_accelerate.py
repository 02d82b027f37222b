"""`accelerate launch -m fsdiff eval` on 2 CPU processes (gloo): each process scores every second episode and
the per-class intersections and unions are gathered, so the report equals the single-process one value by value.
The launcher setup is the one explained in ``test_augment_accelerate.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("accelerate", reason="accelerate is not installed: `pip install accelerate` to test the launcher")

import torch.distributed as dist  # noqa: E402

from conftest import free_port, launcher_env  # noqa: E402

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend (needed for 2 CPU processes)",
                allow_module_level=True)


def _classes(root: Path) -> Path:
    """Three classes (one subfolder each) of coloured squares of varied size and place on noise."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
        (root / "images" / f"c{c}").mkdir(parents=True)
        (root / "masks" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 90, (40, 56, 3), dtype=np.uint8)
            y, x, s = rng.integers(2, 14), rng.integers(2, 26), rng.integers(10, 24)
            img[y:y + s, x:x + s] = colour
            mask = np.zeros((40, 56), np.uint8)
            mask[y:y + s, x:x + s] = 255
            Image.fromarray(img).save(root / "images" / f"c{c}" / f"x{i}.png")
            Image.fromarray(mask).save(root / "masks" / f"c{c}" / f"x{i}.png")
    return root


def test_two_processes_give_the_single_process_report(tmp_path: Path) -> None:
    data = _classes(tmp_path / "ds")
    args = ["eval", "--dataset", "folder", "--root", str(data), "--episodes", "9", "--shots", "1",
            "--support-annotation", "box", "--visualize", "2", "--no-progress"]
    env = launcher_env()
    single = subprocess.run([sys.executable, "-m", "fsdiff", *args, "--out", str(tmp_path / "one")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes",
              "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", "1", "--main_process_ip", "127.0.0.1", "--main_process_port",
              str(free_port()), "-m", "fsdiff", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(launch, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    for key in ("miou", "fbiou", "per_class", "total_episodes", "episodes", "threshold", "encoder"):
        assert one[key] == two[key], key
    assert one["per_seed"][0]["queries"] == two["per_seed"][0]["queries"] == 9
    assert (tmp_path / "one" / "per_class.csv").read_text() == (tmp_path / "two" / "per_class.csv").read_text()
    for picture in ("per_class_iou.png", "episodes_best_worst.png"):
        a = np.asarray(Image.open(tmp_path / "one" / picture))
        b = np.asarray(Image.open(tmp_path / "two" / picture))
        assert np.array_equal(a, b), picture
