"""The face cache `ipdfer prepare` writes and training reads, per dataset:

    <cache>/<dataset>/faces_<S>.npy   uint8 (N, S, S)   (np.load(mmap_mode="r"))
    <cache>/<dataset>/identity.npy    float32 (N, 128)
    <cache>/<dataset>/meta.npz        sha256, path, split, label, subject, landmarks,
                                      box, score, source, fallback, pose, image_wh
    <cache>/<dataset>/index.json      split ranges, manifest hash, sizes done

built in manifest order (each split contiguous) from chunk files keyed by content
hash (`chunks/features_*.npz`, `chunks/faces<S>_*.npz`), every file written
atomically: a rerun skips every hash already in a chunk, and assembly is skipped
when index.json already matches the manifest and the chunks.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from model.data.features import FaceWorker, align_all, faces_fingerprint, feature_fingerprint
from model.data.manifests import SPLITS, Row, label_index, manifest_digest, ordered
from model.data.sources import ImageReader
from model.faces.preprocess import SOURCE_FALLBACK
from model.fileio import atomic_write, atomic_write_text

PROGRESS_STEP = 256      # images per detect + encode step inside a chunk
POSE_VERSION = 1         # bump when model/faces/pose.py changes (pose is recomputed at assembly)


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
        return atomic_write(self.folder / f"{self.prefix}_{tag}.npz", lambda tmp: np.savez(tmp, **arrays))

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

def process_block(block: list[Row], root: Path, chunk_dir: Path, size: int, have_feat: set[str],
                  get_worker) -> int:
    """Features (where missing) and aligned faces for one block of rows, written as one
    chunk file each (named after the block's first hash). Returns how many were detected."""
    images = ImageReader(root).read([r.path for r in block])  # a CSV is read once per block
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


def prepare_dataset(name: str, rows: list[Row], root: Path, cache: Path, size: int,
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
        atomic_write_text(out_dir / "index.json", json.dumps(index, indent=1) + "\n")
    return stats


def _prune(folder: Path, *kinds: tuple[str, str]) -> None:
    """Delete chunks of an older fingerprint (another face-pipeline setting)."""
    for family, current in kinds:
        for f in folder.glob(f"{family}*.npz"):
            if not f.name.startswith(current + "_"):
                f.unlink()


def assemble(name: str, rows: list[Row], out_dir: Path, size: int, feats: ChunkStore,
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
        from model.faces.pose import estimate_pose
        f = feats.gather(keys, ("landmarks", "box", "score", "source", "identity", "image_wh"))
        f["pose"] = estimate_pose(f["landmarks"], f["image_wh"])
        _save_npy(out_dir / "identity.npy", f.pop("identity"))
        atomic_write(out_dir / "meta.npz", lambda tmp: np.savez(tmp, sha256=np.array(keys), path=np.array([r.path for r in rows]),
                 split=np.array([r.split for r in rows]),
                 label=np.array([label_index(r) for r in rows], np.int64),
                 contempt=np.array([r.contempt for r in rows], bool),
                 subject=np.array([r.subject for r in rows]),
                 fallback=f["source"] == SOURCE_FALLBACK, **f))
    if need_faces:
        _save_npy(faces_file, faces.gather(keys, ("faces",))["faces"])
    counts = Counter(r.split for r in rows)
    ranges, start = {}, 0
    for s in SPLITS:
        ranges[s] = [start, start + counts.get(s, 0)]
        start += counts.get(s, 0)
    atomic_write_text(index_path, json.dumps({
        "dataset": name, "manifest": manifest, "n": len(rows), "splits": ranges, "sizes": sorted(sizes | {size}),
        "manifest_sha256": digest, "features": feats.prefix, "pose_version": POSE_VERSION,
        "chunks": {**chunks, "features": feat_files, f"faces{size}": face_files},
    }, indent=1) + "\n")
    log(f"{name}: cache assembled in {out_dir} ({len(rows)} faces, {size}px)")


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.save(tmp, array))
