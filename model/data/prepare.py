"""`ipdfer prepare`: manifests, aligned-face cache, pose pseudo-labels, identity features.

    ipdfer prepare [--data-root DIR] [--datasets fer2013,ckplus,muxspace]
                   [--size 64] [--cache-dir ~/.cache/ipdfer/data] [--report]

Steps, per dataset:
1. Manifest: the loader in `model.data.sources` hashes every file and splits the set;
   `model/manifests/<dataset>.csv` (+ `<dataset>_dropped.csv`) are rewritten only
   when their content changes (they are committed; deterministic).
2. Features (size-independent, once per content hash): detection (MTCNN) with the
   shared face pipeline's functions, 5 landmarks in original image pixels, score,
   source (0 detected, 1 detected after padding the crop, 2 centre-crop fallback),
   pose pseudo-labels (`model.faces.pose`) and the frozen identity encoder's 128-D
   descriptor of the dlib chip (for a fallback, the chip cut from the same
   centre-crop pseudo-landmarks).
3. Faces: the aligned grey crop at `--size` (`model.faces.align_face` on the same
   landmarks). A new size later only re-aligns; nothing is detected again.
4. Assembly, in manifest order with each split contiguous, into
       <cache>/<dataset>/faces_<S>.npy   uint8 (N, S, S)   (np.load(mmap_mode="r"))
       <cache>/<dataset>/identity.npy    float32 (N, 128)
       <cache>/<dataset>/meta.npz        sha256, path, split, label, subject, landmarks,
                                          box, score, source, fallback, pose, image_wh
       <cache>/<dataset>/index.json      split ranges, manifest hash, sizes done
   which `model.data.datasets.load_split` reads.

Incremental and resumable: work is stored in chunk files keyed by content hash
(`chunks/features_*.npz`, `chunks/faces<S>_*.npz`, written atomically every
`--chunk` images); a rerun skips every hash already in a chunk, and assembly is
skipped when index.json already matches the manifest and the chunks.

Detection details (measured on 2 CPU cores, see docs/design.md):
- Images under 96 px are enlarged 3x (the pipeline's `upscale_small`) and detected
  with min_face_size=40 (faces fill these crops; 10x faster than 20 at the same
  detection rate). Larger images use the pipeline default (20).
- Small images where nothing is found are retried once with an 8 px replicated
  border (MTCNN misses faces that touch the crop edge): +~60% of the misses.
- Several faces: the largest box is taken (datasets are centred on their subject).
- Still nothing: the fallback crop (`model.faces.preprocess.fallback_landmarks`), flagged.

Throughput: the work runs in `--workers` processes (default 2) with one torch
thread each. Measured on the shared 2-core machine: MTCNN's many tiny per-box ops
and the identity ResNet both cost 2-4x more CPU per image with 2 threads than with
1 when other jobs compete for the cores (OpenMP threads wait on each other), and
two 1-thread processes tripled the images per second of one 2-thread process.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from model.data import manifests as mf
from model.data import sources
from model.data.cache import prepare_dataset
from model.data.features import FaceWorker
from model.data.report import build_report, write_report
from model.paths import MANIFEST_DIR, data_root, default_cache_dir, require_data_root

DEFAULT_DATASETS = ("fer2013", "ckplus", "muxspace")


# ---------------------------------------------------------------------------
# 5. Command line
# ---------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", type=Path, default=data_root(),
                   help="folder holding the dataset folders (fer2013/, ckplus48/, muxspace/, ...); "
                        "default: env IPDFER_DATA")
    p.add_argument("--datasets", default=",".join(DEFAULT_DATASETS),
                   help="comma-separated: fer2013, ckplus, muxspace, rafdb, affectnet, or a "
                        "name given with --generic (default %(default)s)")
    p.add_argument("--dir", action="append", default=[], metavar="NAME=PATH",
                   help="use PATH as the root of dataset NAME (e.g. rafdb=/data/RAF-DB/basic)")
    p.add_argument("--generic", action="append", default=[], metavar="NAME=PATH",
                   help="a <PATH>/<label>/*.jpg folder to prepare as dataset NAME")
    p.add_argument("--size", type=int, default=64, help="aligned face side in pixels (default 64)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
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

    manifests: dict[str, mf.Manifest] = {}
    roots: dict[str, Path] = {}
    timings: dict[str, dict] = {}
    for name in names:
        t0 = time.time()
        root = Path(generic.get(name) or dirs.get(name) or sources.find_root(name, require_data_root(args.data_root)))
        roots[name] = root
        mpath = args.manifest_dir / f"{name}.csv"
        if args.use_manifests and mpath.is_file():
            manifests[name] = mf.Manifest(mf.read_manifest(mpath))
            print(f"{name}: {len(manifests[name].rows)} rows from {mpath}")
        else:
            m = sources.load_dataset(name, root, kind="generic" if name in generic else None)
            changed = mf.write_manifest(mpath, m.rows)
            mf.write_drops(args.manifest_dir / f"{name}_dropped.csv", m.dropped)
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
