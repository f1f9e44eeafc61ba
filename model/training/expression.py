"""`ipdfer train-expression`: the expression encoder and its classifier (E_exp +
head) trained alone, long, on a CPU, as a run that survives being cut off.

Why a separate loop: the IPD-FER loop (`ipdfer train`) also trains E_pose, the
renderer and a discriminator on the prepare cache's aligned crops. Expression
accuracy is what users judge first and it needs long schedules; here a run is

  - resumable exactly: every random draw of step k (which faces, which
    augmentation, dropout) comes from generators seeded by (seed, epoch) or
    (seed, step), so the state to save is the parameters, the optimiser, the
    schedule and the step. A run cut anywhere and resumed equals the uncut run
    (tests/test_train_expression.py).
  - one schedule (one-cycle) over all the planned epochs, checkpointed every
    `checkpoint_minutes`; re-running the same command resumes.
  - two views of each training face: the aligned crop exactly as served
    (`ipdfer prepare`'s cache, made by the serving path's CropLocator) and the
    raw data-set crop; augmentation covers what photos bring to the detector's
    crop (jitter, scale, rotation, low resolution, JPEG, contrast, occlusion).

The trained `exp_encoder` / `exp_head` carry IPDFER's parameter names: `--export`
puts them into a copy of existing weights (pose encoder and renderer kept; the
neutral render does not read E_exp).

    ipdfer train-expression --name exp-mnv2 --epochs 16            # start or resume
    ipdfer train-expression --name exp-mnv2 --export weights/ --base weights/

Long module: one run reads top to bottom (data, augmentation, network, the loop,
export, command line), as train.py does.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.labels import EXPRESSIONS
from model.paths import cache_root, data_root
from model.serving.plan import cpu_has_native_bf16

SIZE = 64  # the served aligned face side (ModelConfig.image_size of the shipped weights)


@dataclass
class Augment:
    """Per-face random transforms of a (N,1,S,S) batch in [-1,1]."""
    flip: float = 0.5          # probability of a mirror image
    rotate: float = 15.0       # degrees, uniform +-
    scale: float = 0.12        # zoom 1 +- scale
    shift: float = 0.08        # fraction of the side, uniform +-
    low_res: float = 0.25      # probability of a detour through a smaller face ...
    min_side: int = 20         # ... of at least this many pixels
    jpeg: float = 0.2          # probability of JPEG at quality 30..90
    contrast: float = 0.3      # contrast x (1 +- contrast), brightness +- contrast/2, gamma
    erase: float = 0.25        # probability of one erased rectangle (occlusion) ...
    erase_area: tuple[float, float] = (0.02, 0.15)   # ... of this fraction of the face


@dataclass
class Recipe:
    train_sets: tuple[str, ...] = ("fer2013:train", "muxspace:train", "ckplus:train")
    val_sets: tuple[str, ...] = ("fer2013:val", "muxspace:val")
    views: str = "both"           # "aligned" (as served) | "raw" (data-set crop) | "both" (half each)
    backbone: str = "mobilenet_v2"  # or "faceres" (VGGFace2 identification start; `make faceres`)
    input_size: int = 112         # E_exp resizes the 64 px face to this
    dropout: float = 0.2
    epochs: int = 16
    batch_size: int = 64
    lr: float = 1e-3              # head's peak; the backbone's is lr * backbone_lr
    backbone_lr: float = 1.0
    weight_decay: float = 0.01
    pct_start: float = 0.15       # one-cycle warm-up fraction
    label_smoothing: float = 0.1
    cutmix: float = 0.0           # probability that a batch is CutMix'ed (Yun et al. 2019) with its own shuffle
    # distillation (Hinton et al. 2015): weights folders whose flip-averaged served probabilities,
    # averaged over the folders, are soft targets; the loss is (1 - distill) * CE + distill * T^2 KL
    teachers: tuple[str, ...] = ()
    distill: float = 0.0
    distill_temperature: float = 2.0
    # sampling: each face drawn with weight n^-balance, n the faces of its (data set, class):
    # 0 = every face once an epoch (a permutation); 0.5 = square-root balancing (rare classes
    # and a small data set's classes drawn more, with replacement); 1 = every group alike
    balance: float = 0.0
    ema_decay: float = 0.999
    bf16: bool = False            # autocast; on an AVX-512-BF16 EPYC a MobileNetV2 step was 1.9x SLOWER in bf16
    seed: int = 0
    checkpoint_minutes: float = 10.0
    log_every: int = 50
    augment: Augment = field(default_factory=Augment)

    def model_config(self) -> ModelConfig:
        from model.nets.networks import EXP_DIMS
        return ModelConfig(image_size=SIZE, exp_backbone=self.backbone, exp_input_size=self.input_size,
                           exp_dim=EXP_DIMS[self.backbone], dropout=self.dropout)


# 1. data ----------------------------------------------------------------------------

@dataclass
class Faces:
    """Labelled faces of some splits: `aligned` as served, `raw` the data-set crop
    (either may be None), both uint8 (N, 64, 64), labels int64 index into EXPRESSIONS,
    `source` each face's index into `names` (None: all from the first), `soft` the
    teachers' probabilities of each view present, float32 (views, N, 7)."""
    labels: np.ndarray
    aligned: np.ndarray | None
    raw: np.ndarray | None
    names: list[str]
    source: np.ndarray | None = None
    soft: np.ndarray | None = None

    def views(self) -> list[np.ndarray]:
        return [v for v in (self.aligned, self.raw) if v is not None]

    def __len__(self) -> int:
        return len(self.labels)


