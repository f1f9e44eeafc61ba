"""Per-track smoothing of expression probabilities: an exponential moving
average whose weight follows the time between samples, alpha = 1 - exp(-dt/tau),
so the same `tau` (seconds) means the same smoothing at any sampling rate.
tau = 0 returns the raw probabilities."""
from __future__ import annotations

import math

import numpy as np


class Smoother:
    def __init__(self, tau_s: float = 0.5) -> None:
        if tau_s < 0:
            raise ValueError("smoothing tau must be >= 0 seconds")
        self.tau_s = tau_s
        self.state: dict[int, tuple[float, np.ndarray]] = {}

    def __call__(self, track: int, t: float, probs: np.ndarray) -> np.ndarray:
        probs = np.asarray(probs, float)
        last = self.state.get(track)
        if last is None or self.tau_s == 0:
            out = probs
        else:
            alpha = 1.0 - math.exp(-max(t - last[0], 0.0) / self.tau_s)
            out = last[1] + alpha * (probs - last[1])
        self.state[track] = (t, out)
        return out
