"""A video through the serving engine: sampled frames in batches through the
Analyzer (the same detection, alignment and encoders as POST /predict), each
face given a track (track.py) and smoothed probabilities (smooth.py); then a
summary per track and a CSV with one row per (frame, track)."""
from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from model.labels import EXPRESSIONS
from model.serving.analyzer import Analyzer, ImageRequest
from model.video.decode import Source, VideoLimits, sample
from model.video.smooth import Smoother
from model.video.track import Tracker


@dataclass
class VideoOptions:
    fps: float = 5.0              # frames analysed per second of video
    smoothing_s: float = 0.5      # tau of the per-track smoothing (0 = none)
    max_faces: int = 8            # per frame, best detections first
    batch: int = 8                # frames per Analyzer call


@dataclass
class VideoResult:
    info: dict
    frames: list[dict] = field(default_factory=list)
    tracks: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"video": self.info, "frames": self.frames, "tracks": self.tracks, "stats": self.stats}


def _label(p: np.ndarray) -> str:
    return EXPRESSIONS[int(np.argmax(p))]


def summarize(frames: list[dict]) -> list[dict]:
    """Per track: first/last time, frames, dominant (smoothed) expression, share of
    its frames per expression, mean pose."""
    by_track: dict[int, list[dict]] = {}
    for fr in frames:
        for face in fr["faces"]:
            by_track.setdefault(face["track"], []).append({**face, "t": fr["t"]})
    out = []
    for track, faces in sorted(by_track.items()):
        labels = Counter(f["smoothed_label"] for f in faces)
        out.append({"track": track, "first_s": faces[0]["t"], "last_s": faces[-1]["t"], "frames": len(faces),
                    "dominant": labels.most_common(1)[0][0],
                    "share": {c: round(labels.get(c, 0) / len(faces), 4) for c in EXPRESSIONS},
                    "mean_pose": {a: round(float(np.mean([f["pose"][a] for f in faces])), 2)
                                  for a in ("yaw", "pitch", "roll")}})
    return out


def analyze_video(analyzer: Analyzer, source: Source, options: VideoOptions = VideoOptions(),
                  limits: VideoLimits = VideoLimits(),
                  progress: Callable[[int, int | None], None] | None = None) -> VideoResult:
    """`progress(frames_done, frames_expected)` is called after each batch."""
    tracker, smoother, stats = Tracker(), Smoother(options.smoothing_s), {}
    frames: list[dict] = []
    pending = []

    def flush() -> None:
        results = analyzer.analyze([ImageRequest(f.rgb, max_faces=options.max_faces) for f in pending]).images
        per_frame = [res.faces if res.error is None else [] for res in results]
        # one identity pass for the whole batch's faces, split back per frame
        descriptors = analyzer.identities([fc.state for faces in per_frame for fc in faces])
        ends = np.cumsum([len(faces) for faces in per_frame])
        for f, res, faces, end in zip(pending, results, per_frame, ends):
            boxes = np.array([fc.box for fc in faces], float).reshape(-1, 4)
            ids = tracker.update(f.t, boxes, descriptors[end - len(faces):end] if faces else None)
            rows = []
            for fc, track in zip(faces, ids):
                raw = np.array([fc.probabilities[c] for c in EXPRESSIONS])
                smooth = smoother(track, f.t, raw)
                rows.append({"track": track, "box": fc.box, "score": fc.score, "pose": fc.pose,
                             "probabilities": fc.probabilities, "label": fc.label,
                             "smoothed": {c: round(float(p), 5) for c, p in zip(EXPRESSIONS, smooth)},
                             "smoothed_label": _label(smooth)})
            frames.append({"frame": f.index, "t": f.t, "faces": rows,
                           **({"error": str(res.error)} if res.error is not None else {})})
        pending.clear()
        if progress:
            info = stats.get("info")
            progress(len(frames), info.expected_samples(1 / options.fps) if info else None)

    for frame in sample(source, 1.0 / options.fps, limits, stats):
        pending.append(frame)
        if len(pending) >= options.batch:
            flush()
    if pending:
        flush()
    info = stats.pop("info")
    return VideoResult(info=info.__dict__, frames=frames, tracks=summarize(frames),
                       stats={**stats, "options": options.__dict__})


CSV_COLUMNS = (["frame", "time_s", "track", "x1", "y1", "x2", "y2", "score", "yaw", "pitch", "roll", "label",
                "smoothed_label"] + [f"p_{c}" for c in EXPRESSIONS] + [f"smoothed_{c}" for c in EXPRESSIONS])


def to_csv(result: VideoResult) -> str:
    """One row per (sampled frame, track), py-feat Fex style: wide, one column per value."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for fr in result.frames:
        for f in fr["faces"]:
            w.writerow([fr["frame"], fr["t"], f["track"], *f["box"], f["score"],
                        *(f["pose"][a] for a in ("yaw", "pitch", "roll")), f["label"], f["smoothed_label"],
                        *(f["probabilities"][c] for c in EXPRESSIONS), *(f["smoothed"][c] for c in EXPRESSIONS)])
    return buf.getvalue()
