"""End-to-end: ``fsdiff app`` in a real headless browser (Debian's chromium driven by Playwright) and through
gradio_client. Skips where chromium or Playwright is missing, except under CI (``CI`` set), where it must run.

Set ``FSDIFF_UPDATE_SCREENSHOT=1`` to rewrite ``docs/images/app.png`` (the README's screenshot).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, free_port

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
EXAMPLES = REPO / "src" / "fsdiff" / "assets" / "examples"
SUPPORT, QUERIES = EXAMPLES / "fish12.jpg", [EXAMPLES / "fish16.jpg", EXAMPLES / "fish22.jpg"]
MAX_PIXELS = 2_000_000
SCREENSHOT = REPO / "docs" / "images" / "app.png"


def _missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is absent (apt-get install chromium)"
    for module in ("playwright.sync_api", "gradio", "gradio_client"):
        try:
            __import__(module)
        except ImportError:
            return f"python package {module.split('.')[0]} is absent (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """``fsdiff app`` on a free loopback port, its temporary files under a private TMPDIR."""
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("app-tmp")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "FSDIFF_APP_THREADS": "1",
           "FSDIFF_APP_MAX_PIXELS": str(MAX_PIXELS), "FSDIFF_APP_MAX_FILE_MB": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "fsdiff", "app", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"fsdiff app did not start: {(tmp / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield {"url": url, "tmp": tmp, "proc": proc}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()


def status(page) -> str:
    return page.inner_text("#status")


def wait_status(page, text: str, timeout: float = 90) -> str:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_selector(f"#status:has-text({json.dumps(text)})", timeout=timeout * 1000)
    except PlaywrightTimeout:
        pytest.fail(f"the page did not say {text!r} within {timeout} s; its status line says {status(page)!r}")
    return status(page)


def result_sources(page) -> list[str]:
    imgs = page.locator("#results img")
    return [imgs.nth(i).get_attribute("src") for i in range(imgs.count())]


def click_fraction(page, selector: str, fx: float, fy: float) -> None:
    box = page.locator(selector).bounding_box()
    page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])


def upload(page, selector: str, files) -> None:
    page.locator(f"{selector} input[type=file]").set_input_files(files)


def test_browser_session_end_to_end(app, tmp_path):
    from playwright.sync_api import sync_playwright

    big = tmp_path / "huge.png"
    Image.fromarray(np.zeros((1500, 1500, 3), np.uint8)).save(big)  # 2.25 MP, above the test's 2 MP limit
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture")
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1250}, accept_downloads=True)
        page.on("request", lambda r: requests.append(r.url))
        page.goto(app["url"])
        wait_status(page, "Example loaded")
        # the bundled example is loaded: one click shows a result
        page.click("#run")
        wait_status(page, "Segmented 2 queries with 1 support")
        session_dir = Path(result_sources(page)[0].split("file=", 1)[1]).parents[1]
        assert session_dir.is_dir() and session_dir.parent.name == "sessions"

        # start over with our own support and queries; first bad input: a query run with no support
        page.locator("#supports button, #supports .thumbnail-item").first.click()
        page.click("#remove-support")
        wait_status(page, "K = 0")
        page.click("#run")
        wait_status(page, "no support: add at least one annotated support")
        # a non-image upload and an oversize image: a message, nothing kept
        upload(page, "#support-file", str(text))
        wait_status(page, "notes.jpg is not an image file")
        upload(page, "#support-file", str(big))
        wait_status(page, "above the app's limit of 2,000,000 pixels")
        # a file above the upload size limit (1 MB here) is refused by gradio before it arrives
        heavy = tmp_path / "heavy.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(heavy)
        assert heavy.stat().st_size > 1_000_000
        upload(page, "#support-file", str(heavy))
        page.wait_for_selector(".toast-body:has-text('exceed the maximum allowed size')", timeout=30000)
        # the support, and a box of zero area (two clicks in one column)
        upload(page, "#support-file", str(SUPPORT))
        wait_status(page, "Support image fish12.jpg")
        page.get_by_role("tab", name="Box / clicks").click()
        page.wait_for_selector("#support-clicks img")
        click_fraction(page, "#support-clicks img", 0.5, 0.3)
        page.wait_for_timeout(800)
        click_fraction(page, "#support-clicks img", 0.5, 0.7)
        page.wait_for_timeout(800)
        page.click("#add-support")
        wait_status(page, "zero area")
        # a real box: two opposite corners around the fish
        click_fraction(page, "#support-clicks img", 0.08, 0.12)
        page.wait_for_timeout(800)
        click_fraction(page, "#support-clicks img", 0.92, 0.88)
        page.wait_for_timeout(800)
        page.click("#add-support")
        added = wait_status(page, "Added support 1: fish12.jpg (box (")
        # the clicks landed where they were made, in the photo's own pixels (fish12.jpg is 320x214)
        box = [int(v) for v in added.split("(box (", 1)[1].split(")", 1)[0].split(",")]
        expected = [0.08 * 320, 0.12 * 214, 0.92 * 320 + 1, 0.88 * 214 + 1]
        assert all(abs(b - e) <= 4 for b, e in zip(box, expected)), (box, expected)
        page.click("#clear-queries")
        wait_status(page, "Queries cleared")
        upload(page, "#query-files", [str(p) for p in QUERIES])
        wait_status(page, "Added 2 queries")
        page.click("#run")
        wait_status(page, "Segmented 2 queries with 1 support (prototype)")
        captions = page.inner_text("#results")
        assert "fish16.jpg (overlay)" in captions and "fish22.jpg (overlay)" in captions
        before = result_sources(page)
        assert len(before) == 2
        # the threshold re-renders from cached maps
        number = page.locator("#threshold input[type=number]")
        number.fill("0.8")
        number.press("Enter")
        page.wait_for_function("(old) => { const i = document.querySelector('#results img');"
                               " return i && i.getAttribute('src') !== old; }", arg=before[0], timeout=30000)
        # a second user sees only the bundled example, never this user's photos
        other = browser.new_context().new_page()
        other.goto(app["url"])
        wait_status(other, "Example loaded")
        assert "fish16" not in other.inner_text("#results") and "fish12" not in other.inner_text("#supports")
        other.close()
        # correct a result and add it as a support: the other query is segmented again with K = 2
        page.locator("#results button, #results .thumbnail-item").first.click()
        wait_status(page, "Correct fish16.jpg")
        page.wait_for_timeout(1500)
        page.click("#add-corrected")
        wait_status(page, "fish16.jpg added as support 2. Segmented 1 query with 2 supports")
        assert "fish16.jpg (corrected)" in page.inner_text("#results")
        if os.environ.get("FSDIFF_UPDATE_SCREENSHOT") == "1":
            page.evaluate("window.scrollTo(0, 0)")
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
        # export and download the zip through the page
        page.click("#export")
        wait_status(page, "Export ready")
        with page.expect_download() as info:
            page.locator("#export-file a").first.click()
        zpath = tmp_path / "download.zip"
        info.value.save_as(zpath)
        page.close()
        browser.close()

    with zipfile.ZipFile(zpath) as zf:
        names = sorted(zf.namelist())
        assert names == sorted(["fish16_mask.png", "fish22_mask.png", "annotations.coco.json",
                                "annotations_polygons.coco.json"])
        doc = json.loads(zf.read("annotations.coco.json"))
        for q in QUERIES:
            mask = np.asarray(Image.open(io.BytesIO(zf.read(f"{q.stem}_mask.png"))))
            assert mask.shape == np.asarray(Image.open(q)).shape[:2] and set(np.unique(mask)) <= {0, 255}
            assert 0.02 < (mask == 255).mean() < 0.98
    from pycocotools import mask as mask_utils

    by_name = {im["file_name"]: im["id"] for im in doc["images"]}
    assert set(by_name) == {q.name for q in QUERIES}
    for ann in doc["annotations"]:
        q = next(q for q in QUERIES if by_name[q.name] == ann["image_id"])
        with zipfile.ZipFile(zpath) as zf:
            png = np.asarray(Image.open(io.BytesIO(zf.read(f"{q.stem}_mask.png")))) == 255
        assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), png)

    # offline: the page asked nothing of any other host
    foreign = [u for u in requests if not u.startswith(("http://127.0.0.1", "blob:http://127.0.0.1", "data:"))]
    assert foreign == []
    # the closed tab's session folder goes away; refused and consumed uploads left no file behind
    deadline = time.monotonic() + 30
    while session_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not session_dir.exists()
    root = session_dir.parents[1]
    uploaded = {"notes.jpg", "huge.png", "heavy.png", "fish12.jpg", "fish16.jpg", "fish22.jpg"}
    leftovers = [p for p in root.rglob("*") if p.is_file() and "sessions" not in p.relative_to(root).parts
                 and p.name in uploaded]
    assert leftovers == []
    app["root"] = root


def test_scripting_api_with_gradio_client(app, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app["url"], verbose=False, download_files=str(tmp_path))
    methods = client.predict(api_name="/methods")
    assert {m["name"] for m in methods} >= {"prototype", "diffup"}
    assert next(m for m in methods if m["name"] == "prototype")["ready"] is True
    zpath, summary = client.predict(
        [handle_file(str(EXAMPLES / "fish19.jpg"))], [handle_file(str(EXAMPLES / "fish19_mask.png"))], "",
        [handle_file(str(q)) for q in QUERIES], "fish", "prototype", "", 0.5, api_name="/segment_files")
    assert summary["method"] == "prototype" and [r["query"] for r in summary["queries"]] == [q.name for q in QUERIES]
    with zipfile.ZipFile(zpath) as zf:
        assert {"fish16_mask.png", "fish22_mask.png", "annotations.coco.json"} <= set(zf.namelist())
    with pytest.raises(Exception, match="no support image given"):
        client.predict([], [], "", [handle_file(str(QUERIES[0]))], "", "prototype", "", None,
                       api_name="/segment_files")


def test_stopping_the_app_removes_its_temporary_root(app):
    proc = app["proc"]
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    left = [p.name for p in app["tmp"].iterdir() if p.name.startswith("fsdiff-app-")]
    assert left == [], (app["tmp"] / "app.log").read_text()[-2000:]
