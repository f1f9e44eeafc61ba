"""`ipdfer prepare`: manifests, aligned-face cache, pose pseudo-labels, identity features.

    ipdfer prepare [--data-root DIR] [--datasets fer2013,ckplus,muxspace]
                   [--size 64] [--cache-dir ~/.cache/ipdfer/data] [--report]

Steps, per dataset:
1. Manifest: the loader in `model.datasets` hashes every file and splits the set;
   `model/manifests/<dataset>.csv` (+ `<dataset>_dropped.csv`) are rewritten only
   when their content changes (they are committed; deterministic).
2. Features (size-independent, once per content hash): detection (MTCNN) with the
   shared face pipeline's functions, 5 landmarks in original image pixels, score,
   source (0 detected, 1 detected after padding the crop, 2 centre-crop fallback),
   pose pseudo-labels (`model.pose`) and the frozen identity encoder's 128-D
   descriptor of the dlib chip (for a fallback, the chip cut from the same
   centre-crop pseudo-landmarks).
3. Faces: the aligned grey crop at `--size` (`model.face.align_face` on the same
   landmarks). A new size later only re-aligns; nothing is detected again.
4. Assembly, in manifest order with each split contiguous, into
       <cache>/<dataset>/faces_<S>.npy   uint8 (N, S, S)   (np.load(mmap_mode="r"))
       <cache>/<dataset>/identity.npy    float32 (N, 128)
       <cache>/<dataset>/meta.npz        sha256, path, split, label, subject, landmarks,
                                          box, score, source, fallback, pose, image_wh
       <cache>/<dataset>/index.json      split ranges, manifest hash, sizes done
   which `model.data.load_split` reads.

Incremental and resumable: work is stored in chunk files keyed by content hash
(`chunks/features_*.npz`, `chunks/faces<S>_*.npz`, written atomically every
`--chunk` images); a rerun skips every hash already in a chunk, and assembly is
skipped when index.json already matches the manifest and the chunks.

Detection details (measured on 2 CPU cores, see README design notes):
- Images under 96 px are enlarged 3x (the pipeline's `upscale_small`) and detected
  with min_face_size=40 (faces fill these crops; 10x faster than 20 at the same
  detection rate). Larger images use the pipeline default (20).
- Small images where nothing is found are retried once with an 8 px replicated
  border (MTCNN misses faces that touch the crop edge): +~60% of the misses.
- Several faces: the largest box is taken (datasets are centred on their subject).
- Still nothing: the centre crop (`model.face.center_landmarks`), flagged.

Throughput: the work runs in `--workers` processes (default 2) with one torch
thread each. Measured on the shared 2-core machine: MTCNN's many tiny per-box ops
and the identity ResNet both cost 2-4x more CPU per image with 2 threads than with
1 when other jobs compete for the cores (OpenMP threads wait on each other), and
two 1-thread processes tripled the images per second of one 2-thread process.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model import datasets as ds
from model.data import default_cache_dir
from model.face import CROP_RETRY_PAD as RETRY_PAD
from model.face import CROP_SMALL_MIN_FACE as SMALL_MIN_FACE
from model.face import CROP_SMALL_SIDE as SMALL_SIDE
from model.face import SOURCE_DETECTED, SOURCE_FALLBACK, SOURCE_PADDED
from model.labels import EXPRESSIONS

REPO = Path(__file__).resolve().parents[1]
MANIFEST_DIR = REPO / "model" / "manifests"
DEFAULT_DATA_ROOT = Path(os.environ.get("IPDFER_DATA", REPO.parent / "shared" / "data"))
DEFAULT_CACHE = default_cache_dir()
DEFAULT_DATASETS = ("fer2013", "ckplus", "muxspace")

PROGRESS_STEP = 256      # images per detect + encode step inside a chunk
FEATURE_VERSION = 1      # bump when detection / identity code changes (settings are fingerprinted)
POSE_VERSION = 1         # bump when model/pose.py changes (pose is recomputed at assembly)


# ---------------------------------------------------------------------------
# 1. Per-image face work (shared with model.data.smoke_dataset)
# ---------------------------------------------------------------------------

@dataclass
class FaceWorker:
    """Detection + alignment + pose + identity for batches of RGB images."""
    device: str = "cpu"
    detect_batch: int = 64
    identity_batch: int = 64     # per-image CPU cost measured lower at 64 than at 32

    def __post_init__(self) -> None:
        import torch

        from model.face import FaceDetector
        from model.identity import load_identity_encoder
        self.det_small = FaceDetector(device=self.device, min_face_size=SMALL_MIN_FACE,
                                      batch_size=self.detect_batch)
        self.det_large = FaceDetector(device=self.device, batch_size=self.detect_batch)
        self.encoder = fused_encoder(load_identity_encoder(self.device))
        if self.device == "cpu":
            self.encoder = self.encoder.to(memory_format=torch.channels_last)  # faster on CPU

    def detect(self, images: list[np.ndarray]) -> list[dict]:
        """Per image: landmarks (5,2), box (4,), score, source (the serving path's
        `aligned=true` locates crops with the same code)."""
        from model.face import CropLocator
        return CropLocator(small=self.det_small, large=self.det_large).locate(images)

    # -- everything -----------------------------------------------------------------
    def features(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Size-independent per-image arrays: landmarks, box, score, source, pose, identity, image_wh."""
        import torch

        from model.face import identity_chip, identity_input
        from model.pose import estimate_pose
        dets = self.detect(images)
        lm = np.stack([d["landmarks"] for d in dets]).astype(np.float32)
        wh = np.array([[im.shape[1], im.shape[0]] for im in images], dtype=np.int32)
        ident = np.zeros((len(images), 128), np.float32)
        for s in range(0, len(images), self.identity_batch):
            chips = [identity_chip(images[i], lm[i]) for i in range(s, min(s + self.identity_batch, len(images)))]
            x = identity_input(chips).to(self.device)
            if self.device == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                ident[s:s + len(chips)] = self.encoder(x).float().cpu().numpy()
        return {"landmarks": lm,
                "box": np.stack([d["box"] for d in dets]).astype(np.float32),
                "score": np.array([d["score"] for d in dets], np.float32),
                "source": np.array([d["source"] for d in dets], np.int8),
                "pose": estimate_pose(lm, wh),
                "identity": ident, "image_wh": wh}


