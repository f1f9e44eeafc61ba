"""The try-it page at GET / in a real headless Chromium (Debian's /usr/bin/chromium,
driven by Playwright; no browser download) against a real `ipdfer serve`
(in-process mode, real weights) on a free port: a photo picked with the file input,
a photo dropped on the drop zone, a webcam capture (Chromium's fake camera, fed a
clip of a real face), the live camera over the WebSocket, a video upload plotted
per person, and API errors shown with the API's own `detail`. Checks what is drawn, not just that the
page loads: boxes on the canvas where the API put them, 7 expression bars per face,
the pose numbers, the neutral render decoded, and nothing fetched from another origin.

Needs `chromium` (apt) and `playwright` (pip). Missing either skips here and fails
in CI. IPDFER_CHROMIUM overrides the browser path; IPDFER_WEB_SCREENSHOT the path
of the screenshot the first test writes (default /tmp/ipdfer_web.png),
IPDFER_LIVE_SCREENSHOT that of the live mode (default /tmp/ipdfer_live.png)."""
from __future__ import annotations

import base64
import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.labels import EXPRESSIONS
from tests.conftest import free_port, terminate
from tests.test_service_api import astronaut, encode

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "service" / "static"
SCREENSHOT = Path(os.environ.get("IPDFER_WEB_SCREENSHOT", "/tmp/ipdfer_web.png"))
LIVE_SCREENSHOT = Path(os.environ.get("IPDFER_LIVE_SCREENSHOT", "/tmp/ipdfer_live.png"))


def _missing(what: str) -> None:
    message = f"{what} (apt-get install chromium; pip install playwright==1.65.2)"
    if os.environ.get("CI"):
        pytest.fail(f"the browser test cannot run in CI: {message}")
    pytest.skip(message)


