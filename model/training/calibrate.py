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
        pred = served_probs(logits, -tau * np.log(prior)).argmax(1)
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


# Temperature scaling (Guo et al. 2017): served probabilities that mean what they say.

TEMPERATURES = tuple(np.round(np.arange(0.5, 3.001, 0.02), 2))


def served_probs(logits: tuple[np.ndarray, np.ndarray], bias: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities as served: the face's and its mirror image's, averaged."""
    return (_probs(logits[0] / temperature, bias / temperature)
            + _probs(logits[1] / temperature, bias / temperature)) / 2


def _confidence_bins(probs: np.ndarray, labels: np.ndarray, bins: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 confidence, whether it is right, and its bin of `bins` equal widths."""
    conf = probs.max(1)
    which = np.clip(np.digitize(conf, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    return conf, probs.argmax(1) == labels, which


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-1 confidence against accuracy in `bins` equal-width bins, weighted by count."""
    conf, correct, which = _confidence_bins(probs, labels, bins)
    return float(sum(abs(conf[which == b].mean() - correct[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def fit_temperature(model: IPDFER, val_images: np.ndarray, val_labels: np.ndarray) -> dict:
    """The temperature T minimising the negative log-likelihood of the served
    probabilities on validation, folded into the model (head and class_bias
    divided by T: each pass's top label stays, the mirror average's can move where
    the two passes disagree); returns what the manifest records."""
    keep = val_labels >= 0
    labels = val_labels[keep]
    logits = raw_logits(model, val_images[keep])
    bias = model.class_bias.numpy().astype(np.float64)
    nll = {t: float(-np.log(served_probs(logits, bias, t)[np.arange(len(labels)), labels] + 1e-12).mean())
           for t in TEMPERATURES}
    best = min(nll, key=nll.get)
    before = expected_calibration_error(served_probs(logits, bias), labels)
    after = expected_calibration_error(served_probs(logits, bias, best), labels)
    head = model.exp_head[-1]
    with torch.no_grad():
        head.weight.div_(best), head.bias.div_(best), model.class_bias.div_(best)
    return {"method": "temperature scaling (Guo et al. 2017), folded into the classifier", "temperature": best,
            "val_nll": {"before": round(nll[1.0], 4), "after": round(nll[best], 4)},
            "val_ece": {"before": round(before, 4), "after": round(after, 4)}}


def reliability_diagram(probs: np.ndarray, labels: np.ndarray, path, title: str, bins: int = 15) -> None:
    """Accuracy against confidence per bin (bars) and the diagonal, saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _, correct, which = _confidence_bins(probs, labels, bins)
    edges = np.linspace(0, 1, bins + 1)
    acc = [correct[which == b].mean() if (which == b).any() else 0 for b in range(bins)]
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.bar(edges[:-1], acc, width=1 / bins, align="edge", edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence (top-1 probability)"), ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {expected_calibration_error(probs, labels, bins):.3f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout(), fig.savefig(path), plt.close(fig)
