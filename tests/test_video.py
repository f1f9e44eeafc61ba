"""Video: streamed sampled decoding (PyAV), the tracker, the smoothing and the
analysis over the real model, on clips the tests encode from the public-domain
astronaut portrait; plus a corpus of broken containers."""
from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from model.labels import EXPRESSIONS
from model.serving.analyzer import Analyzer, ImageRequest
from model.video.analyze import CSV_COLUMNS, VideoOptions, analyze_video, to_csv
from model.video.decode import VideoError, VideoLimits, read_info, sample
from model.video.smooth import Smoother
from model.video.track import Tracker
from tests.data_samples import astronaut

REPO = Path(__file__).resolve().parents[1]


def encode_clip(frames: list[np.ndarray], codec: str = "libx264", fmt: str = "mp4", rate: int = 25) -> bytes:
    buf = io.BytesIO()
    out = av.open(buf, "w", format=fmt)
    s = out.add_stream(codec, rate=rate)
    s.height, s.width = frames[0].shape[:2]
    s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    for f in frames:
        for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()
    return buf.getvalue()


def moving_face(n: int = 50, size: tuple[int, int] = (240, 360), step: int = 3) -> list[np.ndarray]:
    """The astronaut's face (130 px) sliding left to right over a grey background."""
    face = np.asarray(Image.fromarray(astronaut()).resize((130, 130)))
    frames = []
    for k in range(n):
        img = np.full((*size, 3), 70, np.uint8)
        img[50:180, 10 + k * step:140 + k * step] = face
        frames.append(img)
    return frames


def close_up_face(n: int = 100) -> list[np.ndarray]:
    """A close-up of the astronaut's face (200 px) drifting right and back (the
    camera loops the clip) over a grey 480 x 320 background, 2 px a frame."""
    face = np.asarray(Image.fromarray(astronaut()[20:276, 120:376]).resize((200, 200)))
    frames = []
    for k in range(n):
        x = 40 + 2 * min(k, n - k)
        img = np.full((320, 480, 3), 70, np.uint8)
        img[60:260, x:x + 200] = face
        frames.append(img)
    return frames


@pytest.fixture(scope="module")
def analyzer():
    return Analyzer.load(device="cpu", precision="fp32")


# --- decoding ------------------------------------------------------------------------

@pytest.mark.parametrize("codec,fmt", [("libx264", "mp4"), ("libvpx-vp9", "webm"), ("mjpeg", "avi"),
                                       ("libx264", "mov")])
def test_frames_are_sampled_at_the_asked_rate_from_every_container(codec, fmt):
    clip = encode_clip(moving_face(50), codec, fmt)          # 2 s at 25 fps
    stats: dict = {}
    frames = list(sample(clip, every_s=0.2, stats=stats))
    assert [f.t for f in frames] == pytest.approx([0.2 * k for k in range(10)], abs=0.021)
    assert [f.index for f in frames] == [5 * k for k in range(10)]
    assert frames[0].rgb.shape == (240, 360, 3) and stats["decoded"] == 50 and stats["broken_packets"] == 0
    assert read_info(clip).width == 360


def test_sampling_keeps_memory_to_one_frame_at_a_time():
    clip = encode_clip(moving_face(50))
    frames = sample(clip, every_s=0.2)
    first = next(frames)
    second = next(frames)
    assert first.rgb is not second.rgb and second.t == pytest.approx(0.2, abs=0.021)   # a generator, not a list


def broken_corpus() -> list[tuple[str, bytes]]:
    clip = encode_clip(moving_face(25))
    jpeg = io.BytesIO()
    Image.fromarray(astronaut()).save(jpeg, format="JPEG")
    audio = io.BytesIO()
    out = av.open(audio, "w", format="wav")
    s = out.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for p in s.encode(frame):
        out.mux(p)
    out.close()
    rng = np.random.default_rng(0)
    return [("empty", b""), ("random", rng.bytes(5000)), ("jpeg-as-video", jpeg.getvalue()),
            ("audio-only", audio.getvalue()), ("truncated-header", clip[:200]),
            ("mp4-magic-then-junk", clip[:32] + rng.bytes(4000))]


@pytest.mark.parametrize("name,data", broken_corpus(), ids=[n for n, _ in broken_corpus()])
def test_a_broken_container_is_a_bad_video_error(name, data):
    with pytest.raises(VideoError) as e:
        list(sample(data, every_s=0.2))
    assert e.value.kind == ("unsupported_video" if name == "jpeg-as-video" else "bad_video"), e.value.detail
    assert len(e.value.detail) > 10


