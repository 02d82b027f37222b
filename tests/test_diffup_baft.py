"""DiffUp BAFT (fsdiff's reconstruction of arXiv 2407.16182, Fig. 3): priors against hand computation on tiny tensors,
backbone independence of the channel count, sparse-annotation regions, query info, the CLIP text prior."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsdiff.episode import BoxAnnotation, MaskAnnotation, PointsAnnotation, ScribbleAnnotation, TextAnnotation
from fsdiff.errors import FsdiffError
from fsdiff.features import Encoder
from fsdiff.methods.diffup.baft import (
    dilate_region,
    level_priors,
    load_text_prior,
    prior_type,
    query_extra,
    replicate_text,
    contrast_map,
    pooled_prior,
    shot_prior,
    support_region,
    support_regions,
)
from fsdiff.priors import pixel_max_cosine


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6))


def _minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / max(x.max() - x.min(), 1e-6)


def _hand_level(q: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[P_proto, P_pix] of one level by loops: weighted prototype, max over cells with w >= max(w)/2."""
    c, h, wd = q.shape
    proto = (s * w[None]).sum(axis=(1, 2)) / (w.sum() + 1e-6)
    cells = [(y, x) for y in range(s.shape[1]) for x in range(s.shape[2]) if w[y, x] >= 0.5 * w.max()]
    out = np.zeros((2, h, wd))
    for y in range(h):
        for x in range(wd):
            out[0, y, x] = _cos(q[:, y, x], proto)
            out[1, y, x] = max(_cos(q[:, y, x], s[:, yy, xx]) for yy, xx in cells)
    return out


@pytest.fixture
def levels():
    g = torch.Generator().manual_seed(0)
    # three levels at strides 1, 2, 4 of an 8x8 "image", with different channel widths
    q = [torch.randn(5, 8, 8, generator=g), torch.randn(7, 4, 4, generator=g), torch.randn(3, 2, 2, generator=g)]
    s = [torch.randn(5, 8, 8, generator=g), torch.randn(7, 4, 4, generator=g), torch.randn(3, 2, 2, generator=g)]
    return q, s


def test_level_priors_match_loops(levels):
    q, s = levels
    w = torch.zeros(8, 8)
    w[2:5, 3:7] = 1.0
    w[5, 3] = 0.3  # a partly covered cell: in the prototype, not in the pixel-max set
    got = level_priors(q[0], s[0], w).numpy()
    np.testing.assert_allclose(got, _hand_level(q[0].numpy(), s[0].numpy(), w.numpy()), atol=1e-5)


def test_shot_prior_is_minmaxed_levels_resized_in_order(levels):
    q, s = levels
    region = np.zeros((8, 8), bool)
    region[1:6, 2:7] = True
    got = shot_prior(q, s, region, 8)
    assert got.shape == (6, 8, 8) and float(got.min()) >= 0 and float(got.max()) <= 1
    for lv in range(3):
        grid = tuple(s[lv].shape[-2:])
        # area weights: the fraction of each cell inside the region
        w = F.interpolate(torch.from_numpy(region).float()[None, None], size=grid, mode="area")[0, 0].numpy()
        raw = _hand_level(q[lv].numpy(), s[lv].numpy(), w)
        norm = np.stack([_minmax(raw[0]), _minmax(raw[1])])
        exp = F.interpolate(torch.from_numpy(norm).float()[None], size=(8, 8), mode="bilinear",
                            align_corners=False)[0].numpy()
        np.testing.assert_allclose(got[2 * lv: 2 * lv + 2].numpy(), exp, atol=1e-5)  # [proto, pix] per level
    # the finest level is already at the prior grid: exactly the min-max maps, reaching 0 and 1
    assert got[0].min() == pytest.approx(0.0, abs=1e-6) and got[0].max() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(FsdiffError, match="levels"):
        shot_prior(q[:2], s, region, 8)