def fused_encoder(encoder):
    """A copy of the identity encoder with each affine (folded batch norm) folded into
    the convolution before it: the same function (checked: < 1e-4 on a random batch),
    fewer passes over memory. Falls back to the encoder itself if its layout is not
    the expected conv -> affine pairs."""
    import copy

    import torch
    from torch import nn
    try:
        fused = copy.deepcopy(encoder)
        pairs = [(fused, "conv", "affine")] + [(b, f"conv{k}", f"affine{k}") for b in fused.blocks for k in (1, 2)]
        with torch.no_grad():
            for owner, conv_name, affine_name in pairs:
                conv, affine = getattr(owner, conv_name), getattr(owner, affine_name)
                conv.weight.mul_(affine.gamma[:, None, None, None])
                conv.bias.copy_(conv.bias * affine.gamma + affine.beta)
                setattr(owner, affine_name, nn.Identity())
            x = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(0)) * 255
            x = x.to(next(encoder.parameters()).device)
            if (fused(x) - encoder(x)).abs().max() < 1e-4:
                return fused
    except (AttributeError, TypeError, RuntimeError):
        pass
    return encoder


def align_all(images: list[np.ndarray], landmarks: np.ndarray, size: int) -> np.ndarray:
    from model.face import align_face
    return np.stack([align_face(im, lm, size) for im, lm in zip(images, landmarks)]) \
        if images else np.zeros((0, size, size), np.uint8)