def test_limits_are_checked_from_the_header_before_decoding():
    clip = encode_clip(moving_face(50))
    with pytest.raises(VideoError, match="limit is 1 s") as e:
        next(sample(clip, 0.2, VideoLimits(max_duration_s=1.0)))
    assert e.value.kind == "video_too_large"
    with pytest.raises(VideoError, match="px a side"):
        next(sample(clip, 0.2, VideoLimits(max_side=320)))
    with pytest.raises(VideoError, match="frames/s"):
        next(sample(clip, 0.2, VideoLimits(max_fps=10)))


def test_a_broken_frame_in_the_middle_is_skipped_and_counted():
    frames = moving_face(30)
    clip = bytearray(encode_clip(frames, "mjpeg", "avi"))
    # overwrite the entropy-coded data of one frame in the middle (MJPEG: each frame stands alone)
    starts = [i for i in range(len(clip) - 1) if clip[i] == 0xFF and clip[i + 1] == 0xDA]
    k = starts[15]
    clip[k + 20:k + 2000] = bytes(1980)
    stats: dict = {}
    got = list(sample(bytes(clip), every_s=0.0001, stats=stats))   # every frame
    assert 28 <= len(got) <= 30   # the corrupt frame is dropped or concealed; the rest all decode
    assert got[-1].index >= 28


# --- tracking and smoothing ------------------------------------------------------------

def test_two_people_crossing_keep_their_ids_and_a_returning_person_gets_theirs_back():
    rng = np.random.default_rng(0)
    alice, bob, carol = (rng.normal(size=128) * 0.05 for _ in range(3))
    tracker = Tracker()
    seen = []
    for k in range(20):   # they walk towards each other and cross at k = 10
        xa, xb = 10 + 10 * k, 210 - 10 * k
        boxes = np.array([[xa, 50, xa + 60, 110], [xb, 55, xb + 60, 115]], float)
        desc = np.stack([alice + rng.normal(size=128) * 0.01, bob + rng.normal(size=128) * 0.01])
        seen.append(tracker.update(k * 0.2, boxes, desc))
    assert all(ids == [1, 2] for ids in seen), seen
    # Alice leaves for 5 s and comes back elsewhere; Carol appears
    ids = tracker.update(9.0, np.array([[300, 40, 360, 100], [20, 40, 80, 100]], float),
                         np.stack([alice + rng.normal(size=128) * 0.01, carol]))
    assert ids == [1, 3]


def test_a_live_tracker_forgets_people_gone_for_long_and_never_reuses_an_id():
    tracker = Tracker(forget_after_s=10.0)
    box = np.array([[10, 10, 60, 60]], float)
    assert tracker.update(0.0, box) == [1]
    assert tracker.forget(0.5) == [] and tracker.update(0.5, box) == [1]
    assert tracker.forget(20.0) == [1] and not tracker.tracks
    assert tracker.update(20.0, box) == [2]
    assert Tracker().forget(1e9) == []   # a video's tracker keeps everyone


def test_without_descriptors_overlap_alone_decides():
    tracker = Tracker()
    assert tracker.update(0.0, np.array([[0, 0, 50, 50]])) == [1]
    assert tracker.update(0.2, np.array([[5, 0, 55, 50]])) == [1]
    assert tracker.update(0.4, np.array([[200, 0, 250, 50]])) == [2]     # no overlap: someone else


def test_smoothing_lowers_label_changes_on_a_steady_expression_and_follows_a_real_change():
    rng = np.random.default_rng(0)
    base = np.array([0.2, 0.45, 0.05, 0.05, 0.05, 0.05, 0.15])   # happy, with neutral close behind
    raw, smooth = [], []
    smoother = Smoother(tau_s=0.5)
    for k in range(100):
        p = np.clip(base + rng.normal(0, 0.12, 7), 1e-3, None)
        p = p / p.sum() if k < 70 else np.eye(7)[2]   # at 14 s the face turns sad
        raw.append(int(np.argmax(p)))
        smooth.append(int(np.argmax(smoother(1, k * 0.2, p))))
    changes = lambda labels: sum(a != b for a, b in zip(labels[:70], labels[1:70]))  # noqa: E731
    assert changes(smooth) < changes(raw) / 2
    assert smooth[-1] == 2 and smooth[75] == 2   # reaches the new expression within 1 s


def test_tau_means_the_same_smoothing_at_any_sampling_rate():
    a, b = Smoother(0.5), Smoother(0.5)
    start, end = np.eye(7)[0], np.eye(7)[1]
    a(1, 0.0, start), b(1, 0.0, start)
    for k in range(1, 6):
        out_a = a(1, 0.2 * k, end)
    for k in range(1, 11):
        out_b = b(1, 0.1 * k, end)
    np.testing.assert_allclose(out_a, out_b, atol=1e-9)