def _raw_crops(dataset: str, paths: list[str], root: Path) -> np.ndarray:
    """Data-set crops as grey 64 px, cached under the cache root (decoding ~50k files takes minutes)."""
    import hashlib
    from model.data.sources import ImageReader, find_root
    from model.fileio import atomic_write
    key = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    path = cache_root() / "expression" / f"{dataset}_raw{SIZE}_{key}.npy"
    if path.is_file():
        return np.load(path)
    reader, out = ImageReader(find_root(dataset, root)), np.empty((len(paths), SIZE, SIZE), np.uint8)
    for i, p in enumerate(paths):
        grey = cv2.cvtColor(reader(p), cv2.COLOR_RGB2GRAY)
        interp = cv2.INTER_AREA if grey.shape[0] > SIZE else cv2.INTER_LINEAR
        out[i] = cv2.resize(grey, (SIZE, SIZE), interpolation=interp)
    atomic_write(path, lambda tmp: np.save(tmp, out), suffix=".npy")
    return out


def load_faces(names: tuple[str, ...], views: str, cache_dir: Path | None = None,
               root: Path | None = None) -> Faces:
    """The labelled faces of "dataset:split" names, in the prepare cache's order."""
    from model.data import datasets as datalib
    labels, aligned, raw, source = [], [], [], []
    for k, name in enumerate(names):
        dataset, split = name.split(":")
        faces = datalib.load_split(dataset, split, size=SIZE, cache_dir=cache_dir)
        keep = np.flatnonzero(faces.labels >= 0)
        labels.append(faces.labels[keep])
        source.append(np.full(len(keep), k, np.int64))
        if views in ("aligned", "both"):
            aligned.append(np.asarray(faces.images)[keep])
        if views in ("raw", "both"):
            folder = data_root(root)
            if folder is None:
                raise FileNotFoundError("raw views read the data sets: set IPDFER_DATA or --data-root")
            raw.append(_raw_crops(dataset, [faces.paths[i] for i in keep], folder))
    cat = lambda parts: np.concatenate(parts) if parts else None  # noqa: E731
    return Faces(np.concatenate(labels), cat(aligned), cat(raw), list(names), np.concatenate(source))