def chromium_path() -> str:
    for candidate in (os.environ.get("IPDFER_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    _missing("no chromium executable")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def web_url(tmp_path_factory):
    """`ipdfer serve` in in-process mode on a free port, ready (model loaded)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "IPDFER_REDIS_URL", "IPDFER_API_KEY")}
    env.update({"IPDFER_TORCH_THREADS": "1", "IPDFER_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"})
    log_path = tmp_path_factory.mktemp("web") / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"ipdfer serve exited:\n{log_path.read_text(errors='replace')[-3000:]}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "ipdfer serve not ready after 180 s"
            time.sleep(0.2)
        yield url
    finally:
        terminate(proc)


def fake_camera(path: Path) -> Path:
    """A clip of a face as a Y4M file (Chromium's fake camera format), played in a loop as the webcam."""
    from tests.test_video import close_up_face, encode_clip
    path.write_bytes(encode_clip(close_up_face(), codec="rawvideo", fmt="yuv4mpegpipe"))
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = chromium_path()
    camera = fake_camera(tmp_path_factory.mktemp("camera") / "face.y4m")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=executable, headless=True,
            # --no-sandbox: CI runs as root; fake media: a clip of a face as the webcam.
            args=["--no-sandbox", "--disable-dev-shm-usage", "--use-fake-device-for-media-stream",
                  "--use-fake-ui-for-media-stream", f"--use-file-for-fake-video-capture={camera}"])
        yield b
        b.close()


class Page:
    """A fresh page on the service that records console errors and every request URL."""

    def __init__(self, browser, url: str) -> None:
        self.url = url
        self.context = browser.new_context(viewport={"width": 1200, "height": 860})
        self.context.grant_permissions(["camera"], origin=url)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(url + "/")
        self.page.wait_for_selector('#status[data-ready="true"]', timeout=30_000)

    def wait_state(self, *states: str, timeout: float = 90_000) -> str:
        self.page.wait_for_function(
            f"() => {json.dumps(list(states))}.includes(document.body.dataset.state)", timeout=timeout)
        return self.page.evaluate("document.body.dataset.state")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, web_url):
    p = Page(browser, web_url)
    yield p
    p.close()


def test_pick_a_photo_draws_boxes_bars_pose_and_neutral_render(page, tmp_path):
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(encode(astronaut(), "JPEG", quality=92))
    pg = page.page
    with pg.expect_response(lambda r: "/predict" in r.url) as answer:
        pg.set_input_files("#file", str(photo))
    assert answer.value.status == 200
    assert "neutral=true" in answer.value.url  # the page asks for the neutral render by default
    api = answer.value.json()
    assert page.wait_state("done", "error") == "done", pg.inner_text("#error")
    faces = api["faces"]
    assert faces, "the API found no face on the astronaut"

    # boxes: drawn on a canvas in the image's own pixel grid, where the API put them
    overlay = pg.evaluate("""() => { const c = document.getElementById('overlay');
        return {w: c.width, h: c.height, boxes: JSON.parse(c.dataset.boxes),
                cssW: c.getBoundingClientRect().width, imgW: document.getElementById('photo').getBoundingClientRect().width}; }""")
    assert (overlay["w"], overlay["h"]) == (api["image"]["width"], api["image"]["height"])
    assert overlay["cssW"] == pytest.approx(overlay["imgW"], abs=1)  # the canvas covers the photo
    assert [b["box"] for b in overlay["boxes"]] == [f["box"] for f in faces]
    for b in overlay["boxes"]:  # the box's outline is really painted, in its face's colour
        x1, y1, x2, y2 = b["box"]
        rgba = pg.evaluate(f"""() => Array.from(document.getElementById('overlay').getContext('2d')
            .getImageData({round((x1 + x2) / 2)}, {round(y2)}, 1, 1).data)""")
        want = [int(b["color"][i:i + 2], 16) for i in (1, 3, 5)]
        assert rgba[3] == 255 and np.abs(np.array(rgba[:3]) - want).max() <= 2, (rgba, b)

    # one card per face: 7 bars in the API's numbers, the top one marked, pose, neutral render
    cards = pg.locator("#faces > li.face")
    assert cards.count() == len(faces)
    for i, face in enumerate(faces):
        card = cards.nth(i)
        bars = card.locator("li.bar")
        assert bars.count() == 7
        names = [bars.nth(k).get_attribute("data-label") for k in range(7)]
        assert names == list(EXPRESSIONS)
        probs = {n: float(bars.nth(k).get_attribute("data-p")) for k, n in enumerate(names)}
        assert probs == pytest.approx(face["expression"]["probabilities"], abs=1e-6)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
        assert card.locator("li.bar.best").get_attribute("data-label") == face["expression"]["label"]
        widths = card.locator("li.bar .fill").evaluate_all("els => els.map(e => e.getBoundingClientRect().width)")
        assert max(widths) > 0
        for angle in ("yaw", "pitch", "roll"):
            text = card.locator(f"[data-angle={angle}]").inner_text()
            shown = float(text.replace("−", "-").rstrip("°"))
            assert shown == pytest.approx(face["pose"][angle], abs=0.051), (angle, text)
        neutral = card.locator("img.neutral")
        neutral.evaluate("img => img.decode()")
        assert neutral.evaluate("img => img.naturalWidth") > 0
        assert neutral.evaluate("img => img.getBoundingClientRect().width") > 0
        crop_ink = card.locator("canvas.crop").evaluate(
            "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " let v = 0; for (let k = 0; k < d.length; k += 4) v += Math.abs(d[k] - d[k + 4] || 0); return v; }")
        assert crop_ink > 0, "the face crop beside the neutral render is blank"

    assert "face" in pg.inner_text("#summary") and api["model"]["sha256"][:12] in pg.inner_text("#meta")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SCREENSHOT), full_page=True)

    # the residue button fetches GET /neutralize?kind=residue and shows it
    with pg.expect_response(lambda r: "/neutralize" in r.url) as res:
        cards.nth(0).locator(".residue-btn").click()
    assert res.value.status == 200 and res.value.headers["content-type"] == "image/png"
    pg.wait_for_function("() => document.querySelector('#faces img.residue').naturalWidth > 0")

    assert page.errors == []
    offsite = [u for u in page.requests if not u.startswith((page.url, "data:", "blob:"))]
    assert offsite == [], "the page must load nothing from elsewhere (no CDN)"


def test_dropped_photo_without_a_face_says_so(page):
    gray = base64.b64encode(encode(np.full((200, 240, 3), 128, np.uint8), "PNG")).decode()
    pg = page.page
    with pg.expect_response(lambda r: "/predict" in r.url) as answer:
        pg.evaluate("""(b64) => {
            const bytes = Uint8Array.from(atob(b64), ch => ch.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'gray.png', {type: 'image/png'}));
            document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
        }""", gray)
    assert answer.value.status == 200 and answer.value.json()["faces"] == []
    assert page.wait_state("done", "error") == "done"
    assert "No face found" in pg.inner_text("#summary")
    assert pg.locator("#faces > li").count() == 0
    assert json.loads(pg.get_attribute("#overlay", "data-boxes")) == []
    assert page.errors == []


@pytest.mark.parametrize("name, body, mime", [
    ("anim.gif", encode(np.zeros((32, 32, 3), np.uint8), "GIF"), "image/gif"),
    ("notes.txt", b"not an image at all", "text/plain"),
    ("tiny.png", encode(np.zeros((4, 4, 3), np.uint8), "PNG"), "image/png"),
])
def test_api_errors_are_shown_with_their_detail(page, web_url, name, body, mime):
    expected = httpx.post(f"{web_url}/predict", files={"file": (name, body, mime)}, timeout=30)
    assert 400 <= expected.status_code < 500
    pg = page.page
    pg.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": body}])
    assert page.wait_state("error", "done") == "error"
    shown = pg.inner_text("#error")
    assert shown.startswith(f"Error {expected.status_code}: ")
    assert expected.json()["detail"] in shown
    assert pg.is_visible("#error")
    # the failed request's 4xx is logged by Chromium as a console error; nothing else may be
    assert all("Failed to load resource" in e for e in page.errors), page.errors


