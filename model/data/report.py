"""`ipdfer prepare --report`: per dataset and split, class counts, detection
sources (detected, after padding, fallback), subjects, pose statistics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model.data.manifests import SPLITS, Manifest
from model.faces.preprocess import SOURCE_DETECTED, SOURCE_FALLBACK, SOURCE_PADDED
from model.labels import EXPRESSIONS



# ---------------------------------------------------------------------------
# 4. Report
# ---------------------------------------------------------------------------

def build_report(names: list[str], cache: Path, manifests: dict[str, Manifest],
                 timings: dict[str, dict]) -> dict:
    report: dict = {"datasets": {}, "timings_s": timings}
    for name in names:
        meta = np.load(cache / name / "meta.npz")
        split, source, label = meta["split"], meta["source"], meta["label"]
        pose, contempt = meta["pose"], meta["contempt"]
        entry: dict = {"images": int(len(split)), "splits": {}}
        for s in SPLITS:
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
             "Pose: pseudo-labels from 5 landmarks + PnP (see model/faces/pose.py); yaw > 0 = nose to the "
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
