"""Per-face tracks across sampled frames: who is who.

Each frame's faces are matched to the tracks seen in the last `max_gap_s`
seconds by box overlap (IoU), one-to-one (Hungarian assignment, scipy), and a
match is refused when the identity descriptors (the frozen dlib network's
128-d codes) say two different people. A face left over is compared with every
track ever seen by descriptor: a person who left and came back gets their old
id when the distance to that track's mean descriptor is under `same_person`,
else a new id. Distances follow dlib's convention (< 0.6: same person); 0.5 is
the stricter threshold used to re-identify across a gap.

A small tracker of our own: ByteTrack (supervision) and norfair track boxes with
motion models built for 25+ fps; at the service's 5 samples a second faces jump
between frames, and the re-identification that matters here is the descriptor's."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,4) x (M,4) boxes x1,y1,x2,y2 -> (N,M) intersection over union."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


@dataclass
class Track:
    id: int
    box: np.ndarray
    last_t: float
    descriptors: list[np.ndarray] = field(default_factory=list)
    _mean: np.ndarray | None = None

    def add(self, descriptor: np.ndarray, keep: int) -> None:
        self.descriptors = (self.descriptors + [descriptor])[-keep:]
        self._mean = None

    def identity(self) -> np.ndarray | None:
        if self._mean is None and self.descriptors:
            self._mean = np.mean(self.descriptors, axis=0)
        return self._mean


class Tracker:
    """`forget_after_s`: tracks unseen this long are dropped (a live camera that runs
    for hours; a video keeps every track so a person can come back at any time)."""

    def __init__(self, min_iou: float = 0.2, max_gap_s: float = 1.0, same_person: float = 0.6,
                 reidentify: float = 0.5, max_descriptors: int = 20, forget_after_s: float | None = None) -> None:
        self.min_iou, self.max_gap_s = min_iou, max_gap_s
        self.same_person, self.reidentify, self.max_descriptors = same_person, reidentify, max_descriptors
        self.forget_after_s = forget_after_s
        self.tracks: dict[int, Track] = {}
        self._next_id = 1

    def forget(self, t: float) -> list[int]:
        """Drop the tracks unseen for `forget_after_s`; their ids (never given again)."""
        if self.forget_after_s is None:
            return []
        gone = [i for i, tr in self.tracks.items() if t - tr.last_t > self.forget_after_s]
        for i in gone:
            del self.tracks[i]
        return gone

    def update(self, t: float, boxes: np.ndarray, descriptors: np.ndarray | None = None) -> list[int]:
        """Track ids for this frame's faces (in the order given)."""
        boxes = np.asarray(boxes, float).reshape(-1, 4)
        n = len(boxes)
        ids: list[int | None] = [None] * n
        recent = [tr for tr in self.tracks.values() if t - tr.last_t <= self.max_gap_s]
        if n and recent:
            overlap = iou(boxes, np.stack([tr.box for tr in recent]))
            cost = 1.0 - overlap
            if descriptors is not None:
                for j, tr in enumerate(recent):
                    ident = tr.identity()
                    if ident is not None:
                        far = np.linalg.norm(descriptors - ident, axis=1) > self.same_person
                        cost[far, j] = 2.0   # another person: never matched by overlap
            rows, cols = linear_sum_assignment(cost)
            for r, c in zip(rows, cols):
                if overlap[r, c] >= self.min_iou and cost[r, c] <= 1.0:
                    ids[r] = recent[c].id
        taken = {i for i in ids if i is not None}
        for k in range(n):
            if ids[k] is None and descriptors is not None:   # someone seen before, back again?
                best, best_d = None, self.reidentify
                for tr in self.tracks.values():
                    ident = tr.identity()
                    if tr.id in taken or ident is None:
                        continue
                    d = float(np.linalg.norm(descriptors[k] - ident))
                    if d < best_d:
                        best, best_d = tr.id, d
                ids[k] = best
            if ids[k] is None:
                ids[k], self._next_id = self._next_id, self._next_id + 1
                self.tracks[ids[k]] = Track(ids[k], boxes[k], t)
            taken.add(ids[k])
            tr = self.tracks[ids[k]]
            tr.box, tr.last_t = boxes[k], t
            if descriptors is not None:
                tr.add(descriptors[k], self.max_descriptors)
        return [int(i) for i in ids]
