"""The `ipdfer` command. Each subcommand lives in its own module, which exposes
`add_arguments(parser)` and `run(args) -> int | None`; modules are imported only
when their subcommand runs, so `ipdfer detect` never loads FastAPI or Redis."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "detect": ("model.faces.cli", "detect faces in images, print JSON"),
    "prepare": ("model.data.prepare", "build manifests, aligned-face cache, pose and identity features"),
    "train": ("model.training.train", "train IPD-FER from a config"),
    "train-expression": ("model.training.expression", "train the expression encoder alone, long and resumable"),
    "evaluate": ("model.training.evaluate", "evaluate weights on a split, write a report"),
    "export": ("model.training.export", "export a checkpoint to weights/ with a manifest"),
    "export-onnx": ("model.serving.export", "export the served encoders of weights/ and MTCNN's networks (weights/mtcnn/) as ONNX graphs"),
    "serve": ("service.server", "run the HTTP API (in-process queue without REDIS_URL)"),
    "worker": ("service.worker", "run a batching model worker on the Redis queue"),
    "predict": ("service.predict", "run the pipeline on files without a server (JSON lines)"),
    "video": ("model.video.cli", "analyse a video: per-face tracks, smoothed expressions, CSV"),
    "settings": ("service.settings", "print the service's settings in effect, or (--markdown) the settings table"),
}


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipdfer", description="IPD-FER facial expression recognition")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == chosen:  # import only the module that will run
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    code = importlib.import_module(args._module).run(args)
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
