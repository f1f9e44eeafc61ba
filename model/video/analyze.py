"""A video through the serving engine: sampled frames in batches through the
Analyzer (the same detection, alignment and encoders as POST /predict), each
face given a track (track.py) and smoothed probabilities (smooth.py) by a
`Timeline`; then a summary per track and a CSV with one row per (frame, track).

`ipdfer video` calls `analyze_video`; the service's POST /videos (service/videos.py)
sends the same sampled frames through its job queue and feeds the replies to the
same `Timeline`, so both give the same result. Nothing here imports torch (the
Redis-mode API process does not load it); the Analyzer comes in as an argument."""
from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from model.labels import EXPRESSIONS
from model.video.decode import Source, VideoLimits, sample
from model.video.smooth import Smoother
from model.video.track import Tracker

if TYPE_CHECKING:
    from model.serving.analyzer import Analyzer


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


class Timeline:
    """Sampled frames in time order -> tracked, smoothed rows. A face is the dict
    POST /predict answers (box, score, expression {label, probabilities}, pose);
    a row copies only those, so other keys of a face need no removing."""

    def __init__(self, options: VideoOptions, forget_after_s: float | None = None) -> None:
        self.tracker, self.smoother = Tracker(forget_after_s=forget_after_s), Smoother(options.smoothing_s)
        self.frames: list[dict] = []

    def add(self, index: int, t: float, faces: list[dict[str, Any]], descriptors: np.ndarray | None,
            error: str | None = None) -> None:
        for gone in self.tracker.forget(t):
            self.smoother.state.pop(gone, None)
        boxes = np.array([f["box"] for f in faces], float).reshape(-1, 4)
        ids = self.tracker.update(t, boxes, descriptors if faces else None)
        rows = []
        for face, track in zip(faces, ids):
            probs = face["expression"]["probabilities"]
            smooth = self.smoother(track, t, np.array([probs[c] for c in EXPRESSIONS]))
            rows.append({"track": track, "box": face["box"], "score": face["score"], "pose": face["pose"],
                         "probabilities": probs, "label": face["expression"]["label"],
                         "smoothed": {c: round(float(p), 5) for c, p in zip(EXPRESSIONS, smooth)},
                         "smoothed_label": _label(smooth)})
        self.frames.append({"frame": index, "t": t, "faces": rows, **({"error": error} if error else {})})

    def add_served(self, index: int, t: float, faces: list[dict[str, Any]], error: str | None = None) -> None:
        """`add` for faces as the service's analyze replies carry them: each with its
        identity descriptor (asked for with the job's `identity`) under "identity"."""
        descriptors = np.array([f["identity"] for f in faces], np.float32).reshape(-1, 128)
        self.add(index, t, faces, descriptors, error)

    def result(self, info: dict, stats: dict) -> VideoResult:
        return VideoResult(info=info, frames=self.frames, tracks=summarize(self.frames), stats=stats)


def analyze_video(analyzer: Analyzer, source: Source, options: VideoOptions = VideoOptions(),
                  limits: VideoLimits = VideoLimits(),
                  progress: Callable[[int, int | None], None] | None = None) -> VideoResult:
    """`progress(frames_done, frames_expected)` is called after each batch."""
    from model.serving.analyzer import ImageRequest
    timeline, stats, pending = Timeline(options), {}, []

    def flush() -> None:
        results = analyzer.analyze([ImageRequest(f.rgb, max_faces=options.max_faces) for f in pending]).images
        per_frame = [res.faces if res.error is None else [] for res in results]
        # one identity pass for the whole batch's faces, split back per frame
        descriptors = analyzer.identities([fc.state for faces in per_frame for fc in faces])
        ends = np.cumsum([len(faces) for faces in per_frame])
        for f, res, faces, end in zip(pending, results, per_frame, ends):
            timeline.add(f.index, f.t, [fc.to_dict() for fc in faces], descriptors[end - len(faces):end],
                         None if res.error is None else str(res.error))
        pending.clear()
        if progress:
            info = stats.get("info")
            progress(len(timeline.frames), info.expected_samples(1 / options.fps) if info else None)

    for frame in sample(source, 1.0 / options.fps, limits, stats):
        pending.append(frame)
        if len(pending) >= options.batch:
            flush()
    if pending:
        flush()
    info = stats.pop("info")
    return timeline.result(info.__dict__, {**stats, "options": options.__dict__})


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
