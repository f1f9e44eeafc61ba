"""`ipdfer evaluate` on a small real cache (CK+ subjects prepared in a tmp
folder) with the shipped weights, and the metric helpers on known answers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from model.training import evaluate
from service.cli import main as cli
from tests import data_samples as samples


def test_classification_report_on_a_known_answer():
    labels = np.array([0, 0, 1, 2])
    probs = np.eye(7)[[0, 1, 1, 2]]            # predictions 0, 1, 1, 2
    rep = evaluate.classification_report(labels, probs)
    assert rep["accuracy"] == 0.75
    assert rep["mean_class_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3, abs=1e-4)
    # F1: class 0 P=1 R=.5, class 1 P=.5 R=1, class 2 P=R=1; absent classes are left out
    assert rep["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3, abs=1e-4)
    assert rep["confusion_matrix"][0][:3] == [1, 1, 0] and sum(map(sum, rep["confusion_matrix"])) == 4
    assert set(rep["per_class_accuracy"]) == {"neutral", "happy", "sad"}


def test_linear_probe_separates_what_is_separable_and_nothing_else():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    informative = rng.normal(size=(120, 8)) + 4 * np.eye(4, 8)[y]
    assert evaluate.linear_probe(informative, y) > 0.95
    assert evaluate.linear_probe(rng.normal(size=(120, 8)), y) < 0.5   # chance is 0.25


@pytest.fixture(scope="module")
def ck_cache(shared_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    samples.make_ckplus(samples.data_dir(shared_dir), base / "data", subjects=4)
    assert cli(["prepare", "--data-root", str(base / "data"), "--datasets", "ckplus", "--cache-dir",
                str(base / "cache"), "--manifest-dir", str(base / "manifests"), "--workers", "1"]) == 0
    return base / "cache"


def test_evaluate_writes_consistent_metrics_and_plots(ck_cache, tmp_path):
    out = tmp_path / "eval"
    assert cli(["evaluate", "--split", "ckplus:all", "--data-cache", str(ck_cache), "--out", str(out),
                "--reference", str(evaluate.DEFAULT_WEIGHTS_DIR)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    rep = report["splits"]["ckplus:all"]
    faces = evaluate.datalib.load_split("ckplus", "all", cache_dir=ck_cache)
    assert rep["n"] == int((faces.labels >= 0).sum()) > 20      # contempt (-1) left out
    cm = np.array(rep["confusion_matrix"])
    assert cm.sum() == rep["n"] and rep["accuracy"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-4)
    assert set(rep["pose_mae_deg"]) == {"yaw", "pitch", "roll"}
    assert all(0 <= v < 30 for v in rep["pose_mae_deg"].values())
    nr = rep["neutral_render"]
    assert nr["faces"] > 0 and 0 <= nr["judged_neutral"] <= 1 and 0 <= nr["identity_kept"] <= 1
    assert 0 <= nr["identity_matches_another_person"] <= 1
    leak = nr["expression_probe_from_render"]
    assert leak is None or 0 <= leak <= 1
    assert report["weights"]["sha256"] == json.loads(
        (evaluate.DEFAULT_WEIGHTS_DIR / "manifest.json").read_text())["sha256"]
    for png in ("confusion_ckplus_all.png", "grid_ckplus_all.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_names_a_missing_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="ipdfer prepare"):
        cli(["evaluate", "--split", "ckplus:test", "--data-cache", str(tmp_path), "--out", str(tmp_path / "o")])
