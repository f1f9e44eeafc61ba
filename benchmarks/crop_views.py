"""A train-expression run's EMA network on the served aligned crops against the
data sets' own crops (resized to 64 px): does re-alignment (or the centre-crop
fallback) cost accuracy? Prints accuracy and mean class accuracy of both views on
FER2013 PublicTest and PrivateTest (deduplicated, as cached) and muxspace test.

    .venv/bin/python benchmarks/crop_views.py RUN_NAME      # a run under ~/.cache/ipdfer/runs
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.paths import cache_root  # noqa: E402
from model.training.expression import ExpressionNet, load_faces, predict, recipe_from_dict, scores  # noqa: E402


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    ckpt = torch.load(cache_root() / "runs" / sys.argv[1] / "last.pt", weights_only=True, map_location="cpu")
    net = ExpressionNet(recipe_from_dict(ckpt["recipe"]).model_config())
    net.load_state_dict(ckpt["ema"])
    for split in ("fer2013:val", "fer2013:test", "muxspace:test"):
        faces = load_faces((split,), "both")
        print(f"{split:14} aligned (served) {scores(predict(net, faces.aligned), faces.labels)}  "
              f"raw data-set crop {scores(predict(net, faces.raw), faces.labels)}", flush=True)


if __name__ == "__main__":
    main()