def teacher_probs(faces: Faces, teachers: tuple[str, ...], batch: int = 64) -> np.ndarray:
    """(views, N, 7): each view's faces through each teacher as served (flip-averaged,
    calibrated), averaged over the teachers. Cached under the cache root by the
    teachers' sha256 and the faces' bytes (two teachers over 75k faces: ~20 min on 2 cores;
    batches of 64, as 256 ran at half the speed)."""
    import hashlib
    from model.fileio import atomic_write
    from model.training.evaluate import encode_all
    from model.weights import load_weights
    loaded = [load_weights(Path(t)) for t in teachers]
    key = hashlib.sha256()
    for w in loaded:
        key.update(w.manifest["sha256"].encode())
    for view in faces.views():
        key.update(np.ascontiguousarray(view).data)
    path = cache_root() / "expression" / f"teachers_{key.hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path)
    out = np.zeros((len(faces.views()), len(faces), len(EXPRESSIONS)), np.float32)
    with torch.inference_mode():
        for w in loaded:
            for v, images in enumerate(faces.views()):
                out[v] += encode_all(w.model.eval(), images, batch=batch, tta=True)["probs"] / len(loaded)
    atomic_write(path, lambda tmp: np.save(tmp, out), suffix=".npy")
    return out


# 2. augmentation (every draw from one generator seeded by the step) ------------------

def augment_batch(x: torch.Tensor, aug: Augment, g: torch.Generator) -> torch.Tensor:
    """x (N,1,S,S) float in [-1,1] -> augmented, same shape."""
    n, _, s, _ = x.shape
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    # geometry: rotation, zoom, shift and mirror in one resampling (replicated borders)
    angle = (u(n) * 2 - 1) * math.radians(aug.rotate)
    zoom = 1 + (u(n) * 2 - 1) * aug.scale
    mirror = torch.where(u(n) < aug.flip, -1.0, 1.0)
    shift = (u(n, 2) * 2 - 1) * aug.shift * 2   # affine_grid's coordinates span 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                         torch.stack([sin * mirror, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # photometric: contrast, brightness, gamma
    x01 = ((x + 1) / 2).clamp(0, 1)
    c = aug.contrast
    x01 = x01 ** torch.exp((u(n) * 2 - 1) * c).view(n, 1, 1, 1)
    mean = x01.mean(dim=(2, 3), keepdim=True)
    x01 = (x01 - mean) * (1 + (u(n) * 2 - 1) * c).view(n, 1, 1, 1) + mean + ((u(n) * 2 - 1) * c / 2).view(n, 1, 1, 1)
    x01 = x01.clamp(0, 1)
    # resolution and compression: what a small or compressed face in a photo looks like
    low, side, jpeg, quality = u(n) < aug.low_res, u(n), u(n) < aug.jpeg, u(n)
    for i in torch.nonzero(low).flatten().tolist():
        k = int(aug.min_side + side[i] * (s - aug.min_side))
        small = F.interpolate(x01[i:i + 1], size=(k, k), mode="area")
        x01[i:i + 1] = F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    for i in torch.nonzero(jpeg).flatten().tolist():
        pixels = (x01[i, 0] * 255).round().to(torch.uint8).numpy()
        ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(30 + 60 * quality[i])])
        x01[i, 0] = torch.from_numpy(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)).float() / 255
    # occlusion: one rectangle of uniform noise
    erase, area, aspect, pos, fill = u(n) < aug.erase, u(n), u(n), u(n, 2), u(n)
    for i in torch.nonzero(erase).flatten().tolist():
        a = (aug.erase_area[0] + area[i] * (aug.erase_area[1] - aug.erase_area[0])) * s * s
        r = math.exp((aspect[i].item() * 2 - 1) * math.log(3))
        h, w = min(s, max(1, int(round(math.sqrt(a * r))))), min(s, max(1, int(round(math.sqrt(a / r)))))
        y0, x0 = int(pos[i, 0] * (s - h)), int(pos[i, 1] * (s - w))
        x01[i, :, y0:y0 + h, x0:x0 + w] = fill[i]
    return x01 * 2 - 1


def sampling_weights(faces: Faces, balance: float) -> np.ndarray | None:
    """Per-face draw probabilities, n^-balance for n the faces of its (data set,
    class), normalised; None for balance 0 (a plain permutation)."""
    if balance == 0:
        return None
    source = faces.source if faces.source is not None else np.zeros(len(faces), np.int64)
    group = source * 100 + faces.labels
    _, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    w = counts[inverse].astype(np.float64) ** -balance
    return w / w.sum()


