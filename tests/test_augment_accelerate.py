"""`accelerate launch -m fsdiff augment generate` on 2 CPU processes sharing one cache (scale-out of DifFSS pre-generation).

Real launcher, real tiny SD 1.5 + ControlNet (random weights, 64 px, 2 DDIM steps), real torch.distributed
(gloo). The work must be split between the two ranks with no (image, class, index) generated twice, the
shared cache must pass `fsdiff augment check`, and a second launch must generate nothing (all cache hits).

How the two CPU processes are started on accelerate 1.15: ``accelerate launch --cpu --num_processes 2`` uses
accelerate's *simple* launcher, which starts ONE process (multi-CPU there means mpirun with
``--mpirun_hostfile``); the local two-process launcher is torchrun, selected with ``--multi_gpu``, which on a
machine without a GPU starts the processes with ``WORLD_SIZE=2``/``RANK``/``LOCAL_RANK`` and leaves it to the
program to pick gloo (accelerate's ``PartialState`` does so only when constructed with ``cpu=True``). Each
rank's stdout (its JSON report) is written to its own file with ``--log_dir DIR --tee 3``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("accelerate", reason="accelerate is not installed: `pip install accelerate` to test the launcher")
pytest.importorskip("transformers", reason="transformers is not installed (needed by the tiny Stable Diffusion)")
pytest.importorskip("diffusers", reason="diffusers is not installed (needed by the tiny Stable Diffusion)")

import torch.distributed as dist  # noqa: E402

from conftest import free_port, launcher_env  # noqa: E402
from fsdiff.augment.pregenerate import check_cache, list_cache  # noqa: E402

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend (needed for 2 CPU processes)",
                allow_module_level=True)

N_IMAGES = 3
PER_SUPPORT = 2


def _folder(root: Path, n: int = N_IMAGES) -> Path:
    """A flat user folder (one class): n distinct images with a rectangle mask each."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 80, (40, 56, 3), dtype=np.uint8)
        img[8 + i:30, 12:44 - i] = (210, 60 + 30 * i, 40)
        Image.fromarray(img).save(root / "images" / f"x{i}.png")
        m = np.zeros((40, 56), np.uint8)
        m[8 + i:30, 12:44 - i] = 255
        Image.fromarray(m).save(root / "masks" / f"x{i}.png")
    return root


def _launch(tmp: Path, tag: str, data: Path, cache: Path, sd: Path, cn: Path) -> list[dict]:
    """One `accelerate launch` of 2 CPU processes; returns the two ranks' JSON reports (rank order)."""
    logs = tmp / f"logs-{tag}"
    cmd = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        "--log_dir", str(logs), "--tee", "3",
        "-m", "fsdiff", "augment", "generate", "--dataset", "folder", "--root", str(data),
        "--condition", f"seg:{PER_SUPPORT}", "--cache", str(cache), "--sd-model", str(sd), "--controlnet", str(cn),
        "--steps", "2", "--resolution", "64", "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=tmp, env=launcher_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"accelerate launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    reports = []
    for rank in range(2):
        found = sorted(logs.glob(f"*/attempt_*/{rank}/stdout.log"))
        assert len(found) == 1, f"rank {rank}: expected one stdout log under {logs}, found {found}; stderr:\n{proc.stderr[-3000:]}"
        text = found[0].read_text()
        reports.append(json.loads(text[text.index("{"):]))
    return reports


def test_accelerate_launch_two_cpu_processes_share_one_cache(tmp_path: Path) -> None:
    from fsdiff.diffusion.tiny import build_tiny_controlnet, build_tiny_stable_diffusion

    t0 = time.perf_counter()
    sd = build_tiny_stable_diffusion(tmp_path / "models" / "sd")
    cn = build_tiny_controlnet(tmp_path / "models" / "cn")
    data = _folder(tmp_path / "ds")
    cache = tmp_path / "cache"

    reps = _launch(tmp_path, "first", data, cache, sd, cn)
    # Two real ranks of one world of 2, each with its own half of the (image, class) items.
    assert [tuple(r["shard"]) for r in reps] == [(0, 2), (1, 2)], (
        f"each process must get its own shard of 2, got {[r['shard'] for r in reps]}: the processes did not "
        "see the torchrun world (accelerate's PartialState needs cpu=True to use gloo on a machine without a GPU)"
    )
    items = [{tuple(x) for x in r["items"]} for r in reps]
    assert all(r["total_items"] == N_IMAGES for r in reps)
    assert items[0].isdisjoint(items[1]) and len(items[0] | items[1]) == N_IMAGES
    assert [r["assigned"] for r in reps] == [2, 1]
    assert all(not r["failed"] and r["cached"] == 0 for r in reps)
    gen = [set(r["generated_keys"]) for r in reps]
    assert [r["generated"] for r in reps] == [2 * PER_SUPPORT, 1 * PER_SUPPORT]
    assert gen[0].isdisjoint(gen[1]), "an image was generated by both ranks"

    # The shared cache holds each (image, class, index) exactly once, written by the rank that owns it.
    rows = list_cache(cache)
    assert len(rows) == N_IMAGES * PER_SUPPORT and {r["key"] for r in rows} == gen[0] | gen[1]
    triples = [(r["support"], r["class_name"], r["index"]) for r in rows]
    assert len(set(triples)) == len(triples) == N_IMAGES * PER_SUPPORT
    assert sorted({r["index"] for r in rows}) == list(range(PER_SUPPORT))
    pids = {}
    for key in gen[0] | gen[1]:
        meta = json.loads((cache / key[:2] / key / "meta.json").read_text())["meta"]
        pids.setdefault(0 if key in gen[0] else 1, set()).add(meta["pid"])
    assert len(pids[0]) == len(pids[1]) == 1 and pids[0].isdisjoint(pids[1]), f"writer pids per rank: {pids}"
    report = check_cache(cache)
    assert report["ok"] and report["entries"] == N_IMAGES * PER_SUPPORT and not report["partial_files"], report

    # Same launch again: every image is a cache hit, nothing is generated, the cache is unchanged.
    again = _launch(tmp_path, "second", data, cache, sd, cn)
    assert [tuple(r["shard"]) for r in again] == [(0, 2), (1, 2)]
    assert [r["generated"] for r in again] == [0, 0]
    assert [r["cached"] for r in again] == [2 * PER_SUPPORT, 1 * PER_SUPPORT]
    assert set(again[0]["keys"]) | set(again[1]["keys"]) == gen[0] | gen[1]
    assert len(list_cache(cache)) == N_IMAGES * PER_SUPPORT and check_cache(cache)["ok"]
    print(f"two accelerate launches of 2 CPU processes: {time.perf_counter() - t0:.1f} s")
