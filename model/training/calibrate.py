"""Post-hoc logit adjustment for class imbalance (Menon et al., "Long-tail learning
via logit adjustment", ICLR 2021): predict argmax(logits - tau * log prior).

FER2013 trains on 379 disgust faces against 7,000 happy ones, so a plain
classifier rarely says disgust. Subtracting tau * log(training prior) from the
logits trades a little accuracy on frequent classes for recall on rare ones;
tau = 1 is the balanced-error optimum in theory. `choose_tau` picks tau on a
validation split: the best mean class accuracy among the taus whose accuracy
stays within `max_accuracy_drop` of the unadjusted model (tau = 0)."""
from __future__ import annotations

import numpy as np
import torch

from model.training.evaluate import to_input
from model.labels import EXPRESSIONS
from model.nets.networks import IPDFER

TAUS = tuple(np.round(np.arange(0.0, 1.51, 0.1), 2))


def class_prior(labels: np.ndarray, num_classes: int = len(EXPRESSIONS)) -> np.ndarray:
    """Label frequencies of labelled faces (label >= 0), each class at least one count."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    return np.maximum(counts, 1) / np.maximum(counts, 1).sum()


@torch.inference_mode()
def raw_logits(model: IPDFER, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the faces and of their mirror images, without the model's class_bias."""
    model.eval()
    out, mirrored = [], []
    for s in range(0, len(images), batch):
        x = to_input(images[s:s + batch])
        for view, dest in ((x, out), (x.flip(3), mirrored)):
            dest.append(model.exp_head(model.exp_encoder(view)).float().numpy())
    return np.concatenate(out), np.concatenate(mirrored)


def _probs(logits: np.ndarray, bias: np.ndarray) -> np.ndarray:
    z = logits + bias
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def sweep(logits: tuple[np.ndarray, np.ndarray], labels: np.ndarray, prior: np.ndarray,
          taus: tuple[float, ...] = TAUS) -> list[dict]:
    """Accuracy and mean class accuracy (flip-averaged, as served) for each tau."""
    rows = []
    present = np.unique(labels)
    for tau in taus:
        bias = -tau * np.log(prior)
        pred = ((_probs(logits[0], bias) + _probs(logits[1], bias)) / 2).argmax(1)
        per_class = np.array([(pred[labels == c] == c).mean() for c in present])
        rows.append({"tau": float(tau), "accuracy": round(float((pred == labels).mean()), 4),
                     "mean_class_accuracy": round(float(per_class.mean()), 4),
                     "min_class_accuracy": round(float(per_class.min()), 4)})
    return rows


def choose_tau(rows: list[dict], max_accuracy_drop: float = 0.01) -> dict:
    base = next(r for r in rows if r["tau"] == 0.0)["accuracy"]
    allowed = [r for r in rows if r["accuracy"] >= base - max_accuracy_drop]
    return max(allowed, key=lambda r: (r["mean_class_accuracy"], -r["tau"]))


def fit(model: IPDFER, val_images: np.ndarray, val_labels: np.ndarray, train_labels: np.ndarray,
        max_accuracy_drop: float = 0.01) -> dict:
    """Set model.class_bias from the chosen tau; returns what the manifest records."""
    keep = val_labels >= 0
    prior = class_prior(train_labels, model.cfg.num_classes)
    rows = sweep(raw_logits(model, val_images[keep]), val_labels[keep], prior)
    best = choose_tau(rows, max_accuracy_drop)
    with torch.no_grad():
        model.class_bias.copy_(torch.tensor(-best["tau"] * np.log(prior), dtype=torch.float32))
    return {"method": "post-hoc logit adjustment (Menon et al. 2021)", "tau": best["tau"],
            "max_accuracy_drop": max_accuracy_drop,
            "prior": {c: round(float(p), 5) for c, p in zip(EXPRESSIONS, prior)},
            "chosen": best, "sweep": rows}