class Batches:
    """Step k of a run -> (images, labels, teachers' probabilities or None): the
    epoch's order comes from (seed, epoch) (a permutation, or with `balance` a
    weighted draw with replacement), the faces' view and augmentation from (seed, step)."""

    def __init__(self, faces: Faces, recipe: Recipe):
        self.faces, self.recipe = faces, recipe
        self.per_epoch = len(faces) // recipe.batch_size
        self._perm_epoch, self._perm = -1, None
        self._weights = sampling_weights(faces, recipe.balance)

    def __len__(self) -> int:
        return self.per_epoch

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        r, f = self.recipe, self.faces
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([r.seed, epoch])
            self._perm_epoch, self._perm = epoch, (rng.permutation(len(f)) if self._weights is None
                                                   else rng.choice(len(f), len(f), p=self._weights))
        idx = np.sort(self._perm[i * r.batch_size:(i + 1) * r.batch_size])
        g = torch.Generator().manual_seed(r.seed * 1_000_003 + step)
        views = f.views()
        pick = (torch.rand(len(idx), generator=g) * len(views)).long().numpy()
        images = np.stack([views[v][j] for v, j in zip(pick, idx)])
        x = torch.from_numpy(images).unsqueeze(1).float() / 127.5 - 1
        soft = None if f.soft is None else torch.from_numpy(f.soft[pick, idx])
        return augment_batch(x, r.augment, g), torch.from_numpy(f.labels[idx]), soft


