"""`ipdfer evaluate --weights W --split fer2013:test --out DIR`: accuracy, mean
class accuracy, macro-F1, confusion matrix (JSON + PNG), pose error against the
pseudo-labels, a grid of input / neutral render / reconstruction / residue, and
the disentanglement probes. Reads the prepared cache, i.e. the same aligned
faces the service's pipeline produces."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from model.data import datasets as datalib
from model import faces as facelib
from model.labels import EXPRESSIONS, NEUTRAL
from model.nets.mirror import encode_with_mirror
from model.nets.networks import IPDFER
from model.weights import DEFAULT_WEIGHTS_DIR, load_weights


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR)
    p.add_argument("--split", action="append", help="dataset:split, repeatable (default fer2013:test, ckplus:test)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-cache", type=Path)
    p.add_argument("--probes", action="store_true", help="also run the disentanglement probes")
    p.add_argument("--reference", type=Path, help="weights of a separately trained classifier "
                   "(e.g. the ablation) that judges whether neutral renders look neutral")
    p.add_argument("--limit", type=int, help="evaluate at most N faces per split")
    p.add_argument("--neutral-photos", type=Path, metavar="MUXSPACE_DIR",
                   help="also judge neutral renders of real photos against the same people's real neutral "
                        "photos (the muxspace folder; needs --reference as the judge): model/training/neutral_check.py")


def labeled_subset(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of labeled faces; with `limit`, a fixed random subset (splits are
    stored sorted by class, so the first N would be one class)."""
    keep = np.flatnonzero(labels >= 0)
    if limit and limit < len(keep):
        keep = np.sort(np.random.default_rng(seed).choice(keep, limit, replace=False))
    return keep


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,S,S) faces (a memmap slice is fine) -> the model's input."""
    return facelib.to_model_input(np.asarray(images))


