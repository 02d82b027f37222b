"""Shared fixtures: the real annotated data in ../shared/data (skipped with a reason where absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The shared real-data folder: $FSDIFF_SHARED_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("FSDIFF_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test where the folder is missing (a user's machine)."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data folder ../shared/data is absent (set FSDIFF_SHARED_DATA to run these tests)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use tiny tensors: one intra-op thread avoids thread contention that makes them far slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_folder_dataset(root: Path, n: int = 4, height: int = 48, width: int = 48) -> Path:
    """A user-folder dataset (images/x{i}.png + masks/x{i}.png): a red box object on dark noise, seeded."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    y0, y1, x0, x1 = height // 4, 3 * height // 4, width // 4, 3 * width // 4
    for i in range(n):
        img = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
        img[y0:y1, x0:x1] = (205, 55, 40)
        Image.fromarray(img).save(root / "images" / f"x{i}.png")
        mask = np.zeros((height, width), np.uint8)
        mask[y0:y1, x0:x1] = 255
        Image.fromarray(mask).save(root / "masks" / f"x{i}.png")
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a launcher's rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_env() -> dict[str, str]:
    """The environment of an `accelerate launch` child: no inherited launcher variables, this checkout's src, no GPU."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module (benchmarks are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