def cutmix(x: torch.Tensor, y: torch.Tensor, g: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Paste a box of a shuffled copy of the batch into it: returns the images, the
    two label sets and the area share of the first (the loss mixes the two)."""
    n, _, s, _ = x.shape
    perm = torch.randperm(n, generator=g)
    lam = float(torch.rand(1, generator=g))
    h = w = int(round(s * math.sqrt(1 - lam)))
    cy, cx = (torch.rand(2, generator=g) * s).long().tolist()
    y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h - h // 2, s), max(cx - w // 2, 0), min(cx + w - w // 2, s)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return x, y, y[perm], 1 - (y1 - y0) * (x1 - x0) / (s * s)


# 3. the network -------------------------------------------------------------------------

class ExpressionNet(nn.Module):
    """E_exp + classifier with IPDFER's parameter names (exp_encoder.*, exp_head.*)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from model.nets.networks import expression_encoder
        self.exp_encoder = expression_encoder(cfg)
        self.exp_head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.exp_dim, cfg.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (N,1,64,64) -> logits (N,7)
        return self.exp_head(self.exp_encoder(x))


@torch.no_grad()
def predict(net: nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Probabilities averaged over the face and its mirror image, as served."""
    net.eval()
    out = []
    for a in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[a:a + batch])).unsqueeze(1).float() / 127.5 - 1
        out.append(((net(x).softmax(1) + net(x.flip(3)).softmax(1)) / 2).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(EXPRESSIONS)), np.float32)


def scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    pred = probs.argmax(1)
    recall = [float((pred[labels == c] == c).mean()) for c in range(probs.shape[1]) if (labels == c).any()]
    return {"acc": round(float((pred == labels).mean()), 4), "mean_class": round(float(np.mean(recall)), 4)}


# 4. the run ---------------------------------------------------------------------------------

def _autocast(recipe: Recipe):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16 and cpu_has_native_bf16())


def train(recipe: Recipe, batches: Batches, run_dir: Path, val: dict[str, tuple[np.ndarray, np.ndarray]],
          stop_after: int | None = None, init: dict | None = None, quiet: bool = False) -> ExpressionNet:
    """Train (or resume) the run in `run_dir`; returns the EMA network. `stop_after`
    ends this call after that many total steps (a cut, for tests); `init` is an
    ExpressionNet state dict to start from instead of the pretrained backbone."""
    from model.training.train import EMA, save_checkpoint
    run_dir.mkdir(parents=True, exist_ok=True)
    total = recipe.epochs * len(batches)
    torch.manual_seed(recipe.seed)  # the head's initialisation
    net = ExpressionNet(recipe.model_config()).to(memory_format=torch.channels_last)
    if recipe.distill > 0 and (batches.faces.soft is None or recipe.cutmix > 0):
        raise ValueError("distill needs the teachers' probabilities on the faces (Faces.soft) and no cutmix")
    ckpt_path = run_dir / "last.pt"
    resuming = ckpt_path.is_file()
    if not resuming:
        if init is not None:
            net.load_state_dict(init)
        elif recipe.backbone == "mobilenet_v2":
            net.exp_encoder.load_imagenet()
        elif recipe.backbone == "faceres":  # the graph's folded BatchNorm, re-expressed with real statistics
            net.exp_encoder.load_graph()
            net.exp_encoder.match_batchnorm(batches(0)[0])
        (run_dir / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))
    ema = EMA(net, recipe.ema_decay)
    head = list(net.exp_head.parameters())
    opt = torch.optim.AdamW([{"params": list(net.exp_encoder.parameters()), "lr": recipe.lr * recipe.backbone_lr},
                             {"params": head, "lr": recipe.lr}], weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[recipe.lr * recipe.backbone_lr, recipe.lr],
                                                total_steps=max(total, 2), pct_start=recipe.pct_start)
    step = 0
    if resuming:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        # fields added since the run started take their defaults (what the run did)
        saved = dataclasses.asdict(recipe_from_dict(ckpt["recipe"]))
        if saved != dataclasses.asdict(recipe):
            raise ValueError(f"{run_dir} was started with another recipe (its recipe.json); "
                             "resume with the same options or pick another --name")
        net.load_state_dict(ckpt["net"]), ema.model.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"]), sched.load_state_dict(ckpt["sched"])
        step = ema.updates = ckpt["step"]
        if not quiet:
            print(f"resumed {run_dir} at step {step} of {total}", flush=True)

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, net=net.state_dict(), ema=ema.model.state_dict(), opt=opt.state_dict(),
                        sched=sched.state_dict(), step=step, recipe=dataclasses.asdict(recipe))

    log = open(run_dir / "log.csv", "a", newline="")
    writer = csv.writer(log)
    if log.tell() == 0:
        writer.writerow(["step", "epoch", "lr", "loss", "train_acc", "sec_per_step"])
    end = min(total, stop_after) if stop_after is not None else total
    last_save, window, t0 = time.monotonic(), [], time.monotonic()
    while step < end:
        # 1. the step's faces and its dropout draw, both from (seed, step)
        x, y, soft = batches(step)
        mix = torch.Generator().manual_seed(recipe.seed * 104_729 + step)
        y2, share = y, 1.0
        if float(torch.rand(1, generator=mix)) < recipe.cutmix:
            x, y, y2, share = cutmix(x, y, mix)
        torch.manual_seed(recipe.seed * 7_919 + step)
        net.train()
        with _autocast(recipe):
            logits = net(x.contiguous(memory_format=torch.channels_last))
        loss = share * F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
        if share < 1.0:
            loss = loss + (1 - share) * F.cross_entropy(logits.float(), y2, label_smoothing=recipe.label_smoothing)
        if recipe.distill > 0:
            t = recipe.distill_temperature
            kd = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(soft.clamp_min(1e-8).log() / t, 1),
                          log_target=True, reduction="batchmean") * t * t
            loss = (1 - recipe.distill) * loss + recipe.distill * kd
        # 2. update, schedule, EMA
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step(), sched.step(), ema.update(net)
        step += 1
        window.append((float(loss.detach()), float((logits.argmax(1) == y).float().mean())))
        # 3. log, checkpoint (time-based; a resumed run does not depend on where it was cut)
        if step % recipe.log_every == 0 or step == end:
            secs = (time.monotonic() - t0) / len(window)
            writer.writerow([step, step // len(batches), f"{sched.get_last_lr()[-1]:.3g}",
                             f"{np.mean([w[0] for w in window]):.4f}", f"{np.mean([w[1] for w in window]):.4f}",
                             f"{secs:.3f}"])
            log.flush()
            window, t0 = [], time.monotonic()
        epoch_done = step % len(batches) == 0
        if epoch_done or time.monotonic() - last_save > recipe.checkpoint_minutes * 60:
            checkpoint()
            last_save = time.monotonic()
        # 4. validation of the EMA network at each epoch's end (the faces as served)
        if epoch_done and val:
            row = {"epoch": step // len(batches), "step": step}
            for name, (images, labels) in val.items():
                row.update({f"{name}:{k}": v for k, v in scores(predict(ema.model, images), labels).items()})
            with open(run_dir / "val.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if not quiet:
                print(json.dumps(row), flush=True)
    checkpoint()
    log.close()
    return ema.model


# 5. export: E_exp and its head into a copy of existing weights ------------------------------

def export(run_dir: Path, base: Path, out: Path, version: str, calibrate_on: tuple[str, ...] = (),
           cache_dir: Path | None = None) -> dict:
    """The run's EMA E_exp and head inside a copy of `base`'s weights (pose encoder
    and renderer kept; the renderer's expression input re-fitted to the new code,
    model/training/code_map.py). With `calibrate_on` (validation splits): the logit
    adjustment's strength, then a temperature, both chosen there and folded in."""
    from model.nets.networks import IPDFER
    from model.training import calibrate, code_map
    from model.training.export import split_hashes
    from model.weights import load_weights, save_weights
    ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    recipe = recipe_from_dict(ckpt["recipe"])
    loaded = load_weights(base)
    cfg = dataclasses.replace(loaded.config, exp_backbone=recipe.backbone, exp_input_size=recipe.input_size,
                              exp_dim=recipe.model_config().exp_dim, dropout=recipe.dropout)
    model = IPDFER(cfg)
    replaced = ("exp_encoder.", "exp_head.", "class_bias")
    code_weights = code_map.code_weight_keys(loaded.model)
    state = {k: v for k, v in loaded.model.state_dict().items()
             if not k.startswith(replaced) and k not in code_weights}
    state.update(ckpt["ema"])
    state["class_bias"] = torch.zeros(cfg.num_classes)
    missing = set(model.load_state_dict(state, strict=False).missing_keys)
    assert missing == code_weights, f"unexpected missing weights: {sorted(missing ^ code_weights)}"
    # the renderer's expression input speaks the old code: map the new one onto it
    fit = load_faces(recipe.train_sets, "aligned", cache_dir)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(fit.labels), min(8000, len(fit.labels)), replace=False))
    check = load_faces(recipe.val_sets, "aligned", cache_dir)
    held = np.sort(rng.choice(len(check.labels), min(3000, len(check.labels)), replace=False))
    renderer_map = code_map.carry_renderer(loaded.model, model, fit.aligned[pick], check.aligned[held])
    model.eval()
    extra = {"training": {"expression_run": ckpt["recipe"], "step": ckpt["step"],
                          "rest_from": {k: loaded.manifest.get(k) for k in ("name", "version", "sha256")},
                          "rest_training": loaded.manifest.get("training"),
                          "split_hashes": split_hashes([*recipe.train_sets, *recipe.val_sets]),
                          "renderer_code_map": renderer_map}}
    if calibrate_on:
        val = load_faces(calibrate_on, "aligned", cache_dir)
        from model.data.datasets import load_split  # the prior needs the labels, not the faces
        train_labels = np.concatenate([load_split(*name.split(":"), size=SIZE, cache_dir=cache_dir).labels
                                       for name in recipe.train_sets])
        extra["logit_adjustment"] = {"split": ",".join(calibrate_on),
                                     **calibrate.fit(model, val.aligned, val.labels, train_labels)}
        extra["temperature"] = {"split": ",".join(calibrate_on),
                                **calibrate.fit_temperature(model, val.aligned, val.labels)}
    return save_weights(model, out, version=version, trained=True, extra=extra)