def test_contrast_maps_by_hand(levels):
    q, s = levels
    fg = np.zeros((8, 8), bool)
    fg[1:6, 2:7] = True
    bg = ~fg
    got = shot_prior(q, s, fg, 8, background=bg, maps=("proto", "pix", "contrast"), temperature=0.2,
                     proto_weight=0.25)
    assert got.shape == (9, 8, 8)
    plain = shot_prior(q, s, fg, 8)
    for lv in range(3):  # proto and pix unchanged, in the same place of each level's triple
        np.testing.assert_allclose(got[3 * lv: 3 * lv + 2].numpy(), plain[2 * lv: 2 * lv + 2].numpy(), atol=1e-6)
    grid = tuple(s[1].shape[-2:])
    wf = F.interpolate(torch.from_numpy(fg).float()[None, None], size=grid, mode="area")[0, 0].numpy()
    wb = F.interpolate(torch.from_numpy(bg).float()[None, None], size=grid, mode="area")[0, 0].numpy()
    rf, rb = _hand_level(q[1].numpy(), s[1].numpy(), wf), _hand_level(q[1].numpy(), s[1].numpy(), wb)
    s_fg, s_bg = 0.25 * rf[0] + 0.75 * rf[1], 0.25 * rb[0] + 0.75 * rb[1]
    exp = 1 / (1 + np.exp(-(s_fg - s_bg) / 0.2))  # unnormalised: the prototype method's level probability
    exp = F.interpolate(torch.from_numpy(exp).float()[None, None], size=(8, 8), mode="bilinear",
                        align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(got[5].numpy(), exp, atol=1e-5)
    # no background evidence: s_bg is the query-wide mean of s_fg
    raw = torch.from_numpy(rf).float()
    no_bg = contrast_map(raw, None, 0.2, 0.25).numpy()
    np.testing.assert_allclose(no_bg, 1 / (1 + np.exp(-(s_fg - s_fg.mean()) / 0.2)), atol=1e-5)
    with pytest.raises(FsdiffError, match="unknown prior maps"):
        shot_prior(q, s, fg, 8, maps=("proto", "edges"))


def test_pooled_prior_pools_like_the_prototype_method(levels):
    q, s = levels
    g = torch.Generator().manual_seed(5)
    s2 = [torch.randn(t.shape, generator=g) for t in s]
    fg1 = np.zeros((8, 8), bool)
    fg1[1:6, 2:7] = True
    fg2 = np.zeros((8, 8), bool)
    fg2[4:8, 0:3] = True
    maps = ("proto", "pix", "contrast")
    one = pooled_prior(q, [(s, fg1, ~fg1)], 8, maps=maps)
    assert torch.equal(one, shot_prior(q, s, fg1, 8, background=~fg1, maps=maps))  # one shot: the shot prior
    got = pooled_prior(q, [(s, fg1, ~fg1), (s2, fg2, None)], 8, maps=maps)
    lv = 1  # check level 1 (4x4 grid) by hand: mean prototype, max of the pixel-max maps
    w1 = F.interpolate(torch.from_numpy(fg1).float()[None, None], size=(4, 4), mode="area")[0, 0].numpy()
    w2 = F.interpolate(torch.from_numpy(fg2).float()[None, None], size=(4, 4), mode="area")[0, 0].numpy()
    wb = F.interpolate(torch.from_numpy(~fg1).float()[None, None], size=(4, 4), mode="area")[0, 0].numpy()
    qn = q[lv].numpy()
    p1 = (s[lv].numpy() * w1[None]).sum((1, 2)) / (w1.sum() + 1e-6)
    p2 = (s2[lv].numpy() * w2[None]).sum((1, 2)) / (w2.sum() + 1e-6)
    proto = np.array([[_cos(qn[:, y, x], (p1 + p2) / 2) for x in range(4)] for y in range(4)])
    pix = np.maximum(_hand_level(qn, s[lv].numpy(), w1)[1], _hand_level(qn, s2[lv].numpy(), w2)[1])
    up = lambda a: F.interpolate(torch.from_numpy(a).float()[None, None], size=(8, 8), mode="bilinear",  # noqa: E731
                                 align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(got[3].numpy(), up(_minmax(proto)), atol=1e-5)
    np.testing.assert_allclose(got[4].numpy(), up(_minmax(pix)), atol=1e-5)
    bg = _hand_level(qn, s[lv].numpy(), wb)  # only shot 1 has a background
    exp = 1 / (1 + np.exp(-((0.5 * proto + 0.5 * pix) - (0.5 * bg[0] + 0.5 * bg[1])) / 0.1))
    np.testing.assert_allclose(got[5].numpy(), up(exp), atol=1e-4)
    with pytest.raises(FsdiffError, match="at least one"):
        pooled_prior(q, [], 8)


def _area(region: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    return F.interpolate(torch.from_numpy(region).float()[None, None], size=grid, mode="area")[0, 0].numpy()


def _bilinear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if a.shape == tuple(size):
        return a
    return F.interpolate(torch.from_numpy(a).float()[None, None], size=size, mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def test_self_support_map_by_hand(levels):
    """SSP-style self map: first estimate = mean contrast of the chosen levels; query prototypes from its
    confident cells mixed with the support's; the fg pixel-max also over the confident query cells."""
    q, s = levels
    fg = np.zeros((8, 8), bool)
    fg[1:6, 2:7] = True
    bg = ~fg
    kw = dict(temperature=0.2, proto_weight=0.25, self_levels=(0, 1), self_fg_threshold=0.55,
              self_bg_threshold=0.45, self_mix=0.3)
    got = shot_prior(q, s, fg, 8, background=bg, maps=("contrast", "self"), **kw)
    assert got.shape == (6, 8, 8)

    def contrast(lv):
        grid = tuple(s[lv].shape[-2:])
        rf = _hand_level(q[lv].numpy(), s[lv].numpy(), _area(fg, grid))
        rb = _hand_level(q[lv].numpy(), s[lv].numpy(), _area(bg, grid))
        return 1 / (1 + np.exp(-((0.25 * rf[0] + 0.75 * rf[1]) - (0.25 * rb[0] + 0.75 * rb[1])) / 0.2))

    estimate = (_bilinear(contrast(0), (8, 8)) + _bilinear(contrast(1), (8, 8))) / 2
    for lv in range(3):
        qn, sn = q[lv].numpy(), s[lv].numpy()
        c, h, w = qn.shape
        est = _bilinear(estimate, (h, w))
        fcells = [(y, x) for y in range(h) for x in range(w) if est[y, x] > 0.55]
        bcells = [(y, x) for y in range(h) for x in range(w) if est[y, x] < 0.45]
        if not fcells:  # at least the best cell
            fcells = [np.unravel_index(int(np.argmax(est)), est.shape)]
        wf, wb = _area(fg, (sn.shape[1], sn.shape[2])), _area(bg, (sn.shape[1], sn.shape[2]))
        pf = (sn * wf[None]).sum((1, 2)) / (wf.sum() + 1e-6)
        pb = (sn * wb[None]).sum((1, 2)) / (wb.sum() + 1e-6)
        qf = np.mean([qn[:, y, x] for y, x in fcells], axis=0)
        pf = 0.3 * pf + 0.7 * qf
        if bcells:
            pb = 0.3 * pb + 0.7 * np.mean([qn[:, y, x] for y, x in bcells], axis=0)
        pix_f = _hand_level(qn, sn, wf)[1]
        pix_b = _hand_level(qn, sn, wb)[1]
        exp = np.zeros((h, w))
        for y in range(h):
            for x in range(w):
                self_pix = max(_cos(qn[:, y, x], qn[:, yy, xx]) for yy, xx in fcells)
                s_fg = 0.25 * _cos(qn[:, y, x], pf) + 0.75 * max(pix_f[y, x], self_pix)
                s_bg = 0.25 * _cos(qn[:, y, x], pb) + 0.75 * pix_b[y, x]
                exp[y, x] = 1 / (1 + np.exp(-(s_fg - s_bg) / 0.2))
        np.testing.assert_allclose(got[2 * lv + 1].numpy(), _bilinear(exp, (8, 8)), atol=1e-4)
        np.testing.assert_allclose(got[2 * lv].numpy(), _bilinear(contrast(lv), (8, 8)), atol=1e-4)
    with pytest.raises(FsdiffError, match="self_levels"):
        shot_prior(q, s, fg, 8, background=bg, maps=("self",), self_levels=(3,))


def test_self_support_map_finds_the_query_object():
    """A query whose object matches the support only at a 2x2 core: the self map, spreading from the
    confident cells over the query's own object features, is sure of the whole object where the
    contrast map is not."""
    g = torch.Generator().manual_seed(1)
    obj, back = torch.randn(8, generator=g), torch.randn(8, generator=g)
    support = back[:, None, None].expand(8, 8, 8).clone()
    support[:, 2:6, 2:6] = obj[:, None, None]
    query = back[:, None, None].expand(8, 8, 8).clone() + 0.3 * torch.randn(8, 8, 8, generator=g)
    query_obj = torch.zeros(8, 8, dtype=torch.bool)
    query_obj[1:7, 1:7] = True
    shifted = obj + 1.2 * torch.randn(8, generator=g)  # the query's object looks unlike the support's...
    query[:, query_obj] = shifted[:, None] + 0.1 * torch.randn(8, int(query_obj.sum()), generator=g)
    query[:, 3:5, 3:5] = obj[:, None, None]  # ...except a 2x2 core
    fg = np.zeros((8, 8), bool)
    fg[2:6, 2:6] = True
    got = shot_prior([query], [support], fg, 8, background=~fg, maps=("contrast", "self"), self_levels=(0,))
    margin = lambda m: float(m[query_obj].mean() - m[~query_obj].mean())  # noqa: E731
    assert margin(got[0]) < 0.9 < 0.95 < margin(got[1])  # fg vs bg separation: contrast 0.83, self ~0.98
    assert bool((got[1][query_obj] > 0.9).all()) and not bool((got[0][query_obj] > 0.9).all())


def test_bf16_pixel_max_is_close_to_fp32():
    g = torch.Generator().manual_seed(3)
    q, s = torch.randn(16, 12, 12, generator=g), torch.randn(16, 10, 10, generator=g)
    w = (torch.rand(10, 10, generator=g) > 0.5).float()
    a = pixel_max_cosine(q, s, w)
    b = pixel_max_cosine(q, s, w, matmul_dtype=torch.bfloat16)
    assert b.dtype == torch.float32 and float((a - b).abs().max()) < 0.02 and not torch.equal(a, b)


def test_support_regions_background_per_kind():
    shape = (40, 50)
    box = BoxAnnotation((10, 5, 30, 25))
    fg, bg = support_regions(box, shape)
    assert fg[5:25, 10:30].all() and fg.sum() == 400 and np.array_equal(bg, ~fg)  # outside the box
    m = np.zeros(shape, np.uint8)
    m[10:20, 10:20] = 1
    m[0:3, :] = 255
    fg, bg = support_regions(MaskAnnotation(m), shape)
    assert np.array_equal(fg, m == 1) and np.array_equal(bg, m == 0)  # ignore pixels are neither
    strokes = np.zeros(shape, np.uint8)
    strokes[20, 10:40] = 1
    strokes[35, 5:45] = 2  # an explicit background stroke
    fg, bg = support_regions(ScribbleAnnotation(strokes), shape)
    assert fg.sum() > 30 and not (fg & bg).any() and bg[35, 5:45].all() and bg.sum() <= 40
    with pytest.raises(FsdiffError, match="empty foreground"):
        support_regions(MaskAnnotation(np.zeros(shape, np.uint8)), shape)


def test_query_extra_by_hand(levels):
    q, _ = levels
    deep = q[-1].numpy()
    unit = deep / np.linalg.norm(deep, axis=0, keepdims=True)
    mean = unit.reshape(3, -1).mean(axis=1)
    cos = np.array([[_cos(deep[:, y, x], mean) for x in range(2)] for y in range(2)])
    exp = F.interpolate(torch.from_numpy(_minmax(cos)).float()[None, None], size=(4, 4), mode="bilinear",
                        align_corners=False)[0].numpy()
    got = query_extra(q, 4)
    assert got.shape == (1, 4, 4)
    np.testing.assert_allclose(got.numpy(), exp, atol=1e-5)


class FakeEncoder(Encoder):
    """A random 3-level conv encoder (strides 8/16/32) of configurable channel widths."""

    def __init__(self, widths: tuple[int, int, int], seed: int = 0, levels: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.name = f"fake-{'-'.join(map(str, widths))}"
        self.levels = levels
        self.strides = (8, 16, 32)[:levels]
        self.channels = tuple(widths[:levels])
        self.convs = torch.nn.ModuleList()
        cin = 3
        for i, w in enumerate(widths[:levels]):
            self.convs.append(torch.nn.Conv2d(cin, w, 3, stride=8 if i == 0 else 2, padding=1))
            cin = w
        self.freeze()

    def forward(self, x):
        out = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            out.append(x)
        return out


def test_channel_count_does_not_depend_on_backbone_widths():
    rng = np.random.default_rng(0)
    qi = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)
    si = rng.integers(0, 255, (60, 50, 3), dtype=np.uint8)
    region = np.zeros((60, 50), bool)
    region[10:40, 5:30] = True
    shapes = []
    for widths in ((4, 8, 16), (64, 3, 100)):
        enc = FakeEncoder(widths)
        qf, sf = enc.encode(qi, 96), enc.encode(si, 96)
        assert [f.shape[0] for f in qf] == list(widths)
        pr = shot_prior(qf, sf, region, 12)
        ex = query_extra(qf, 12)
        assert torch.all((pr >= 0) & (pr <= 1)) and torch.all((ex >= 0) & (ex <= 1))
        shapes.append((tuple(pr.shape), tuple(ex.shape)))
    assert shapes[0] == shapes[1] == ((6, 12, 12), (1, 12, 12))


def test_regions_for_each_annotation_kind():
    shape = (100, 200)
    mask = np.zeros(shape, np.uint8)
    mask[20:60, 30:90] = 1
    assert np.array_equal(support_region(MaskAnnotation(mask), shape), mask == 1)
    box = support_region(BoxAnnotation((30, 20, 90, 60)), shape)
    assert box.sum() == 40 * 60 and box[20, 30] and not box[19, 30]
    strokes = np.zeros(shape, np.uint8)
    strokes[40, 40:80] = 1
    sc = support_region(ScribbleAnnotation(strokes), shape)
    r = max(1, round(0.01 * 200))  # dilated by 1 % of the long side = 2 px
    assert sc[40 - r, 60] and sc[40 + r, 60] and not sc[40 - r - 1, 60] and sc.sum() > (strokes == 1).sum()
    assert np.array_equal(dilate_region(strokes == 1), sc)
    pts = support_region(PointsAnnotation(np.array([[50.0, 40.0]]), np.array([1])), shape)
    assert pts[40, 50] and prior_type("points") == "scribble"
    assert [prior_type(k) for k in ("mask", "box", "scribble", "text")] == ["mask", "box", "scribble", "text"]
    with pytest.raises(FsdiffError, match="spatial region"):
        support_region(TextAnnotation(), shape)
    with pytest.raises(FsdiffError, match="cannot use"):
        prior_type("polygon")


def test_replicate_text():
    t = torch.rand(1, 3, 4)
    r = replicate_text(t, 6)
    assert r.shape == (6, 3, 4) and all(torch.equal(r[i], t[0]) for i in range(6))


# --- text prior with a tiny local CLIP ---------------------------------------------------------------


def make_tiny_clip(root) -> str:
    """A random tiny CLIPModel + a character-level CLIP tokenizer saved to ``root/clip``."""
    transformers = pytest.importorskip("transformers")
    d = root / "clip"
    d.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 52, 53
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=54, bos_token_id=52, eos_token_id=53),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           patch_size=16, image_size=64),
        projection_dim=8))
    clip.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clipdir"))


