"""Screen the ensemble lever: two weights' probabilities averaged (flip on every face),
on the prepare cache's test faces (FER2013 PrivateTest deduplicated, muxspace test).
A screening on test, not a choice: a shipped ensemble's weight is chosen on validation.
Mean class accuracy is over the classes with >= 30 faces.

    .venv/bin/python benchmarks/ensemble_screen.py OTHER_WEIGHTS [--weights weights]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from model.data.datasets import load_split
from model.training.evaluate import encode_all
from model.weights import load_weights

REPO = Path(__file__).resolve().parents[1]


def report(name: str, labels: np.ndarray, probs: np.ndarray) -> None:
    keep = labels >= 0
    pred, labels = probs.argmax(1)[keep], labels[keep]
    per_class = [(pred[labels == c] == c).mean() for c in range(probs.shape[1]) if (labels == c).sum() >= 30]
    print(f"{name:32s} acc {100 * (pred == labels).mean():.2f}  mean class {100 * np.mean(per_class):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("other", type=Path, help="the second weights folder (e.g. a copy of weights 0.5.2)")
    ap.add_argument("--weights", type=Path, default=REPO / "weights")
    args = ap.parse_args()
    first, second = load_weights(args.other), load_weights(args.weights)
    na, nb = first.manifest["version"], second.manifest["version"]
    for dataset in ("fer2013", "muxspace"):
        faces = load_split(dataset, "test", size=64)
        images = np.asarray(faces.images)
        with torch.inference_mode():
            pa = encode_all(first.model.eval(), images, tta=True)["probs"]
            pb = encode_all(second.model.eval(), images, tta=True)["probs"]
        print(f"{dataset} test, {len(images)} faces")
        report(na, faces.labels, pa)
        report(nb, faces.labels, pb)
        for w in (0.3, 0.5):
            report(f"ensemble {w:.1f}·{na} + {1 - w:.1f}·{nb}", faces.labels, w * pa + (1 - w) * pb)


if __name__ == "__main__":
    main()
