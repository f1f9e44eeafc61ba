"""Training images/s of the real training command, `ipdfer train`, for a config
and each batch source (DataLoader workers vs batches made on the device).

    .venv/bin/python benchmarks/train_throughput.py model/configs/cpu_mnv2_encoders.json --steps 60
    .venv/bin/python benchmarks/train_throughput.py model/configs/gpu_recipe.json --device cuda

Each run is a fresh `ipdfer train --max-steps N` in a temporary folder; the rate is
taken between the first and last rows of its CSV log (start-up excluded)."""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(config: Path, batches: str, steps: int, device: str | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "service.cli", "train", str(config), "--run-dir", tmp,
               "--max-steps", str(steps), "--batches", batches] + (["--device", device] if device else [])
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        rows = list(csv.DictReader(open(Path(tmp) / "log.csv")))
        batch = json.loads((Path(tmp) / "train_config.json").read_text())["batch_size"]
    first, last = rows[0], rows[-1]
    return (int(last["step"]) - int(first["step"])) * batch / (float(last["sec"]) - float(first["sec"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--steps", type=int, default=60, help="steps per run (logged every log_every)")
    ap.add_argument("--device")
    ap.add_argument("--batches", default="dataloader,device")
    args = ap.parse_args()
    print(f"config {args.config}, {args.steps} steps per run")
    for source in args.batches.split(","):
        print(f"{source:>10}: {measure(args.config.resolve(), source, args.steps, args.device):7.1f} images/s")


if __name__ == "__main__":
    main()