def test_text_prior_from_tiny_clip(tiny_clip):
    tp = load_text_prior(tiny_clip, size=96, required=True)
    img = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    dense = tp.dense_features(img)
    assert dense.shape == (8, 6, 6)  # projection dim 8, 96 / 16 = 6 patches a side
    torch.testing.assert_close(dense.norm(dim=0), torch.ones(6, 6))
    prior = tp.prior(img, "cat", 12)
    assert prior.shape == (1, 12, 12) and float(prior.min()) >= 0 and float(prior.max()) <= 1
    # by hand: cos of the dense features with the unit text embedding, min-max, bilinear
    t = tp.text_embedding("cat")
    cos = torch.einsum("dhw,d->hw", dense, t)
    exp = F.interpolate(((cos - cos.min()) / (cos.max() - cos.min()))[None, None], size=(12, 12), mode="bilinear",
                        align_corners=False)[0]
    torch.testing.assert_close(prior, exp.clamp(0, 1))
    assert not torch.allclose(tp.prior(img, "dog", 12), prior)  # the class name matters
    value = load_text_prior(tiny_clip, size=96, dense="value", required=True)
    assert value.prior(img, "cat", 12).shape == (1, 12, 12)


def test_text_prior_absent_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_text_prior("nobody/no-such-clip-model") is None
    assert load_text_prior(None) is None
    with pytest.raises(FsdiffError, match="CLIP"):
        load_text_prior(str(tmp_path / "missing-dir"), required=True)
