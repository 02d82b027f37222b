"""`accelerate launch -m fsdiff train diffup` on 2 CPU processes: one world of 2 with averaged gradients.

The trainer's Accelerator is built with ``cpu=True`` where there is no GPU (``fsdiff.distributed.use_cpu``);
without it accelerate ignores the torchrun world on a GPU-less machine and each process trains its own
model alone, both writing the same run folder. The launcher setup is the one explained in
``test_augment_accelerate.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("accelerate", reason="accelerate is not installed: `pip install accelerate` to test the launcher")
pytest.importorskip("diffusers", reason="diffusers is not installed (DiffUp's models are diffusers ModelMixins)")

import torch.distributed as dist  # noqa: E402

from conftest import free_port, launcher_env, write_folder_dataset  # noqa: E402

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend (needed for 2 CPU processes)",
                allow_module_level=True)


def test_accelerate_launch_trains_diffup_on_two_cpu_processes(tmp_path: Path) -> None:
    data = write_folder_dataset(tmp_path / "ds", n=4)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        "-m", "fsdiff", "train", "diffup", "--dataset", "folder", "--root", str(data), "--input-size", "64",
        "--steps", "2", "--batch-size", "1", "--warmup", "0", "--save-every", "1", "--threads", "1",
        "--no-progress", "--out", str(out),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"accelerate launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    doc = json.loads((out / "final" / "fsdiff_checkpoint.json").read_text())
    assert doc["provenance"]["trainer"]["num_processes"] == 2, (
        "the two processes did not form one world of 2 (the trainer's Accelerator needs cpu=True without a GPU)"
    )
    # One writer: the log holds each step once, the resumable checkpoints record both ranks' RNG states.
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2] and all(np.isfinite(r["loss"]) for r in log)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert sorted(state["rng"]) == ["0", "1"] and state["settings"]["num_processes"] == 2
    assert not list(out.glob(".*tmp*"))