# --- the analysis over the real model -------------------------------------------------------

def test_a_video_gives_one_track_and_each_frame_what_predict_gives(analyzer, tmp_path):
    clip = encode_clip(moving_face(50))
    result = analyze_video(analyzer, clip, VideoOptions(fps=5.0))
    assert len(result.frames) == 10 and [t["track"] for t in result.tracks] == [1]
    track = result.tracks[0]
    assert track["frames"] == 10 and track["first_s"] == 0.0 and track["last_s"] == pytest.approx(1.8, abs=0.02)
    assert sum(track["share"].values()) == pytest.approx(1.0, abs=1e-3) and track["dominant"] in EXPRESSIONS
    # the same frames through the engine one by one: the same faces
    decoded = list(sample(clip, 0.2))
    for fr, frame in zip(result.frames, decoded):
        (face,) = analyzer.analyze([ImageRequest(frame.rgb, max_faces=8)]).images[0].faces
        (row,) = fr["faces"]
        assert row["box"] == face.box   # batched with other frames vs alone: equal up to float noise
        assert max(abs(row["probabilities"][c] - face.probabilities[c]) for c in EXPRESSIONS) < 1e-4
    lines = to_csv(result).splitlines()
    assert lines[0].split(",") == CSV_COLUMNS and len(lines) == 11
    json.dumps(result.to_dict())   # JSON-ready


def test_ipdfer_video_command(tmp_path, capsys):
    from service import cli
    (tmp_path / "clip.webm").write_bytes(encode_clip(moving_face(25), "libvpx-vp9", "webm"))
    assert cli.main(["video", str(tmp_path / "clip.webm"), "--csv", str(tmp_path / "out.csv"),
                     "--device", "cpu"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["track"] == 1
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 6
    (tmp_path / "not.mp4").write_bytes(b"not a video at all")
    assert cli.main(["video", str(tmp_path / "not.mp4")]) == 1
    assert json.loads(capsys.readouterr().out)["error"] == "bad_video"


def two_people(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Photos (160 px) of the first two muxspace test subjects with two photos each."""
    import csv
    rows = list(csv.DictReader(open(REPO / "model" / "manifests" / "muxspace.csv")))
    by_subject: dict[str, list[str]] = {}
    for r in rows:
        if r["split"] == "test":
            by_subject.setdefault(r["subject"], []).append(r["path"])
    subjects = [s for s, paths in sorted(by_subject.items()) if len(paths) >= 2][:2]
    load = lambda rel: np.asarray(Image.open(data / "muxspace" / rel).convert("RGB").resize((160, 160)))  # noqa: E731
    return tuple(load(by_subject[s][0]) for s in subjects)


def test_two_people_who_swap_places_after_one_leaves_keep_their_ids(analyzer, shared_dir):
    """A left, B right; A leaves for 2 s while B walks to the middle; then B is on
    the left (A's old place) and A on the right (B's): boxes alone would give A a new
    id or B's; the descriptors must give each their own back."""
    from tests.data_samples import data_dir
    a, b = two_people(data_dir(shared_dir))
    frames, who = [], []
    for k in range(60):   # 6 s at 10 fps
        img = np.full((240, 640, 3), 90, np.uint8)
        if k < 20:
            img[40:200, 40:200], img[40:200, 440:600] = a, b
            who.append({"A": 120, "B": 520})
        elif k < 40:
            img[40:200, 240:400] = b     # A gone; B walks to the middle
            who.append({"B": 320})
        else:
            img[40:200, 40:200], img[40:200, 440:600] = b, a   # swapped
            who.append({"B": 120, "A": 520})
        frames.append(img)
    result = analyze_video(analyzer, encode_clip(frames, rate=10), VideoOptions(fps=5.0))
    assert len(result.frames) == 30
    ids: dict[str, set[int]] = {"A": set(), "B": set()}
    for fr, people in zip(result.frames, who[::2]):
        assert len(fr["faces"]) == len(people), fr
        for face in fr["faces"]:
            cx = (face["box"][0] + face["box"][2]) / 2
            person = min(people, key=lambda p: abs(people[p] - cx))
            ids[person].add(face["track"])
    assert len(ids["A"]) == 1 and len(ids["B"]) == 1 and ids["A"] != ids["B"], ids   # 0 identity switches
    assert len(result.tracks) == 2
