"""`ipdfer video`'s speed, memory and smoothing, on clips this script encodes
(H.264, the public-domain astronaut portrait drifting over a background):

- speed: a `--seconds` (default 60) clip at `--size` (default 1280x720), 25 fps,
  analysed at `--fps` (default 5): wall time and sampled frames/s;
- memory: peak RSS of the analysis of that clip and of one `--long` times longer
  (default 10x), each in a fresh process (`--memory`);
- smoothing: label changes per second of the steady-expression clip, raw vs
  smoothed (`--smoothing` tau).

    .venv/bin/python benchmarks/video.py                       # speed + smoothing, ~2 min on 2 cores
    .venv/bin/python benchmarks/video.py --memory --long 10    # + peak RSS 1x vs 10x (minutes)
    .venv/bin/python benchmarks/video.py --http inprocess      # the same clip through POST /videos
    .venv/bin/python benchmarks/video.py --http redis --workers 2
    .venv/bin/python benchmarks/video.py --steady a.jpg b.jpg  # smoothing on real faces held still

With `--steady`, each photo becomes a `--seconds` clip of a face held still in
front of a hand-held camera (per frame: shift, zoom and rotation jitter, exposure
flicker, sensor noise, then H.264): the expression does not change, so every
label change is noise. Printed per photo and in all: label changes per second
raw vs smoothed (tau 0.5 and 1 s), and the share of frames labelled as the photo
is when sent as one image.

With `--http`, a service is started here on 127.0.0.1 (benchmarks/load.py's
launcher), the clip is uploaded to POST /videos and GET /videos/{id} is polled:
the time is from the upload's start to status done.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_clip(path: Path, seconds: float, size: tuple[int, int], rate: int = 25) -> None:
    import av
    from PIL import Image
    from skimage import data
    w, h = size
    face = np.asarray(Image.fromarray(data.astronaut()).resize((h // 2, h // 2)))
    out = av.open(str(path), "w")
    s = out.add_stream("libx264", rate=rate, options={"preset": "ultrafast"})
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    n = int(seconds * rate)
    for k in range(n):
        img = np.full((h, w, 3), 80, np.uint8)
        x = int((w - h // 2) * (0.5 + 0.4 * np.sin(k / rate)))   # drifts left and right
        img[h // 4:h // 4 + h // 2, x:x + h // 2] = face
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()


def steady_clip(photo: Path, path: Path, seconds: float, rate: int = 25, seed: int = 0) -> None:
    import av
    import cv2
    rgb = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    rng = np.random.default_rng(seed)
    out = av.open(str(path), "w")
    s = out.add_stream("libx264", rate=rate, options={"preset": "ultrafast", "crf": "23"})
    s.width, s.height, s.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
    drift = np.zeros(4)
    for _ in range(int(seconds * rate)):
        drift = 0.9 * drift + rng.normal(0, [0.6, 0.6, 0.004, 0.3])      # a hand: slow, correlated
        dx, dy, zoom, angle = drift
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1 + zoom)
        m[:, 2] += (dx, dy)
        frame = cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REFLECT).astype(np.float32)
        frame = frame * (1 + rng.normal(0, 0.03)) + rng.normal(0, 4, frame.shape)   # exposure, sensor noise
        frame = np.clip(frame, 0, 255).astype(np.uint8)[:s.height, :s.width]
        for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()


def steady(photos: list[Path], seconds: float, fps: float) -> None:
    import cv2
    from model.serving.analyzer import Analyzer, ImageRequest
    from model.video.analyze import VideoOptions, analyze_video
    analyzer = Analyzer.load()
    analyzer.warmup()
    changes = lambda labels: sum(a != b for a, b in zip(labels, labels[1:]))  # noqa: E731
    totals = {"raw": 0, "0.5": 0, "1": 0, "frames": 0, "same": 0, "seconds": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for photo in photos:
            image = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
            faces = analyzer.analyze([ImageRequest(image, max_faces=1)]).images[0].faces
            if not faces:
                print(f"{photo.name}: no face found in the photo, skipped")
                continue
            still = faces[0].label
            clip = Path(tmp) / f"{photo.stem}.mp4"
            steady_clip(photo, clip, seconds)
            row = {}
            for tau in (0.5, 1.0):
                result = analyze_video(analyzer, clip, VideoOptions(fps=fps, smoothing_s=tau, max_faces=1))
                raw = [f["faces"][0]["label"] for f in result.frames if f["faces"]]
                row[f"{tau:g}"] = changes([f["faces"][0]["smoothed_label"] for f in result.frames if f["faces"]])
            row["raw"], row["frames"], row["same"] = changes(raw), len(raw), sum(label == still for label in raw)
            for k in row:
                totals[k] += row[k]
            totals["seconds"] += seconds
            print(f"{photo.name}: photo read as {still}; {row['frames']} frames with a face, {row['same']} labelled "
                  f"{still}; label changes/s raw {row['raw'] / seconds:.3f}, smoothed tau 0.5 s "
                  f"{row['0.5'] / seconds:.3f}, tau 1 s {row['1'] / seconds:.3f}", flush=True)
    t = totals["seconds"] or 1.0
    print(f"all {len(photos)} photos, {t:g} s of video: label changes/s raw {totals['raw'] / t:.3f}, smoothed "
          f"tau 0.5 s {totals['0.5'] / t:.3f}, tau 1 s {totals['1'] / t:.3f}; frames labelled as the photo "
          f"{totals['same'] / max(totals['frames'], 1):.1%}")


def analyse(path: Path, fps: float, smoothing: float) -> dict:
    from model.serving.analyzer import Analyzer
    from model.video.analyze import VideoOptions, analyze_video
    analyzer = Analyzer.load()
    analyzer.warmup()
    t0 = time.perf_counter()
    result = analyze_video(analyzer, path, VideoOptions(fps=fps, smoothing_s=smoothing))
    wall = time.perf_counter() - t0
    raw = [f["faces"][0]["label"] for f in result.frames if f["faces"]]
    smooth = [f["faces"][0]["smoothed_label"] for f in result.frames if f["faces"]]
    changes = lambda labels: sum(a != b for a, b in zip(labels, labels[1:]))  # noqa: E731
    duration = result.info["duration_s"] or len(result.frames) / fps
    return {"wall_s": round(wall, 2), "frames": len(result.frames), "frames_per_s": round(len(result.frames) / wall, 2),
            "faces_found": len(raw), "tracks": len(result.tracks),
            "label_changes_per_s": {"raw": round(changes(raw) / duration, 3),
                                    "smoothed": round(changes(smooth) / duration, 3)},
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def over_http(path: Path, mode: str, workers: int, fps: float, smoothing: float) -> dict:
    import httpx
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from load import running
    with tempfile.TemporaryDirectory() as logs, running(mode, 16, 10.0, workers, Path(logs)) as (url, ready):
        with httpx.Client(base_url=url, timeout=600) as c:
            t0 = time.perf_counter()
            r = c.post("/videos", params={"fps": fps, "smoothing": smoothing}, content=path.read_bytes(),
                       headers={"content-type": "video/mp4"})
            r.raise_for_status()
            uploaded = time.perf_counter() - t0
            while (body := c.get(r.headers["location"]).json())["status"] not in ("done", "failed"):
                time.sleep(0.2)
            wall = time.perf_counter() - t0
    if body["status"] != "done":
        raise SystemExit(f"video failed: {body['error']}")
    frames = body["result"]["frames"]
    return {"mode": mode, "workers": len(ready["workers"]), "wall_s": round(wall, 2), "upload_s": round(uploaded, 2),
            "frames": len(frames), "frames_per_s": round(len(frames) / wall, 2),
            "tracks": len(body["result"]["tracks"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--fps", type=float, default=5.0)
    ap.add_argument("--smoothing", type=float, default=0.5)
    ap.add_argument("--memory", action="store_true", help="also peak RSS of a --long times longer clip")
    ap.add_argument("--long", type=float, default=10.0)
    ap.add_argument("--http", choices=("inprocess", "redis"), help="through POST /videos of a service started here")
    ap.add_argument("--workers", type=int, default=2, help="--http redis: worker processes")
    ap.add_argument("--steady", type=Path, nargs="+", metavar="PHOTO", help="smoothing on these faces held still")
    ap.add_argument("--analyse", type=Path, help=argparse.SUPPRESS)   # child process: one clip, JSON out
    args = ap.parse_args(argv)
    if args.analyse:
        print(json.dumps(analyse(args.analyse, args.fps, args.smoothing)))
        return 0
    if args.steady:
        steady(args.steady, args.seconds, args.fps)
        return 0
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        clips = [(args.seconds, Path(tmp) / "clip.mp4")]
        if args.memory:
            clips.append((args.seconds * args.long, Path(tmp) / "long.mp4"))
        for seconds, path in clips:
            t0 = time.perf_counter()
            make_clip(path, seconds, size)
            print(f"encoded {seconds:g} s at {args.size} in {time.perf_counter() - t0:.0f} s "
                  f"({path.stat().st_size / 1e6:.1f} MB)", flush=True)
            if args.http:
                row = over_http(path, args.http, args.workers, args.fps, args.smoothing)
                print(f"{seconds:6g} s clip through POST /videos ({row['mode']}, {row['workers']} worker(s)): "
                      f"{row['frames']} frames in {row['wall_s']} s ({row['frames_per_s']} frames/s; upload "
                      f"{row['upload_s']} s), {row['tracks']} track(s)", flush=True)
                continue
            out = subprocess.run([sys.executable, __file__, "--analyse", str(path), "--fps", str(args.fps),
                                  "--smoothing", str(args.smoothing)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{seconds:6g} s clip: {row['frames']} frames analysed in {row['wall_s']} s "
                  f"({row['frames_per_s']} frames/s), {row['tracks']} track(s), peak RSS {row['peak_rss_mb']} MB; "
                  f"label changes/s raw {row['label_changes_per_s']['raw']} vs smoothed "
                  f"{row['label_changes_per_s']['smoothed']} (tau {args.smoothing:g} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
