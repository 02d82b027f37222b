"""BAFT priors against direct numpy loops on tiny tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsdiff.errors import FsdiffError
from fsdiff.priors import (
    masked_average_pooling,
    minmax_normalise,
    pixel_max_cosine,
    prototype_cosine,
    region_weights,
)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6))


@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, 4, generator=g), torch.randn(5, 4, 3, generator=g)  # query (C,h,w), support (C,hs,ws)


def test_region_weights_area_is_block_fraction():
    region = np.zeros((4, 6), bool)
    region[:2, :3] = True
    region[2, 3] = True
    w = region_weights(region, (2, 3))
    expected = np.array([[1.0, 0.5, 0.0], [0.0, 0.25, 0.0]])
    np.testing.assert_allclose(w.numpy(), expected, atol=1e-6)
    assert region_weights(region, (4, 6)).dtype == torch.float32  # same size passes through
    wb = region_weights(region, (2, 3), mode="bilinear")
    assert wb.shape == (2, 3) and float(wb.min()) >= 0 and float(wb.max()) <= 1
    with pytest.raises(FsdiffError, match="2-D"):
        region_weights(np.zeros((2, 2, 2)), (1, 1))
    with pytest.raises(FsdiffError, match="mode"):
        region_weights(region, (2, 3), mode="nearest")


def test_masked_average_pooling_matches_loop(feats):
    _, s = feats
    w = torch.rand(4, 3, generator=torch.Generator().manual_seed(1))
    got = masked_average_pooling(s, w).numpy()
    sn, wn = s.numpy(), w.numpy()
    exp = np.zeros(5)
    for y in range(4):
        for x in range(3):
            exp += wn[y, x] * sn[:, y, x]
    exp /= wn.sum() + 1e-6
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
    batched = masked_average_pooling(torch.stack([s, 2 * s]), torch.stack([w, w]))
    np.testing.assert_allclose(batched[1].numpy(), 2 * exp, rtol=1e-5, atol=1e-6)
    with pytest.raises(FsdiffError, match="resize"):
        masked_average_pooling(s, torch.ones(2, 2))


def test_prototype_cosine_matches_loop(feats):
    q, s = feats
    p = s[:, 0, 0]
    got = prototype_cosine(q, p).numpy()
    qn, pn = q.numpy(), p.numpy()
    for y in range(3):
        for x in range(4):
            assert got[y, x] == pytest.approx(_cos(qn[:, y, x], pn), abs=1e-5)
    with pytest.raises(FsdiffError, match="prototype"):
        prototype_cosine(q, torch.ones(4))


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
def test_pixel_max_cosine_matches_loop(feats, chunk):
    q, s = feats
    region = torch.tensor([[1.0, 0.6, 0.0], [0.4, 0.0, 0.0], [0.0, 0.0, 0.9], [0.0, 0.2, 0.0]])
    got = pixel_max_cosine(q, s, region, threshold=0.5, chunk_elements=chunk).numpy()
    qn, sn, rn = q.numpy(), s.numpy(), region.numpy()
    cells = [(y, x) for y in range(4) for x in range(3) if rn[y, x] >= 0.5 * rn.max()]
    assert len(cells) == 3
    for y in range(3):
        for x in range(4):
            exp = max(_cos(qn[:, y, x], sn[:, sy, sx]) for sy, sx in cells)
            assert got[y, x] == pytest.approx(exp, abs=1e-5)


def test_pixel_max_cosine_sparse_and_empty_regions(feats):
    q, s = feats
    sparse = torch.zeros(4, 3)
    sparse[1, 1] = 0.1  # a thin stroke covering 10% of one cell still counts
    got = pixel_max_cosine(q, s, sparse)
    np.testing.assert_allclose(got.numpy(), prototype_cosine(q, s[:, 1, 1]).numpy(), atol=1e-5)
    assert torch.all(pixel_max_cosine(q, s, torch.zeros(4, 3)) == -1)
    with pytest.raises(FsdiffError, match="support grid"):
        pixel_max_cosine(q, s, torch.ones(3, 3))
    with pytest.raises(FsdiffError, match="same C"):
        pixel_max_cosine(q, s[:4], torch.ones(4, 3))


def test_self_match_is_one(feats):
    _, s = feats
    got = pixel_max_cosine(s, s, torch.ones(4, 3))
    np.testing.assert_allclose(got.numpy(), np.ones((4, 3)), atol=1e-5)


def test_minmax_normalise():
    x = torch.tensor([[1.0, 3.0], [2.0, 5.0]])
    np.testing.assert_allclose(minmax_normalise(x).numpy(), [[0, 0.5], [0.25, 1]], atol=1e-6)
    per_row = minmax_normalise(x, dims=(1,))
    np.testing.assert_allclose(per_row.numpy(), [[0, 1], [0, 1]], atol=1e-6)
    assert torch.all(minmax_normalise(torch.full((2, 2), 7.0)) == 0)


def test_self_support_map_prototype_only_by_hand():
    """proto_weight = 1: only the mixed prototypes count, so no pixel-max map is needed; by hand."""
    from fsdiff.priors import self_support_map

    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 3, 3, generator=g)
    est = torch.tensor([[0.9, 0.8, 0.1], [0.65, 0.2, 0.0], [0.5, 0.95, 0.3]])
    pf, pb = torch.randn(4, generator=g), torch.randn(4, generator=g)
    got = self_support_map(q, est, (pf, None), (pb, None), proto_weight=1.0, temperature=0.2, mix=0.25)
    qn = q.reshape(4, -1).numpy()
    e = est.reshape(-1).numpy()
    qf = qn[:, e > 0.7].mean(1)  # cells above SSP's 0.7
    qb = qn[:, e < 0.6].mean(1)  # cells below SSP's 0.6
    mf, mb = 0.25 * pf.numpy() + 0.75 * qf, 0.25 * pb.numpy() + 0.75 * qb
    cos = lambda v: (qn.T @ v) / (np.linalg.norm(qn, axis=0) * np.linalg.norm(v))  # noqa: E731
    exp = 1 / (1 + np.exp(-(cos(mf) - cos(mb)) / 0.2))
    np.testing.assert_allclose(got.reshape(-1).numpy(), exp, atol=1e-5)
    with pytest.raises(FsdiffError, match="pixel-max"):
        self_support_map(q, est, (pf, None), (pb, None), proto_weight=0.5)
