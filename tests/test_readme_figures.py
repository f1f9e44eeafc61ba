"""The model card in the README quotes the shipped weights' figures; each must be
what the committed report files say (weights/manifest.json, weights/report/), so
a re-run benchmark or new weights cannot leave the README behind."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "weights" / "report"


def readme_row(start: str) -> str:
    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(f"| {start}")]
    assert len(rows) == 1, f"README model card: one row starting {start!r}, found {len(rows)}"
    return rows[0]


def percents(text: str) -> list[float]:
    return [float(p) for p in re.findall(r"(\d+(?:\.\d+)?)%", text)]


def fer2013_crops_row() -> tuple[float, float]:
    """(accuracy, mean class) of the `ipdfer predict --aligned` row of benchmarks/fer2013_crops.py's output."""
    line = next(line for line in (REPORT / "fer2013_crops.txt").read_text().splitlines()
                if line.startswith("ipdfer predict --aligned"))
    accuracy, mean_class = map(float, line.split()[3:5])
    return accuracy, mean_class


def test_the_readme_names_the_shipped_version():
    version = json.loads((REPO / "weights" / "manifest.json").read_text())["version"]
    assert f"Shipped weights: **{version}**" in (REPO / "README.md").read_text()


def test_the_ckplus_figure_is_the_reports():
    splits = json.loads((REPORT / "metrics.json").read_text())["splits"]
    assert percents(readme_row("CK+ subject-disjoint test"))[0] == round(100 * splits["ckplus:test"]["accuracy"], 1)


def test_the_fer2013_figures_are_the_reports():
    accuracy, mean_class = fer2013_crops_row()
    assert percents(readme_row("FER2013 PrivateTest"))[:2] == [round(100 * accuracy, 1), round(100 * mean_class, 1)]


def test_the_muxspace_photo_figures_are_the_reports():
    photos = json.loads((REPORT / "photo_accuracy_muxspace_test.json").read_text())["photos"]
    row = percents(readme_row("muxspace person-disjoint test photos"))
    assert row[:2] == [round(100 * photos["accuracy"], 1), round(100 * photos["mean_class_accuracy"], 1)]
    recalls = re.findall(r"(\w+) (\d+\.\d)%", readme_row("muxspace person-disjoint test photos").split("recall")[1])
    assert recalls, "the muxspace row quotes per-class recall"
    for name, value in recalls:
        assert float(value) == round(100 * photos["recall"][name], 1), name


def test_a_changed_figure_is_caught(tmp_path, monkeypatch):
    """The comparison can fail: a report that says otherwise than the README."""
    (tmp_path / "fer2013_crops.txt").write_text(
        "weights w\n  accuracy mean class\nipdfer predict --aligned       0.7012     0.6801\n")
    monkeypatch.setattr(sys.modules[__name__], "REPORT", tmp_path)
    accuracy, mean_class = fer2013_crops_row()
    assert (accuracy, mean_class) == (0.7012, 0.6801)
    assert percents(readme_row("FER2013 PrivateTest"))[:2] != [70.1, 68.0]