def recipe_from_dict(d: dict) -> Recipe:
    d = dict(d)
    aug = d.pop("augment", {})
    aug = Augment(**{**aug, "erase_area": tuple(aug.get("erase_area", Augment.erase_area))})
    return Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}, augment=aug)


# 6. command line -------------------------------------------------------------------------------

def parse_augment(text: str) -> Augment:
    """"rotate=10,low_res=0.1,erase_area=0.02:0.1" -> Augment with those fields changed."""
    fields = {f.name: f for f in dataclasses.fields(Augment)}
    changes = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise argparse.ArgumentTypeError(f"unknown augmentation {key!r}: one of {', '.join(fields)}")
        changes[key] = (tuple(float(v) for v in value.split(":")) if key == "erase_area"
                        else type(getattr(Augment(), key))(value))
    return dataclasses.replace(Augment(), **changes)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="expression", help="run folder under the runs folder")
    p.add_argument("--run-dir", type=Path, help="run folder (default <cache>/runs/<name>)")
    p.add_argument("--data-cache", type=Path, help="the prepare cache (aligned faces)")
    p.add_argument("--data-root", type=Path, help="data sets folder for the raw views (default env IPDFER_DATA)")
    p.add_argument("--init", type=Path, metavar="WEIGHTS_DIR", help="start E_exp from exported weights")
    p.add_argument("--export", type=Path, metavar="OUT_DIR", help="export the run's EMA E_exp into --base's weights")
    p.add_argument("--base", type=Path, default=Path("weights"), help="weights whose other parts --export keeps")
    p.add_argument("--version", default="0.0.0", help="version of exported weights")
    p.add_argument("--calibrate-on", type=lambda v: tuple(v.split(",")) if v else (), default=(),
                   help="with --export: validation splits that choose the logit adjustment and the "
                        "temperature (e.g. fer2013:val,muxspace:val)")
    p.add_argument("--augment", type=parse_augment, default=Augment(), metavar="KEY=VALUE,...",
                   help="augmentation changes, e.g. rotate=10,low_res=0.1,erase=0.1 (fields of Augment; "
                        "erase_area=0.02:0.1)")
    for f in dataclasses.fields(Recipe):
        if f.name in ("augment",):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = ((lambda s: tuple(s.split(","))) if isinstance(default, tuple)
                else (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default))
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default, dest=f.name,
                       help=f"default {','.join(default) if isinstance(default, tuple) else default}")