def test_webcam_capture_is_analysed(page):
    pg = page.page
    pg.click("#webcam")
    pg.wait_for_function("() => document.getElementById('video').videoWidth > 0", timeout=20_000)
    assert pg.is_hidden("#drop")
    with pg.expect_response(lambda r: "/predict" in r.url) as answer:
        pg.click("#capture")
    assert answer.value.status == 200  # Chromium's fake camera: the face clip, a real JPEG
    assert page.wait_state("done", "error") == "done"
    assert pg.is_visible("#drop") and pg.is_hidden("#camera")
    assert pg.evaluate("document.getElementById('photo').naturalWidth") > 0
    assert page.errors == []


def test_live_camera_tracks_the_face_and_draws_its_smoothed_bars(page):
    pg = page.page
    pg.click("#webcam")
    pg.wait_for_function("() => document.getElementById('video').videoWidth > 0", timeout=20_000)
    pg.click("#live")
    assert pg.is_visible("#live-panel") and pg.is_hidden("#camera")
    pg.wait_for_function("() => +document.getElementById('live-meta').dataset.answered >= 6", timeout=90_000)
    boxes = json.loads(pg.get_attribute("#live-overlay", "data-boxes"))
    assert [b["track"] for b in boxes] == [1], boxes   # one face, one track across the frames
    x1, y1, x2, y2 = boxes[0]["box"]
    assert 60 <= y1 < y2 <= 260 and 50 < x2 - x1 < 160   # the face of the 200 px close-up (close_up_face)
    bars = pg.query_selector_all("#live-faces .face[data-track='1'] .bar")
    assert [b.get_attribute("data-label") for b in bars] == list(EXPRESSIONS)
    assert sum(float(b.get_attribute("data-p")) for b in bars) == pytest.approx(1.0, abs=1e-3)
    LIVE_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(LIVE_SCREENSHOT), full_page=True)
    pg.click("#live-stop")
    assert pg.evaluate("document.body.dataset.live") == "off" and pg.is_hidden("#live-panel")
    assert pg.is_visible("#drop")
    assert page.errors == [] and all(u.startswith(page.url.replace("http", "ws", 1)) or u.startswith(page.url)
                                     for u in page.requests)


def test_a_video_upload_plots_each_person_over_time(page, tmp_path):
    from tests.test_video import encode_clip, moving_face
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_clip(moving_face(50)))
    pg = page.page
    with pg.expect_response(lambda r: r.url.endswith("/videos")) as answer:
        pg.set_input_files("#video-file", str(clip))
    assert answer.value.status == 202
    pg.wait_for_function("() => ['done', 'failed'].includes(document.body.dataset.video)", timeout=120_000)
    assert pg.evaluate("document.body.dataset.video") == "done", pg.inner_text("#error")
    plots = pg.query_selector_all("#video-tracks .video-track")
    assert [p.get_attribute("data-track") for p in plots] == ["1"]
    assert pg.get_attribute("#video-tracks canvas", "data-points") == "10"   # 2 s at 5 frames/s
    assert len(pg.query_selector_all("#video-tracks .legend span")) == 7
    assert "10 frames analysed, 1 person" in pg.inner_text("#video-status")
    # a broken upload: the API's detail on the page
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    pg.set_input_files("#video-file", str(tmp_path / "broken.mp4"))
    pg.wait_for_function("() => document.body.dataset.video === 'failed'", timeout=30_000)
    assert "Error 400" in pg.inner_text("#error") and "not a video container" in pg.inner_text("#error")


def test_page_is_self_contained():
    """No build step, no CDN: every asset index.html names is a file beside it, and no
    file of the page points at another origin. (Runs without a browser.)"""
    html = (STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assets = [r for r in refs if not r.startswith(("data:", "#")) and r != "docs"]
    assert {"style.css", "app.js", "live.js"} <= set(assets)
    for ref in assets:
        assert (STATIC / ref).is_file(), ref
    for name in ("index.html", "app.js", "live.js", "style.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}", text), f"{name} points at another origin"
        assert "@import" not in text and "<script src=\"http" not in text
    js = (STATIC / "app.js").read_text()
    # relative URLs only, so the page works behind a proxy under a sub-path
    assert re.findall(r"fetch\(`?\"?([a-z]+)", js) and not re.search(r"fetch\(`?\"?/", js)