@torch.inference_mode()
def encode_all(model: IPDFER, images: np.ndarray, batch: int = 256, tta: bool | None = None,
               device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Probabilities (flip-averaged when `tta`; None = as the weights are served),
    pose and features for uint8 (N,S,S) faces."""
    outs: dict[str, list] = {"probs": [], "pose": [], "exp": [], "pose_feat": []}
    tta = model.cfg.flip_tta if tta is None else tta
    for s in range(0, len(images), batch):
        x = to_input(images[s:s + batch]).to(device)
        o = encode_with_mirror(model.encode, x, margin=1.0 if tta else 0.0)
        probs = o["probs"]
        for k, v in (("probs", probs), ("pose", o["pose"]), ("exp", o["exp"]), ("pose_feat", o["pose_feat"])):
            outs[k].append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def classification_report(labels: np.ndarray, probs: np.ndarray) -> dict:
    pred = probs.argmax(1)
    cm = confusion_matrix(labels, pred, labels=range(len(EXPRESSIONS)))
    per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
    present = cm.sum(1) > 0
    return {"n": int(len(labels)), "accuracy": round(float((pred == labels).mean()), 4),
            "mean_class_accuracy": round(float(per_class[present].mean()), 4),
            "macro_f1": round(float(f1_score(labels, pred, labels=np.flatnonzero(present), average="macro")), 4),
            "per_class_accuracy": {c: round(float(a), 4) for c, a, p in zip(EXPRESSIONS, per_class, present) if p},
            "confusion_matrix": cm.tolist()}


def plot_confusion(cm: list[list[int]], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = np.asarray(cm, float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(EXPRESSIONS)), EXPRESSIONS, rotation=45, ha="right")
    ax.set_yticks(range(len(EXPRESSIONS)), EXPRESSIONS)
    for i in range(len(EXPRESSIONS)):
        for j in range(len(EXPRESSIONS)):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


@torch.inference_mode()
def render_grid(model: IPDFER, faces: datalib.FaceSet, idx: np.ndarray, path: Path) -> None:
    """Rows of faces; columns input | neutral render | reconstruction | residue."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = to_input(faces.images[idx])
    o = model.encode(x)
    identity = torch.from_numpy(np.asarray(faces.identity[idx])).float()
    recon, neutral, residue = model.residue(identity, o["pose_feat"], o["exp"], face=x)
    cols = [("input", x), ("neutral render", neutral), ("reconstruction", recon), ("residue", residue)]
    fig, axes = plt.subplots(len(idx), 4, figsize=(6, 1.6 * len(idx)), squeeze=False)
    for r in range(len(idx)):
        for c, (name, t) in enumerate(cols):
            ax = axes[r, c]
            img = t[r, 0].numpy()
            ax.imshow(np.abs(img) if name == "residue" else img, cmap="magma" if name == "residue" else "gray",
                      vmin=0 if name == "residue" else -1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
        label = int(faces.labels[idx[r]])
        axes[r, 0].set_ylabel(EXPRESSIONS[label] if label >= 0 else "?", fontsize=8)
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


def linear_probe(features: np.ndarray, targets: np.ndarray, seed: int = 0) -> float:
    """5-fold cross-validated accuracy of a logistic-regression probe."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    return round(float(cross_val_score(probe, features, targets, cv=folds).mean()), 4)


def _pixels(images: np.ndarray) -> np.ndarray:
    """Every 4th pixel of each face (1,024 values at 64 px) as a probe baseline."""
    return np.asarray(images, np.float32).reshape(len(images), -1)[:, ::4]


def probes(model: IPDFER, cache_dir: Path | None, limit: int | None) -> dict:
    """Disentanglement: identity from E_exp vs from E_id (muxspace test people
    with 5+ images, unseen in training); expression from E_pose and E_id."""
    out: dict = {}
    mux = datalib.load_split("muxspace", "test", size=model.cfg.image_size, cache_dir=cache_dir)
    people, counts = np.unique(mux.subjects, return_counts=True)
    keep = np.flatnonzero(np.isin(mux.subjects, people[counts >= 5]))
    ids = np.unique(np.asarray(mux.subjects)[keep], return_inverse=True)[1]
    enc = encode_all(model, mux.images[keep], tta=False)
    out["identity_probe"] = {"people": int(ids.max() + 1), "faces": int(len(keep)),
                             "chance": round(float(np.bincount(ids).max() / len(ids)), 4),
                             "from_E_exp": linear_probe(enc["exp"], ids),
                             "from_E_pose": linear_probe(enc["pose_feat"], ids),
                             "from_E_id": linear_probe(np.asarray(mux.identity[keep]), ids),
                             # context: the same people share sessions, so pixels alone say a lot
                             "from_pixels": linear_probe(_pixels(mux.images[keep]), ids)}
    fer = datalib.load_split("fer2013", "test", size=model.cfg.image_size, cache_dir=cache_dir)
    sel = labeled_subset(fer.labels, limit or 4000)
    enc = encode_all(model, fer.images[sel], tta=False)
    y = fer.labels[sel]
    out["expression_probe"] = {"faces": int(len(sel)), "majority": round(float(np.bincount(y).max() / len(y)), 4),
                               "from_E_pose": linear_probe(enc["pose_feat"], y),
                               "from_E_id": linear_probe(np.asarray(fer.identity[sel]), y),
                               "from_E_exp": linear_probe(enc["exp"], y),
                               "from_pixels": linear_probe(_pixels(fer.images[sel]), y)}
    return out


@torch.inference_mode()
def neutral_render_checks(model: IPDFER, judge: IPDFER, idloss, faces: datalib.FaceSet, idx: np.ndarray) -> dict:
    """Neutral renders of expressive faces: share the separately trained judge
    calls neutral, and share within dlib distance 0.6 of the input face
    (`idloss`: a model.nets.losses.IdentityLoss, for its chips and frozen dlib network)."""
    from model.faces.identity import IDENTITY_THRESHOLD
    neutral_votes, close, impostor, rank1, judge_feats = [], [], [], [], []
    for s in range(0, len(idx), 64):
        b = idx[s:s + 64]
        x = to_input(faces.images[b])
        o = model.encode(x)
        render = model.render(torch.from_numpy(np.asarray(faces.identity[b])).float(), o["pose_feat"], face=x)
        judged = judge.encode(render)
        neutral_votes.append((judged["logits"].argmax(1) == NEUTRAL).numpy())
        judge_feats.append(judged["exp"].numpy())
        e_render, e_input = idloss.encoder(idloss.chips(render)), idloss.encoder(idloss.chips(x))
        close.append(((e_render - e_input).norm(dim=1) < IDENTITY_THRESHOLD).numpy())
        # control: the render against another person's input. If this is high too,
        # "identity kept" only says dlib cannot tell blurry renders apart.
        impostor.append(((e_render - e_input.roll(1, 0)).norm(dim=1) < IDENTITY_THRESHOLD).numpy())
        if len(b) == 64:  # rank-1: among these 64 inputs, the render's own is the nearest (chance 1/64)
            rank1.append((torch.cdist(e_render, e_input).argmin(1) == torch.arange(64)).numpy())
    # Does the input's expression leak into the render (e.g. through the identity
    # descriptor, which carries some)? A probe on the judge's features of the renders.
    y = faces.labels[idx]
    counts = np.bincount(y)
    probed = counts[y] >= 5   # the 5-fold probe needs 5 faces of a class
    leak = linear_probe(np.concatenate(judge_feats)[probed], y[probed]) if probed.sum() >= 20 else None
    return {"faces": int(len(idx)), "judged_neutral": round(float(np.concatenate(neutral_votes).mean()), 4),
            "identity_kept": round(float(np.concatenate(close).mean()), 4),
            "identity_matches_another_person": round(float(np.concatenate(impostor).mean()), 4),
            "identity_rank1_of_64": round(float(np.concatenate(rank1).mean()), 4) if rank1 else None,
            "expression_probe_from_render": leak,
            "majority": round(float(np.bincount(y[probed]).max() / max(probed.sum(), 1)), 4)}


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_weights(args.weights)
    model = loaded.model.eval()
    report: dict = {"weights": {k: loaded.manifest.get(k) for k in ("name", "version", "sha256", "trained")},
                    "splits": {}}
    judge = idloss = None
    if args.reference:  # loaded once, used on every split
        from model.faces.identity import load_identity_encoder
        from model.nets.losses import IdentityLoss
        judge = load_weights(args.reference).model.eval()
        idloss = IdentityLoss(load_identity_encoder(), model.cfg.image_size)
    for name in args.split or ["fer2013:test", "ckplus:test"]:
        dataset, split = name.split(":")
        faces = datalib.load_split(dataset, split, size=model.cfg.image_size, cache_dir=args.data_cache)
        keep = labeled_subset(faces.labels, args.limit)
        enc = encode_all(model, faces.images[keep])
        rep = classification_report(faces.labels[keep], enc["probs"])
        rep["pose_mae_deg"] = dict(zip(("yaw", "pitch", "roll"),
                                       np.round(np.abs(enc["pose"] - faces.pose[keep]).mean(0).astype(float), 2).tolist()))
        tag = name.replace(":", "_")
        plot_confusion(rep["confusion_matrix"], f"{name}  acc {rep['accuracy']:.3f}", args.out / f"confusion_{tag}.png")
        rng = np.random.default_rng(0)
        per = [rng.choice(np.flatnonzero(faces.labels[keep] == c)) for c in range(len(EXPRESSIONS))
               if (faces.labels[keep] == c).any()]
        render_grid(model, faces, keep[np.array(per)], args.out / f"grid_{tag}.png")
        if judge is not None:
            expressive = keep[faces.labels[keep] != NEUTRAL]
            expressive = expressive[labeled_subset(faces.labels[expressive], 1000)]
            rep["neutral_render"] = neutral_render_checks(model, judge, idloss, faces, expressive)
        report["splits"][name] = rep
        print(json.dumps({name: {k: rep[k] for k in ("n", "accuracy", "mean_class_accuracy", "macro_f1",
                                                     "pose_mae_deg")}}))
    if args.neutral_photos:
        if judge is None:
            raise SystemExit("--neutral-photos needs --reference (the judge of neutral renders)")
        from model.serving.analyzer import Analyzer
        from model.serving.plan import ServingPlan
        from model.training.neutral_check import neutral_photo_check
        analyzer = Analyzer(loaded, ServingPlan.resolve(loaded, device="cpu"))
        report["neutral_photos"] = neutral_photo_check(analyzer, judge, args.neutral_photos, out=args.out)
    if args.probes:
        report["probes"] = probes(model, args.data_cache, args.limit)
        print(json.dumps(report["probes"]))
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report written to {args.out}")
    return 0