def run(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or cache_root() / "runs" / args.name
    if args.export:
        manifest = export(run_dir, args.base, args.export, args.version, args.calibrate_on, args.data_cache)
        print(json.dumps({k: manifest[k] for k in ("file", "sha256", "size_bytes")}))
        for key in ("logit_adjustment", "temperature"):
            if key in manifest:
                print(key, json.dumps({k: v for k, v in manifest[key].items() if k not in ("sweep", "prior")}))
        return 0
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if f.name != "augment"},
                    augment=args.augment)
    if recipe.views not in ("aligned", "raw", "both"):
        print("ipdfer train-expression: --views is aligned, raw or both", file=sys.stderr)
        return 2
    faces = load_faces(recipe.train_sets, recipe.views, args.data_cache, args.data_root)
    if recipe.teachers:
        print(f"teachers {', '.join(recipe.teachers)}: probabilities of {len(faces)} faces ...", flush=True)
        faces.soft = teacher_probs(faces, recipe.teachers)
    print(f"{len(faces)} training faces from {', '.join(recipe.train_sets)} ({recipe.views} views), "
          f"bf16 {recipe.bf16 and cpu_has_native_bf16()}", flush=True)
    val = {}
    for name in recipe.val_sets:
        v = load_faces((name,), "aligned", args.data_cache)
        val[name] = (v.aligned, v.labels)
    init = None
    if args.init:
        from model.weights import load_weights
        init = {k: v for k, v in load_weights(args.init).model.state_dict().items()
                if k.startswith(("exp_encoder.", "exp_head."))}
    train(recipe, Batches(faces, recipe), run_dir, val, init=init)
    print(f"done: {run_dir / 'last.pt'}")
    return 0
