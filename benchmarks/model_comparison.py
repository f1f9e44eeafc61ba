"""The model card's figures in one run: full IPD-FER vs the ablation (E_exp
alone, same budget) on every test split, the disentanglement probes, neutral
renders judged by the ablation, and the cross-dataset CK+ figure of a network
trained without CK+. Each model goes through `ipdfer evaluate`; this script
prints the tables and writes summary.json.

    .venv/bin/python benchmarks/model_comparison.py --weights weights \\
        --ablation ~/.cache/ipdfer/weights/abl-s2 --cross ~/.cache/ipdfer/weights/nock-s2 \\
        --out ~/.cache/ipdfer/eval/compare
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.paths import cache_root
from model.training.export import TEST_SPLITS
from model.weights import DEFAULT_WEIGHTS_DIR
from service.cli import main as cli

FER_TARGET = 0.70


def evaluate(weights: Path, out: Path, splits: tuple[str, ...], *extra: str) -> dict:
    """`ipdfer evaluate`, reusing an earlier report of the very same weights file."""
    sha = json.loads((weights / "manifest.json").read_text())["sha256"]
    done = out / "metrics.json"
    if not done.exists() or json.loads(done.read_text())["weights"]["sha256"] != sha:
        args = ["evaluate", "--weights", str(weights), "--out", str(out), *extra]
        for s in splits:
            args += ["--split", s]
        assert cli(args) == 0
    return json.loads(done.read_text())


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR, help="full IPD-FER weights")
    ap.add_argument("--ablation", type=Path, required=True, help="E_exp-alone weights, same budget")
    ap.add_argument("--cross", type=Path, help="weights trained without CK+ (tested on all of CK+)")
    ap.add_argument("--out", type=Path, default=cache_root() / "eval" / "compare")
    ap.add_argument("--data-cache", type=Path)
    args = ap.parse_args()
    cache = ["--data-cache", str(args.data_cache)] if args.data_cache else []

    full = evaluate(args.weights, args.out / "full", TEST_SPLITS, "--probes", "--reference", str(args.ablation), *cache)
    abl = evaluate(args.ablation, args.out / "ablation", TEST_SPLITS, "--probes", *cache)
    cross = evaluate(args.cross, args.out / "cross", ("ckplus:all",), *cache) if args.cross else None

    print(f"\nfull: {full['weights']['version']}  ablation: {abl['weights']['version']}")
    print("\n| test split | full IPD-FER | E_exp alone (ablation) |\n|---|---|---|")
    for s in TEST_SPLITS:
        print(f"| {s} | {pct(full['splits'][s]['accuracy'])} | {pct(abl['splits'][s]['accuracy'])} |")
    fp, ap_ = full["probes"], abl["probes"]
    print(f"| identity probe from E_exp (chance {pct(fp['identity_probe']['chance'])}, "
          f"E_id {pct(fp['identity_probe']['from_E_id'])}, pixels {pct(fp['identity_probe'].get('from_pixels'))}) "
          f"| {pct(fp['identity_probe']['from_E_exp'])} | {pct(ap_['identity_probe']['from_E_exp'])} |")
    print(f"| expression probe from E_pose (majority {pct(fp['expression_probe']['majority'])}, "
          f"E_id {pct(fp['expression_probe']['from_E_id'])}) "
          f"| {pct(fp['expression_probe']['from_E_pose'])} | {pct(ap_['expression_probe']['from_E_pose'])} |")
    fer = full["splits"]["fer2013:test"]["accuracy"]
    print(f"\nFER2013 PrivateTest {pct(fer)} vs target {pct(FER_TARGET)}: {'MET' if fer >= FER_TARGET else 'NOT MET'}")
    for s in TEST_SPLITS:
        nr = full["splits"][s].get("neutral_render")
        if nr:
            print(f"neutral renders of {nr['faces']} expressive {s} faces: judged neutral {pct(nr['judged_neutral'])} "
                  f"(target 70%), dlib identity kept {pct(nr['identity_kept'])} (target 70%; another person's "
                  f"face passes too: {pct(nr.get('identity_matches_another_person'))}, own face nearest of 64: "
                  f"{pct(nr.get('identity_rank1_of_64'))}); input expression "
                  f"recoverable from the render {pct(nr.get('expression_probe_from_render'))} "
                  f"(majority {pct(nr.get('majority'))})")
    if cross:
        c = cross["splits"]["ckplus:all"]
        print(f"cross-dataset: {cross['weights']['version']} (no CK+ in training) on all {c['n']} CK+ faces: "
              f"{pct(c['accuracy'])} (mean class {pct(c['mean_class_accuracy'])})")
    summary = {"full": full, "ablation": abl, "cross": cross}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwritten {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
