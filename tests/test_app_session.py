"""fsdiff.app sessions, uploads and actions (no gradio): isolation, cleanup, limits, the correct-and-add loop."""

from __future__ import annotations

import dataclasses
import io
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from fsdiff.app import actions, models
from fsdiff.app.annotations import OBJECT_COLOUR, mask_layer
from fsdiff.app.config import AppConfig
from fsdiff.app.examples import bundled_example
from fsdiff.app.session import SessionStore, safe_name
from fsdiff.app.uploads import discard_upload, read_image_file, read_query_uploads
from fsdiff.episode import Annotation, BoxAnnotation, MaskAnnotation
from fsdiff.errors import FsdiffError
from fsdiff.pipeline import Pipeline

CFG = AppConfig()


@dataclass(frozen=True, eq=False)
class EstimatedMask(MaskAnnotation):
    """What the weak-label step returns: an estimated mask that remembers the annotation it came from."""

    source: Annotation | None = None


class FakeMethod:
    threshold = 0.5
    name = "fake"


class FakeSegmenter:
    """A pipeline double: prob = red channel / 255; box supports become estimated masks (the box's inner half)."""

    def __init__(self, uncertainty: bool = False):
        self.method = FakeMethod()
        if uncertainty:
            self.method.predict_with_uncertainty = self._with_uncertainty
        self.threshold = 0.5
        self.predicted: list[str] = []
        self.prepared_k: list[int] = []

    def prepare(self, episode):
        self.prepared_k.append(episode.k)
        shots = []
        for s in episode.shots:
            ann = s.annotation
            if isinstance(ann, BoxAnnotation):
                fg, _ = ann.regions(s.shape)
                est = np.zeros(s.shape, np.uint8)
                ys, xs = np.nonzero(fg)
                est[ys.min() + (ys.max() - ys.min()) // 4:ys.max() - (ys.max() - ys.min()) // 4 + 1,
                    xs.min() + (xs.max() - xs.min()) // 4:xs.max() - (xs.max() - xs.min()) // 4 + 1] = 1
                s = dataclasses.replace(s, annotation=EstimatedMask(est, source=ann))
            shots.append(s)
        return dataclasses.replace(episode, shots=tuple(shots))

    def with_queries(self, prepared, queries):
        return dataclasses.replace(prepared, queries=tuple(queries))

    def _prob(self, q):
        self.predicted.append(q.image_id)
        return q.image[:, :, 0].astype(np.float32) / 255.0

    def predict_prepared(self, episode):
        return [self._prob(q) for q in episode.queries]

    refiner = None
    predict_prepared_with_uncertainty = Pipeline.predict_prepared_with_uncertainty

    def _with_uncertainty(self, episode):
        @dataclass
        class Out:
            prob: np.ndarray
            uncertainty: np.ndarray
        return [Out(self._prob(q), np.full(q.shape, 0.25, np.float32)) for q in episode.queries]


def fake_cache(seg):
    return models.ModelCache(factory=lambda method, encoder=None: seg)


def write_png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def gradient(h=30, w=40):
    """Red rising left to right: prob = x / (w - 1) in the fake segmenter."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :, 0] = np.round(np.linspace(0, 255, w))[None, :]
    return img


@pytest.fixture
def store(tmp_path):
    s = SessionStore(tmp_path / "sessions", ttl_s=60)
    yield s
    s.close_all()


def test_sessions_are_isolated_and_their_folders_are_removed(store, tmp_path):
    a, b = store.get("tab-a"), store.get("tab-b")
    assert a is store.get("tab-a") and a.folder != b.folder and a.folder.is_dir() and b.folder.is_dir()
    actions.add_queries(a, [write_png(tmp_path / "q.png", gradient())], CFG)
    a.render("results", [(gradient(), "q")])
    assert len(a.queries) == 1 and b.queries == [] and list(b.folder.iterdir()) == []
    assert store.close("tab-a") and not a.folder.exists() and b.folder.is_dir()
    with pytest.raises(FsdiffError, match="session has ended"):
        a.render("results", [])
    c = store.get("tab-a")  # the same id later gets a new, empty session
    assert c is not a and c.queries == [] and c.folder.is_dir()
    assert not store.close("never-seen")


def test_idle_sessions_are_swept_and_close_all_empties_the_root(store):
    a, b = store.get("a"), store.get("b")
    b.last_used = a.last_used - 3600
    assert store.sweep(now=a.last_used + 30) == ["b"]
    assert not b.folder.exists() and a.folder.exists()
    store.close_all()
    assert not a.folder.exists() and len(store) == 0


def test_render_replaces_the_previous_pictures_of_a_slot(store):
    s = store.get("x")
    first = s.render("results", [(gradient(), "one")])
    second = s.render("results", [(gradient(), "two")])
    assert not any(p.exists() for p in map(lambda x: __import__("pathlib").Path(x[0]), first))
    assert all(__import__("pathlib").Path(p).is_file() for p, _ in second)


def test_safe_name_drops_folders_and_odd_characters():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("C:\\photos\\my fish (1).jpg") == "my_fish__1_.jpg"
    assert safe_name(".hidden") == "hidden" and safe_name("") == "image"


# ------------------------------------------------------------------------------------------ uploads and limits
def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    path = write_png(tmp_path / "big.png", np.zeros((1200, 1000, 3), np.uint8))
    import fsdiff.app.uploads as up

    monkeypatch.setattr(up, "to_image", lambda *a, **k: pytest.fail("decoded an image above the limit"))
    with pytest.raises(FsdiffError, match=r"big.png is 1000x1200 = 1,200,000 pixels, above the app's limit of 1,000,000"):
        read_image_file(path, "big.png", AppConfig(max_pixels=1_000_000))


def test_file_size_limit(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(b"\0" * 1_500_000)
    with pytest.raises(FsdiffError, match="above the upload limit of 1 MB"):
        read_image_file(path, "huge.png", AppConfig(max_file_mb=1))


def test_uploads_decode_like_the_cli_and_name_the_users_file(tmp_path):
    # not an image, truncated, RGBA, 16-bit, EXIF-rotated
    bad = tmp_path / "upload-12345" / "notes.jpg"
    bad.parent.mkdir()
    bad.write_text("not a picture")
    with pytest.raises(FsdiffError) as err:
        read_image_file(bad, "notes.jpg", CFG)
    assert "notes.jpg" in str(err.value) and "upload-12345" not in str(err.value)
    good = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good, format="JPEG")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.getvalue()[: 3 * len(good.getvalue()) // 4])
    with pytest.raises(FsdiffError, match="truncated"):
        read_image_file(trunc, "trunc.jpg", CFG)
    rgba = np.zeros((8, 9, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    assert read_image_file(write_png(tmp_path / "rgba.png", rgba), "rgba.png", CFG).shape == (8, 9, 3)
    deep = np.full((6, 7), 65535, np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    img16 = read_image_file(tmp_path / "deep.png", "deep.png", CFG)
    assert img16.dtype == np.uint8 and img16.shape == (6, 7, 3) and (img16 == 255).all()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert read_image_file(tmp_path / "rot.jpg", "rot.jpg", CFG).shape == (20, 10, 3)


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return str(path)


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_a_zip_of_queries_is_read_in_memory_and_bounded(tmp_path):
    z = make_zip(tmp_path / "batch.zip", {"a/x.png": png_bytes(gradient()), "y.png": png_bytes(gradient(10, 12)),
                                          "readme.txt": b"hi", "__MACOSX/._x.png": b"junk"})
    pics = read_query_uploads([z], CFG, room=10)
    assert [p.name for p in pics] == ["x.png", "y.png"] and pics[1].image.shape == (10, 12, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.zip"]  # nothing extracted
    with pytest.raises(FsdiffError, match="takes 1 more query"):
        read_query_uploads([z], CFG, room=1)
    bomb = make_zip(tmp_path / "bomb.zip", {"z.png": png_bytes(np.zeros((2000, 2000, 3), np.uint8)) + b"\0" * 2_000_000})
    with pytest.raises(FsdiffError, match="unpacks to more than 1 MB"):
        read_query_uploads([bomb], AppConfig(max_zip_mb=1), room=10)
    with pytest.raises(FsdiffError, match="not a readable zip"):
        read_query_uploads([str(tmp_path / "readme.zip")] if (tmp_path / "readme.zip").write_text("x") else [], CFG, 5)


def test_discard_upload_only_deletes_inside_the_upload_root(tmp_path):
    root = tmp_path / "root"
    inside = root / "abc123" / "photo.jpg"
    inside.parent.mkdir(parents=True)
    inside.write_text("x")
    outside = tmp_path / "mine.jpg"
    outside.write_text("x")
    discard_upload(inside, root)
    discard_upload(outside, root)
    assert not inside.exists() and not inside.parent.exists() and outside.exists() and root.is_dir()


def test_config_from_environment():
    cfg = AppConfig.from_env({"FSDIFF_APP_MAX_FILE_MB": "7", "FSDIFF_APP_MAX_PIXELS": "1000"}, max_queries=3)
    assert (cfg.max_file_mb, cfg.pixels(), cfg.max_queries) == (7, 1000, 3)
    with pytest.raises(FsdiffError, match="FSDIFF_APP_THREADS"):
        AppConfig.from_env({"FSDIFF_APP_THREADS": "many"})


# ------------------------------------------------------------------------------------------ actions
def test_bundled_example_loads_into_a_new_session(store):
    ex = bundled_example()
    s = store.get("x")
    actions.load_example(s, CFG, ex)
    assert len(s.supports) == len(ex.supports) >= 1 and len(s.queries) == len(ex.queries) >= 1
    assert s.supports[0].shot.annotation.kind == "mask" and s.class_name == ex.class_name
    actions.load_example(s, CFG, ex)  # a session that has data is left alone
    assert len(s.queries) == len(ex.queries)


def add_box_support(s, tmp_path, name="sup.png"):
    actions.set_support_image(s, write_png(tmp_path / name, gradient()), CFG)
    actions.click(s, 4, 5, "box corners")
    actions.click(s, 20, 25, "box corners")
    return actions.add_support(s, "clicks", "mask", None, None, CFG)


def test_segment_threshold_and_views_reuse_cached_maps(store, tmp_path):
    seg = FakeSegmenter()
    cache = fake_cache(seg)
    s = store.get("x")
    with pytest.raises(FsdiffError, match="no support"):
        actions.segment(s, cache, "prototype", "", "thing")
    item = add_box_support(s, tmp_path)
    assert item.annotation == {"box": (4, 5, 21, 26)} and s.draft is None
    assert actions.describe(item) == "box (4, 5, 21, 26)"
    with pytest.raises(FsdiffError, match="no query"):
        actions.segment(s, cache, "prototype", "", "thing")
    actions.add_queries(s, [write_png(tmp_path / "q1.png", gradient()), write_png(tmp_path / "q2.png", gradient())],
                        CFG)
    assert "not segmented yet" in actions.result_pictures(s)[0][1]
    seen = []
    summary = actions.segment(s, cache, "prototype", "", "thing", progress=lambda d, n: seen.append((d, n)))
    assert summary.startswith("Segmented 2 queries with 1 support (prototype)")
    assert seen[-1] == (2, 2) and seg.predicted == ["q1.png", "q2.png"]
    q = s.queries[0]
    assert q.mask(0.5).mean() == pytest.approx(20 / 40)  # columns 20..39 have red > 127.5
    actions.set_threshold(s, 0.75)
    assert q.mask(s.threshold).mean() == pytest.approx(10 / 40)
    actions.set_view(s, "probability")
    pics = actions.result_pictures(s)
    assert len(pics) == 2 and "probability" in pics[0][1]
    actions.set_view(s, "uncertainty")
    assert "gives no uncertainty" in actions.result_pictures(s)[0][1]
    assert seg.predicted == ["q1.png", "q2.png"]  # threshold and views never ran the model again
    # the support's estimated mask (weak-label step) is kept and drawn
    est = s.supports[0].estimate
    assert est is not None and est.shape == (30, 40) and 0 < est.sum() < 17 * 21
    assert "estimated mask" in actions.support_pictures(s)[0][1]
    with pytest.raises(FsdiffError, match="strictly between"):
        actions.set_threshold(s, 1.0)


def test_uncertainty_is_kept_where_the_method_gives_it(store, tmp_path):
    seg = FakeSegmenter(uncertainty=True)
    s = store.get("x")
    add_box_support(s, tmp_path)
    actions.add_queries(s, [write_png(tmp_path / "q.png", gradient())], CFG)
    actions.segment(s, fake_cache(seg), "diffup", "", "")
    assert s.queries[0].uncertainty is not None and float(s.queries[0].uncertainty.mean()) == pytest.approx(0.25)
    actions.set_view(s, "uncertainty")
    assert actions.result_pictures(s)[0][1] == "q.png (uncertainty)"


def test_correct_and_add_resegments_the_other_queries_with_one_more_shot(store, tmp_path):
    seg = FakeSegmenter()
    cache = fake_cache(seg)
    s = store.get("x")
    add_box_support(s, tmp_path)
    paths = [write_png(tmp_path / f"q{i}.png", gradient()) for i in range(3)]
    actions.add_queries(s, paths, CFG)
    actions.segment(s, cache, "prototype", "", "fish")
    value = actions.select_result(s, 1)
    assert value["layers"][0].shape == (30, 40, 4)
    corrected = np.zeros((30, 40), np.uint8)
    corrected[2:12, 3:9] = 1
    seg.predicted.clear()
    summary = actions.add_corrected(s, {"layers": [mask_layer(corrected)]}, cache, "prototype", "", "fish", CFG)
    assert "added as support 2" in summary and len(s.supports) == 2 and seg.prepared_k[-1] == 2
    assert seg.predicted == ["q0.png", "q2.png"]  # the corrected query is not segmented again
    assert np.array_equal(s.queries[1].mask(s.threshold), corrected.astype(bool))
    assert s.supports[1].origin.startswith("corrected") and s.supports[1].shot.annotation.kind == "mask"
    with pytest.raises(FsdiffError, match="select a result"):
        actions.add_corrected(s, {"layers": [mask_layer(corrected)]}, cache, "prototype", "", "fish", CFG)
    # an empty correction is refused by the library's validation and changes nothing
    actions.select_result(s, 0)
    with pytest.raises(FsdiffError, match="empty"):
        actions.add_corrected(s, {"layers": [mask_layer(np.zeros((30, 40), np.uint8))]}, cache, "prototype", "",
                              "fish", CFG)
    assert len(s.supports) == 2 and s.queries[0].corrected is None
    zpath = actions.export(s)
    with zipfile.ZipFile(zpath) as zf:
        back = np.asarray(Image.open(io.BytesIO(zf.read("q1_mask.png")))) == 255
    assert np.array_equal(back, corrected.astype(bool)) and zpath.parent == s.folder


def test_support_tools_paint_scribble_and_mask_file(store, tmp_path):
    s = store.get("x")
    with pytest.raises(FsdiffError, match="upload a support image first"):
        actions.add_support(s, "paint", "mask", None, None, CFG)
    paint = np.zeros((30, 40, 4), np.uint8)
    paint[5:10, 5:10] = (*OBJECT_COLOUR, 255)
    actions.set_support_image(s, write_png(tmp_path / "a.png", gradient()), CFG)
    assert actions.add_support(s, "paint", "mask", {"layers": [paint]}, None, CFG).shot.annotation.kind == "mask"
    actions.set_support_image(s, write_png(tmp_path / "b.png", gradient()), CFG)
    assert actions.add_support(s, "paint", "scribbles", {"layers": [paint]}, None, CFG).shot.annotation.kind == "scribble"
    actions.set_support_image(s, write_png(tmp_path / "c.png", gradient()), CFG)
    mask = np.zeros((30, 40), np.uint8)
    mask[3:9, 3:9] = 255
    item = actions.add_support(s, "mask file", "mask", None, write_png(tmp_path / "m.png", mask), CFG)
    assert item.shot.annotation.kind == "mask" and item.annotation["mask"].sum() == 36
    assert actions.describe(item) == "mask of 36 object pixels in (3, 3, 9, 9)"
    actions.set_support_image(s, write_png(tmp_path / "d.png", gradient()), CFG)
    small = np.zeros((10, 10), np.uint8)
    small[2:6, 2:6] = 255
    wrong = write_png(tmp_path / "wrong.png", small)
    with pytest.raises(FsdiffError, match="does not match its image"):
        actions.add_support(s, "mask file", "mask", None, wrong, CFG)
    assert len(s.supports) == 3 and s.draft is not None  # the refused support keeps its picture for another try
    actions.remove_support(s, 0)
    assert [x.picture.name for x in s.supports] == ["b.png", "c.png"]
    with pytest.raises(FsdiffError, match="select a support"):
        actions.remove_support(s, None)
    with pytest.raises(FsdiffError, match="this session holds 2 supports"):
        actions.add_support(s, "paint", "mask", {"layers": [paint]}, None, AppConfig(max_supports=2))


def test_a_method_without_weights_gives_its_reason_and_hint(monkeypatch):
    choice = models.MethodChoice("diffseg", "DiffSeg", False, "download kandinsky-2-2-prior into FSDIFF_MODEL_DIR")
    monkeypatch.setattr(models, "method_choices", lambda: [choice])
    cache = models.ModelCache(factory=lambda *a, **k: pytest.fail("built a method whose weights are missing"))
    with pytest.raises(FsdiffError, match="(?s)diffseg cannot run on this machine.*download kandinsky-2-2-prior"):
        cache.get("diffseg")
    assert choice.label == "diffseg (not ready: weights missing)"
    with pytest.raises(FsdiffError, match="unknown method"):
        cache.get("nope")


def test_method_choices_list_every_registered_method_with_a_status():
    from fsdiff.methods import method_names

    choices = models.method_choices()
    assert [c.name for c in choices] == method_names()
    assert next(c for c in choices if c.name == "prototype").ready
    assert models.encoder_choices()[0] == ("method default", "")


def test_scripting_call_segment_files(store, tmp_path):
    seg = FakeSegmenter()
    s = store.get("api")
    sup = write_png(tmp_path / "s.png", gradient())
    mask = np.zeros((30, 40), np.uint8)
    mask[5:20, 25:39] = 255
    mpath = write_png(tmp_path / "s_mask.png", mask)
    q = write_png(tmp_path / "q.png", gradient())
    path, summary = actions.segment_files(s, fake_cache(seg), CFG, [sup, sup], [mpath], '[{"mask": 0}, {"box": [1, 2, 30, 20]}]',
                                          [q], "fish", "prototype", "", 0.6)
    assert path.is_file() and summary["threshold"] == 0.6 and summary["queries"][0]["mask_file"] == "q_mask.png"
    assert summary["queries"][0]["foreground_fraction"] == pytest.approx(16 / 40)
    with pytest.raises(FsdiffError, match="one mask file"):
        actions.parse_annotations("", 2, 1)
    with pytest.raises(FsdiffError, match="must index"):
        actions.parse_annotations('[{"mask": 3}]', 1, 1)
    with pytest.raises(FsdiffError, match="not an annotation"):
        actions.parse_annotations('[{"lasso": 1}]', 1, 1)


def test_real_default_method_on_the_bundled_example(store):
    s = store.get("real")
    actions.load_example(s, CFG)
    summary = actions.segment(s, models.ModelCache(), "prototype", "", s.class_name)
    assert "Segmented" in summary
    for q in s.queries:
        assert q.prob.shape == q.picture.shape and q.prob.dtype == np.float32
        assert 0.05 < float(q.mask(s.threshold).mean()) < 0.95
