"""The neutral-photo check (`ipdfer evaluate --neutral-photos`,
benchmarks/neutral_render.py) on real muxspace photos with the shipped weights."""
from __future__ import annotations

import csv

import pytest

from model.serving.analyzer import Analyzer
from model.training import neutral_check
from model.weights import DEFAULT_WEIGHTS_DIR, load_weights
from tests import data_samples as samples

JUDGE = DEFAULT_WEIGHTS_DIR / "judge"   # a classifier trained apart from the shipped model


def test_the_default_manifest_holds_the_test_people_of_the_benchmark():
    # the figures in docs/model-card-0.5.2.md are over these 126 people and 573 expressive photos
    people = neutral_check.people_with_both(neutral_check.MANIFEST, "test")
    assert len(people) == 126
    assert sum(len(v["expressive"]) for v in people.values()) == 573
    assert all(v["neutral"] and v["expressive"] for v in people.values())


def test_the_check_runs_end_to_end_on_a_few_people(shared_dir, tmp_path):
    root = samples.data_dir(shared_dir) / "muxspace"
    if not root.is_dir():
        pytest.skip(f"muxspace photos not found under {root}")
    people = list(neutral_check.people_with_both(neutral_check.MANIFEST, "test"))[:3]
    with open(neutral_check.MANIFEST, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["subject"] in people]
    manifest = tmp_path / "few.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    judge = load_weights(JUDGE).model.eval()
    report = neutral_check.neutral_photo_check(Analyzer.load(device="cpu"), judge, root, manifest,
                                               out=tmp_path / "out")
    assert report["people"] == 3 and report["expressive_photos"] > 0
    assert report["render_size"] >= 112                       # large enough to look at
    for value in (report["identity"]["render"]["rank1"], report["closer_than_input"]["render"],
                  report["judged_neutral"]["render"], report["judged_neutral"]["input"]):
        assert 0.0 <= value <= 1.0
    assert report["render_differs_from_input"] > 0            # the editor changed something
    assert report["sharpness_ratio_median"]["render"] > 0.3   # not a blur
    assert (tmp_path / "out" / "neutral_photos.json").exists()
    assert (tmp_path / "out" / "neutral_muxspace_test.png").stat().st_size > 1000