def feature_fingerprint() -> str:
    """Short hash of everything the cached features depend on: FEATURE_VERSION, the
    detector's settings (FaceDetector defaults + ours) and the chip geometry. Cached
    chunks carry it in their file name, so a changed face pipeline setting (e.g. a
    new detector border) makes prepare recompute instead of mixing old and new."""
    import inspect

    from model import face
    defaults = {k: repr(v.default) for k, v in inspect.signature(face.FaceDetector.__init__).parameters.items()
                if v.default is not inspect.Parameter.empty}
    spec = {"version": FEATURE_VERSION, "detector_defaults": defaults,
            "ours": [SMALL_SIDE, SMALL_MIN_FACE, RETRY_PAD],
            "chip": np.round(face.DLIB_CHIP_LANDMARKS, 6).tolist()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def faces_fingerprint(size: int) -> str:
    """Aligned faces depend on the features and on the alignment template."""
    from model import face
    spec = [feature_fingerprint(), size, np.round(face.CANONICAL_LANDMARKS, 6).tolist()]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------
# 2. Chunk store (keyed by content hash, atomic files)
# ---------------------------------------------------------------------------

class ChunkStore:
    """A folder of `<prefix>_<k>.npz` files, each with a `sha256` array plus data arrays."""

    def __init__(self, folder: Path, prefix: str, clean: bool = True):
        self.folder, self.prefix = Path(folder), prefix
        self.folder.mkdir(parents=True, exist_ok=True)
        if clean:  # only the coordinating process: workers may be writing
            for stale in self.folder.glob(f"{prefix}_*.tmp.npz"):
                stale.unlink()  # an interrupted write

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.glob(f"{self.prefix}_*.npz") if not p.name.endswith(".tmp.npz"))

    def keys(self) -> set[str]:
        out: set[str] = set()
        for f in self.files():
            with np.load(f) as z:
                out.update(z["sha256"].tolist())
        return out

    def write(self, arrays: dict[str, np.ndarray], tag: str) -> Path:
        path = self.folder / f"{self.prefix}_{tag}.npz"
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    def gather(self, keys: list[str], fields: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Arrays for `keys` in that order (every key must be stored)."""
        where = {k: i for i, k in enumerate(keys)}
        out: dict[str, np.ndarray] = {}
        filled = np.zeros(len(keys), bool)
        for f in self.files():
            with np.load(f) as z:
                pos = [(where[s], j) for j, s in enumerate(z["sha256"].tolist()) if s in where]
                if not pos:
                    continue
                dst, src = map(np.array, zip(*pos))
                for name in fields:
                    a = z[name]
                    if name not in out:
                        out[name] = np.zeros((len(keys), *a.shape[1:]), a.dtype)
                    out[name][dst] = a[src]
                filled[dst] = True
        if not filled.all():
            raise RuntimeError(f"{(~filled).sum()} hashes missing from {self.folder}/{self.prefix}_*")
        return out


# ---------------------------------------------------------------------------
# 3. One dataset
# ---------------------------------------------------------------------------

def manifest_digest(rows: list[ds.Row]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update("\t".join(r.as_csv().values()).encode() + b"\n")
    return h.hexdigest()


def ordered(rows: list[ds.Row]) -> list[ds.Row]:
    """Cache order: split by split (train, val, test), by path inside a split."""
    rank = {s: i for i, s in enumerate(ds.SPLITS)}
    return sorted(rows, key=lambda r: (rank[r.split], r.path))


def process_block(block: list[ds.Row], root: Path, chunk_dir: Path, size: int, have_feat: set[str],
                  get_worker) -> int:
    """Features (where missing) and aligned faces for one block of rows, written as one
    chunk file each (named after the block's first hash). Returns how many were detected."""
    images = [ds.ImageReader(root)(r.path) for r in block]  # one reader per block (CSV cache)
    feats = ChunkStore(chunk_dir, f"features_{feature_fingerprint()}", clean=False)
    faces = ChunkStore(chunk_dir, f"faces{size}_{faces_fingerprint(size)}", clean=False)
    sha = np.array([r.sha256 for r in block])
    tag = block[0].sha256[:16]
    need = [i for i, r in enumerate(block) if r.sha256 not in have_feat]
    lm_new: dict[str, np.ndarray] = {}
    if need:
        worker = get_worker()
        parts = [worker.features([images[i] for i in need[k:k + PROGRESS_STEP]])
                 for k in range(0, len(need), PROGRESS_STEP)]
        f = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        feats.write({"sha256": sha[need], **{k: v for k, v in f.items() if k != "pose"}}, tag)
        lm_new = dict(zip(sha[need].tolist(), f["landmarks"]))
    old = [k for k in sha.tolist() if k not in lm_new]
    lm_old = dict(zip(old, feats.gather(old, ("landmarks",))["landmarks"])) if old else {}
    landmarks = np.stack([lm_new[k] if k in lm_new else lm_old[k] for k in sha.tolist()])
    faces.write({"sha256": sha, "faces": align_all(images, landmarks, size)}, tag)
    return len(need)


_POOL: dict = {}  # per pool process: device, threads, the FaceWorker once built


def _pool_init(device: str, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    _POOL.update(device=device, worker=None)


def _pool_worker() -> FaceWorker:
    if _POOL["worker"] is None:
        _POOL["worker"] = FaceWorker(device=_POOL["device"])
    return _POOL["worker"]


def _pool_job(job: tuple) -> tuple[int, int]:
    block, root, chunk_dir, size, have_feat = job
    return len(block), process_block(block, root, chunk_dir, size, have_feat, _pool_worker)


def prepare_dataset(name: str, rows: list[ds.Row], root: Path, cache: Path, size: int,
                    worker_factory=None, chunk: int = 1000, log=print, manifest_path: Path | None = None,
                    workers: int = 1, device: str = "cpu", threads: int = 1) -> dict:
    """Bring <cache>/<name>/ up to date for `rows`; returns timing and work counts.

    workers > 1: blocks go to that many spawned processes (each `threads` torch
    threads, its own networks); otherwise `worker_factory()` runs them in-process."""
    from tqdm import tqdm
    t0 = time.time()
    out_dir = cache / name
    rows = ordered(rows)
    keys = [r.sha256 for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{name}: manifest has repeated content hashes (dedup first)")
    feats = ChunkStore(out_dir / "chunks", f"features_{feature_fingerprint()}")
    faces = ChunkStore(out_dir / "chunks", f"faces{size}_{faces_fingerprint(size)}")
    have_feat, have_face = feats.keys(), faces.keys()
    todo = [r for r in rows if r.sha256 not in have_feat or r.sha256 not in have_face]
    stats = {"images": len(rows), "processed": len(todo), "detected_now": 0}
    if todo:
        log(f"{name}: {len(todo)} of {len(rows)} images to process "
            f"({len(have_feat)} with features, {len(have_face)} with {size}px faces cached)")
        blocks = [todo[s:s + chunk] for s in range(0, len(todo), chunk)]
        bar = tqdm(total=len(todo), desc=f"{name} faces", unit="img", mininterval=2.0)
        if workers > 1 and len(blocks) > 1:
            import multiprocessing as mp
            need_sets = [{r.sha256 for r in b} & have_feat for b in blocks]  # only what a block needs
            jobs = [(b, root, out_dir / "chunks", size, h) for b, h in zip(blocks, need_sets)]
            with mp.get_context("spawn").Pool(workers, _pool_init, (device, threads)) as pool:
                for n, detected in pool.imap_unordered(_pool_job, jobs):
                    bar.update(n)
                    stats["detected_now"] += detected
        else:
            worker: list = []

            def get_worker():
                if not worker:
                    worker.append((worker_factory or (lambda: FaceWorker(device=device)))())
                return worker[0]
            for block in blocks:
                stats["detected_now"] += process_block(block, root, out_dir / "chunks", size, have_feat, get_worker)
                bar.update(len(block))
        bar.close()
    stats["work_s"] = round(time.time() - t0, 1)
    assemble(name, rows, out_dir, size, ChunkStore(out_dir / "chunks", feats.prefix),
             ChunkStore(out_dir / "chunks", faces.prefix), log, manifest_path)
    _prune(out_dir / "chunks", ("features_", feats.prefix), (f"faces{size}_", faces.prefix))
    stats["total_s"] = round(time.time() - t0, 1)
    if todo:  # keep the cost of the last run that did work (reruns report ~0 s)
        index = json.loads((out_dir / "index.json").read_text())
        index["last_build"] = {**stats, "size": size, "workers": workers, "threads": threads,
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return stats


def _prune(folder: Path, *kinds: tuple[str, str]) -> None:
    """Delete chunks of an older fingerprint (another face-pipeline setting)."""
    for family, current in kinds:
        for f in folder.glob(f"{family}*.npz"):
            if not f.name.startswith(current + "_"):
                f.unlink()


def assemble(name: str, rows: list[ds.Row], out_dir: Path, size: int, feats: ChunkStore,
             faces: ChunkStore, log=print, manifest_path: Path | None = None) -> None:
    """Write meta.npz / identity.npy / faces_<S>.npy / index.json in cache order,
    each only when its inputs (manifest rows, chunk files) changed."""
    index_path = out_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    digest = manifest_digest(rows)
    feat_files = [f.name for f in feats.files()]
    face_files = [f.name for f in faces.files()]
    chunks = index.get("chunks", {})
    same_rows = (index.get("manifest_sha256") == digest
                 and index.get("features") == feats.prefix)
    same_pose = index.get("pose_version") == POSE_VERSION
    sizes = set(index.get("sizes", [])) if same_rows else set()
    if not same_rows:  # faces of other sizes are in the old order: stale
        for old in out_dir.glob("faces_*.npy"):
            old.unlink()
        chunks = {}
    need_meta = (chunks.get("features") != feat_files or not same_pose
                 or not (out_dir / "meta.npz").is_file())
    faces_file = out_dir / f"faces_{size}.npy"
    need_faces = chunks.get(f"faces{size}") != face_files or not faces_file.is_file() or size not in sizes
    manifest = str(Path(manifest_path).resolve()) if manifest_path else index.get("manifest", "")
    if not (need_meta or need_faces) and index.get("manifest", "") == manifest:
        return
    keys = [r.sha256 for r in rows]
    if need_meta:
        from model.pose import estimate_pose
        f = feats.gather(keys, ("landmarks", "box", "score", "source", "identity", "image_wh"))
        f["pose"] = estimate_pose(f["landmarks"], f["image_wh"])
        _save_npy(out_dir / "identity.npy", f.pop("identity"))
        tmp = out_dir / "meta.tmp.npz"
        np.savez(tmp, sha256=np.array(keys), path=np.array([r.path for r in rows]),
                 split=np.array([r.split for r in rows]),
                 label=np.array([ds.label_index(r) for r in rows], np.int64),
                 contempt=np.array([r.contempt for r in rows], bool),
                 subject=np.array([r.subject for r in rows]),
                 fallback=f["source"] == SOURCE_FALLBACK, **f)
        os.replace(tmp, out_dir / "meta.npz")
    if need_faces:
        _save_npy(faces_file, faces.gather(keys, ("faces",))["faces"])
    counts = Counter(r.split for r in rows)
    ranges, start = {}, 0
    for s in ds.SPLITS:
        ranges[s] = [start, start + counts.get(s, 0)]
        start += counts.get(s, 0)
    index_path.write_text(json.dumps({
        "dataset": name, "manifest": manifest, "n": len(rows), "splits": ranges, "sizes": sorted(sizes | {size}),
        "manifest_sha256": digest, "features": feats.prefix, "pose_version": POSE_VERSION,
        "chunks": {**chunks, "features": feat_files, f"faces{size}": face_files},
    }, indent=1) + "\n")
    log(f"{name}: cache assembled in {out_dir} ({len(rows)} faces, {size}px)")


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# 4. Report
# ---------------------------------------------------------------------------

def build_report(names: list[str], cache: Path, manifests: dict[str, ds.Manifest],
                 timings: dict[str, dict]) -> dict:
    report: dict = {"datasets": {}, "timings_s": timings}
    for name in names:
        meta = np.load(cache / name / "meta.npz")
        split, source, label = meta["split"], meta["source"], meta["label"]
        pose, contempt = meta["pose"], meta["contempt"]
        entry: dict = {"images": int(len(split)), "splits": {}}
        for s in ds.SPLITS:
            m = split == s
            if not m.any():
                continue
            classes = {EXPRESSIONS[k]: int(((label == k) & m).sum()) for k in range(len(EXPRESSIONS))}
            classes["contempt"] = int((contempt & m).sum())
            classes["unlabeled"] = int(((label < 0) & ~contempt & m).sum())
            entry["splits"][s] = {
                "images": int(m.sum()), "classes": classes,
                "detected": int((source[m] == SOURCE_DETECTED).sum()),
                "detected_after_padding": int((source[m] == SOURCE_PADDED).sum()),
                "fallback": int((source[m] == SOURCE_FALLBACK).sum()),
                "subjects": int(len(set(meta["subject"][m].tolist()) - {""})),
            }
        fb = source == SOURCE_FALLBACK
        entry["fallback_rate"] = round(float(fb.mean()), 4) if len(fb) else 0.0
        ok = pose[~fb]
        if len(ok):
            entry["pose_detected"] = {
                k: {"median": round(float(np.median(v)), 2), "median_abs": round(float(np.median(np.abs(v))), 2),
                    "p5": round(float(np.percentile(v, 5)), 2), "p95": round(float(np.percentile(v, 95)), 2)}
                for k, v in zip(("yaw", "pitch", "roll"), ok.T)}
        if name in manifests:
            entry["dropped"] = manifests[name].drop_counts()
        index = json.loads((cache / name / "index.json").read_text())
        if "last_build" in index:
            entry["last_build"] = index["last_build"]
        report["datasets"][name] = entry
    return report


def write_report(report: dict, names: list[str], cache: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    bins = np.linspace(-90, 90, 73)
    for name in names:
        meta = np.load(cache / name / "meta.npz")
        ok = meta["pose"][~meta["fallback"]]
        for ax, col, title in zip(axes, ok.T, ("yaw", "pitch", "roll")):
            ax.hist(np.clip(col, -90, 90), bins=bins, histtype="step", density=True, label=f"{name} ({len(ok)})")
            ax.set_title(f"{title} (degrees, detected faces)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    png = cache / "pose_hist.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    (cache / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (cache / "report.md").write_text(_markdown(report))
    return [cache / "report.md", cache / "report.json", png]


def _markdown(report: dict) -> str:
    lines = ["# Data report (`ipdfer prepare --report`)", "",
             "Pose: pseudo-labels from 5 landmarks + PnP (see model/pose.py); yaw > 0 = nose to the "
             "image right, pitch > 0 = looking up, roll > 0 = clockwise in the image. "
             "Fallback = no face detected, centre crop used.", "",
             "![pose histograms](pose_hist.png)", ""]
    for name, e in report["datasets"].items():
        lines += [f"## {name}", "", f"{e['images']} images, fallback rate {e['fallback_rate']:.1%}.", ""]
        if e.get("last_build"):
            b = e["last_build"]
            lines += [f"Last build that did work: {b['processed']} images in {b['work_s']} s "
                      f"({b['workers']} processes x {b['threads']} threads, finished {b['finished']}).", ""]
        if e.get("dropped"):
            lines += ["Dropped while building the manifest: "
                      + ", ".join(f"{k} {v}" for k, v in e["dropped"].items()) + ".", ""]
        cls = [*EXPRESSIONS, "contempt", "unlabeled"]
        lines += ["| split | images | subjects | detected | after padding | fallback | " + " | ".join(cls) + " |",
                  "|---" * (6 + len(cls)) + "|"]
        for s, v in e["splits"].items():
            lines.append(f"| {s} | {v['images']} | {v['subjects']} | {v['detected']} | "
                         f"{v['detected_after_padding']} | {v['fallback']} | "
                         + " | ".join(str(v["classes"][c]) for c in cls) + " |")
        if "pose_detected" in e:
            lines += ["", "| angle | median | median abs | p5 | p95 |", "|---|---|---|---|---|"]
            for k, v in e["pose_detected"].items():
                lines.append(f"| {k} | {v['median']} | {v['median_abs']} | {v['p5']} | {v['p95']} |")
        lines.append("")
    t = report.get("timings_s", {})
    if t:
        lines += ["## Timing (this run, seconds)", "", "```", json.dumps(t, indent=1), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# 5. Command line
# ---------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                   help="folder holding the dataset folders (default %(default)s; env IPDFER_DATA)")
    p.add_argument("--datasets", default=",".join(DEFAULT_DATASETS),
                   help="comma-separated: fer2013, ckplus, muxspace, rafdb, affectnet, or a "
                        "name given with --generic (default %(default)s)")
    p.add_argument("--dir", action="append", default=[], metavar="NAME=PATH",
                   help="use PATH as the root of dataset NAME (e.g. rafdb=/data/RAF-DB/basic)")
    p.add_argument("--generic", action="append", default=[], metavar="NAME=PATH",
                   help="a <PATH>/<label>/*.jpg folder to prepare as dataset NAME")
    p.add_argument("--size", type=int, default=64, help="aligned face side in pixels (default 64)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="where the face cache goes (default %(default)s; env IPDFER_CACHE/data)")
    p.add_argument("--manifest-dir", type=Path, default=MANIFEST_DIR,
                   help="where manifests are written (default: model/manifests in the repo)")
    p.add_argument("--use-manifests", action="store_true",
                   help="read the existing manifests instead of re-hashing the data")
    p.add_argument("--manifests-only", action="store_true", help="write manifests, skip the face cache")
    p.add_argument("--report", action="store_true", help="write report.md/.json + pose_hist.png in the cache")
    p.add_argument("--chunk", type=int, default=1000, help="images per cache chunk (resume granularity)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes for face work (default %(default)s; 1 = in-process)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: cores / workers)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    import torch
    t_start = time.time()
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    generic = dict(kv.split("=", 1) for kv in args.generic)
    dirs = dict(kv.split("=", 1) for kv in args.dir)
    names += [g for g in generic if g not in names]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = Path(args.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)

    manifests: dict[str, ds.Manifest] = {}
    roots: dict[str, Path] = {}
    timings: dict[str, dict] = {}
    for name in names:
        t0 = time.time()
        root = Path(generic.get(name) or dirs.get(name) or ds.find_root(name, args.data_root))
        roots[name] = root
        mpath = args.manifest_dir / f"{name}.csv"
        if args.use_manifests and mpath.is_file():
            manifests[name] = ds.Manifest(ds.read_manifest(mpath))
            print(f"{name}: {len(manifests[name].rows)} rows from {mpath}")
        else:
            m = ds.load_dataset(name, root, kind="generic" if name in generic else None)
            changed = ds.write_manifest(mpath, m.rows)
            ds.write_drops(args.manifest_dir / f"{name}_dropped.csv", m.dropped)
            manifests[name] = m
            print(f"{name}: {len(m.rows)} images kept from {root}; dropped {m.drop_counts() or 'none'}; "
                  f"manifest {'updated' if changed else 'unchanged'}: {mpath}")
            for split, c in m.counts().items():
                print(f"  {split:5s} {sum(c.values()):6d}  " + "  ".join(f"{k} {v}" for k, v in c.items()))
        timings[name] = {"manifest_s": round(time.time() - t0, 1)}
    if args.manifests_only:
        return 0

    workers = 1 if device != "cpu" else max(1, args.workers)
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    worker: list = []

    def factory():  # one in-process FaceWorker for all data sets
        if not worker:
            worker.append(FaceWorker(device=device))
        return worker[0]

    for name in names:
        stats = prepare_dataset(name, manifests[name].rows, roots[name], cache, args.size, factory,
                                chunk=args.chunk, manifest_path=args.manifest_dir / f"{name}.csv",
                                workers=workers, device=device, threads=threads)
        timings[name].update(stats)
        print(f"{name}: {stats['processed']} images processed in {stats['work_s']}s "
              f"({stats['detected_now']} detected now)")
    timings["total_s"] = round(time.time() - t_start, 1)

    summary = build_report(names, cache, manifests, timings)
    for name, e in summary["datasets"].items():
        print(f"{name}: {e['images']} faces, fallback {e['fallback_rate']:.1%}, "
              + ", ".join(f"{s} {v['images']}" for s, v in e["splits"].items()))
    if args.report:
        for path in write_report(summary, names, cache):
            print(f"wrote {path}")
    print(f"prepare done in {timings['total_s']}s", file=sys.stderr)
    return 0
