"""`ipdfer predict IMAGE_OR_FOLDER...`: the service's pipeline on files, without a server.

A folder stands for the images under it (recursive, sorted by name). Files are
batched (--batch-size) through the same Pipeline the workers run and one JSON
object per file is printed (JSON lines), with the API's face schema plus
"file"; a progress bar goes to stderr when it is a terminal. A file that cannot
be read or decoded gets {"file", "error", "detail"} (service/jobs.py's error
kinds) instead; the run goes on. Exit code 0, or 1 when every file failed.

    ipdfer predict photos/ --neutral-dir out/   # every image under photos/; neutral faces as PNG files
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

from tqdm import tqdm

from model.images import IMAGE_SUFFIXES, image_files
from service.jobs import OP_ANALYZE, Job
from service.pipeline import Pipeline
from service.settings import Settings, add_options

log = logging.getLogger(__name__)

PREDICT_OPTIONS = ("device", "weights_dir", "max_batch_size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER",
                        help="image files, or folders of images (searched recursively)")
    parser.add_argument("--aligned", action="store_true", help="the images already are face crops")
    parser.add_argument("--neutral-dir", type=Path, help="write each face's neutral render here as PNG")
    parser.add_argument("--max-faces", type=int, default=None, help="keep the best N faces per image")
    add_options(parser, PREDICT_OPTIONS, max_batch_size=("--batch-size", "--max-batch-size"))


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; a folder becomes the images under it. A folder with no
    image is an error (a typo must not print nothing and succeed)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise SystemExit(f"ipdfer predict: no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
            out += found
        else:
            out.append(path)
    return out


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def predict_files(pipeline: Any, files: list[Path], *, aligned: bool = False, max_faces: int | None = None,
                  neutral_dir: Path | None = None, batch_size: int = 16,
                  out: TextIO | None = None) -> tuple[int, int]:
    """Print one JSON line per file; returns (succeeded, failed)."""
    out = out or sys.stdout
    ok = failed = 0
    if neutral_dir:
        neutral_dir.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=len(files), unit="image", disable=None, file=sys.stderr)  # off when not a terminal
    for batch in _batches(files, max(1, batch_size)):
        lines: dict[int, dict[str, Any]] = {}
        jobs: list[tuple[int, Job]] = []
        for k, path in enumerate(batch):
            try:
                data = path.read_bytes()
            except OSError as e:
                lines[k] = {"file": str(path), "error": "bad_image", "detail": f"cannot read file: {e.strerror or e}"}
                continue
            jobs.append((k, Job(op=OP_ANALYZE, image=data, aligned=aligned, max_faces=max_faces,
                                neutral=neutral_dir is not None)))
        results = pipeline([j for _, j in jobs]) if jobs else []
        for (k, _), res in zip(jobs, results):
            path = batch[k]
            if isinstance(res, BaseException):
                lines[k] = {"file": str(path), "error": "failed", "detail": f"{type(res).__name__}: {res}"}
                continue
            reply = res.reply
            if "error" in reply:
                lines[k] = {"file": str(path), "error": reply["error"], "detail": reply["detail"]}
                continue
            for n, face in enumerate(reply["faces"]):
                png = face.pop("neutral_png", None)
                face["neutral_png"] = None
                if png and neutral_dir:
                    target = neutral_dir / f"{path.stem}_face{n}_neutral.png"
                    target.write_bytes(base64.b64decode(png))
                    face["neutral_file"] = str(target)
            lines[k] = {"file": str(path), "faces": reply["faces"], "faces_skipped": reply.get("faces_skipped", 0),
                        "image": reply["image"],
                        "model": reply["model"], "timings": reply["timings"]}
        for k in range(len(batch)):
            line = lines[k]
            if "error" in line:
                failed += 1
            else:
                ok += 1
            out.write(json.dumps(line) + "\n")
        out.flush()
        progress.update(len(batch))
    progress.close()
    return ok, failed


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_args(args, PREDICT_OPTIONS)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    pipeline = Pipeline.load(settings, worker="predict")
    ok, failed = predict_files(pipeline, expand(list(args.images)), aligned=args.aligned, max_faces=args.max_faces,
                               neutral_dir=args.neutral_dir, batch_size=settings.max_batch_size)
    print(f"{ok} file(s) analysed, {failed} failed", file=sys.stderr)
    return 1 if failed and not ok else 0
