"""Loaders and split rules on small real-image copies of each public layout."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from model.data import manifests as mf
from model.data import sources as ds
from model.paths import MANIFEST_DIR
from model.labels import EXPRESSIONS
from tests import data_samples as samples


@pytest.fixture(scope="module")
def src(shared_dir: Path) -> Path:
    return samples.data_dir(shared_dir)


def assert_split_rules(m: mf.Manifest, by_subject: bool) -> None:
    """One content hash per row and per split; no subject in two splits; valid fields."""
    shas = [r.sha256 for r in m.rows]
    assert len(shas) == len(set(shas)), "a content hash appears twice"
    assert [r.path for r in m.rows] == sorted(r.path for r in m.rows), "rows not sorted by path"
    for r in m.rows:
        assert r.split in mf.SPLITS
        assert r.label in EXPRESSIONS or (r.label == "" and r.contempt)
        assert len(r.sha256) == 64
        assert not Path(r.path).is_absolute() and ".." not in r.path
    if by_subject:
        where = defaultdict(set)
        for r in m.rows:
            assert r.subject, r.path
            where[r.subject].add(r.split)
        assert all(len(s) == 1 for s in where.values()), {k: v for k, v in where.items() if len(v) > 1}


def test_fer2013_folders(src, tmp_path):
    info = samples.make_fer_folders(src, tmp_path)
    m = ds.load_fer2013(info["root"])
    paths = {r.path: r for r in m.rows}
    assert_split_rules(m, by_subject=False)
    # official splits from the prefixes
    for r in m.rows:
        prefix = Path(r.path).name.split("_")[0]
        assert r.split == ds.FER_PREFIX_SPLIT[prefix]
    # the test copy of a train image is dropped, the train original kept
    assert info["leak"] not in paths and info["leak_source"] in paths
    # same-label duplicate: one copy survives (the first path in the same split)
    assert (info["dup"] in paths) != (info["dup_source"] in paths)
    # conflicting labels: the whole group goes
    assert not set(info["conflict"]) & set(paths)
    reasons = {d.path: d.reason for d in m.dropped}
    assert reasons[info["leak"]] == "duplicate_of_train"
    assert all(reasons[p] == "conflicting_labels" for p in info["conflict"])
    assert m.drop_counts() == {"conflicting_labels": 2, "duplicate": 1, "duplicate_of_train": 1}
    assert {r.label for r in m.rows} == {"anger", "happy", "surprise"}
    assert paths[info["leak_source"]].sha256 == ds.sha256_file(info["root"] / info["leak_source"])


def test_fer2013_csv(src, tmp_path):
    path = samples.make_fer_csv(src, tmp_path)
    m = ds.load_fer2013(path.parent)
    assert_split_rules(m, by_subject=False)
    kept = {r.path for r in m.rows}
    # row 10 (PrivateTest copy of train row 0) and rows 3 + 11 (conflict) are gone
    assert "fer2013.csv#0" in kept and "fer2013.csv#10" not in kept
    assert "fer2013.csv#3" not in kept and "fer2013.csv#11" not in kept
    assert len(m.rows) == 12 - 3
    by = {r.path: r for r in m.rows}
    assert by["fer2013.csv#0"].label == "anger" and by["fer2013.csv#4"].label == "happy"
    assert by["fer2013.csv#8"].split == "test" and by["fer2013.csv#6"].split == "val"
    # the virtual path reads back the 48x48 pixels whose bytes were hashed
    img = ds.ImageReader(path.parent)("fer2013.csv#4")
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    assert ds.sha256_bytes(np.ascontiguousarray(img[:, :, 0]).tobytes()) == by["fer2013.csv#4"].sha256


def test_ckplus_subject_split(src, tmp_path):
    root = samples.make_ckplus(src, tmp_path, subjects=10)
    m = ds.load_ckplus(root)
    assert_split_rules(m, by_subject=True)
    assert all(r.subject.startswith("S") and len(r.subject) == 4 for r in m.rows)
    assert len({r.subject for r in m.rows}) == 10
    assert {r.split for r in m.rows} == set(mf.SPLITS)  # 10 subjects reach every split
    contempt = [r for r in m.rows if "contempt/" in r.path]
    assert contempt and all(r.contempt and r.label == "" for r in contempt)
    assert all(r.label == "sad" for r in m.rows if "sadness/" in r.path)
    n = len(m.rows)
    assert sum(r.split == "train" for r in m.rows) > 0.5 * n


def test_muxspace_identity_split(src, tmp_path):
    root = samples.make_muxspace(src, tmp_path)
    m = ds.load_muxspace(root)
    assert_split_rules(m, by_subject=True)
    by = {Path(r.path).stem: r for r in m.rows}
    # legend names with .png find the .jpg on disk; the repeated row gives one row
    assert set(by) == set(samples.MUX_PICK) - {"Avinash_30"}
    assert all(r.path.endswith(".jpg") and r.path.startswith("images/") for r in m.rows)
    assert [d.reason for d in m.dropped] == ["conflicting_labels"]  # Avinash_30
    assert by["George_W_Bush_0002"].subject == "George_W_Bush"
    assert by["HrithikRoshan_12"].subject == "HrithikRoshan"
    assert by["facial-expressions_2868588k"].subject == "facial-expressions"
    assert by["facial-expressions_2868588k"].label == "anger"  # lower-cased legend
    assert by["George_W_Bush_0001"].split == by["George_W_Bush_0003"].split


def test_subject_from_name():
    assert ds.subject_from_name("George_W_Bush_0002.jpg") == "George_W_Bush"
    assert ds.subject_from_name("HrithikRoshan_12.jpg") == "HrithikRoshan"
    assert ds.subject_from_name("Lin_Yi-fu_0001.jpg") == "Lin_Yi-fu"
    assert ds.subject_from_name("facial-expressions_2868585k.jpg") == "facial-expressions"


def test_rafdb(src, tmp_path):
    root = samples.make_rafdb(src, tmp_path)
    m = ds.load_rafdb(root)
    assert_split_rules(m, by_subject=False)
    assert len(m.rows) == 11 and [d.reason for d in m.dropped] == ["missing_file"]
    by = {r.path: r for r in m.rows}
    assert by["basic/Image/aligned/train_00001_aligned.jpg"].label == "happy"   # code 4
    assert by["basic/Image/original/train_00003.jpg"].label == "happy"
    assert by["basic/Image/aligned/test_0001_aligned.jpg"].split == "test"
    assert {by[p].label for p in by if "test_" in p} == {"sad"}                # code 5
    assert {r.split for r in m.rows if "train_" in r.path} <= {"train", "val"}
    assert ds.ImageReader(root)("basic/Image/original/train_00003.jpg").shape == (48, 48, 3)


def test_affectnet(src, tmp_path):
    root = samples.make_affectnet(src, tmp_path)
    m = ds.load_affectnet(root)
    assert_split_rules(m, by_subject=False)
    assert sorted(d.reason for d in m.dropped) == ["no_expression:10", "no_expression:9"]
    by = {r.path: r for r in m.rows}
    assert len(by) == 8
    contempt = [r for r in m.rows if r.contempt]
    assert len(contempt) == 1 and contempt[0].label == ""
    assert {r.split for r in m.rows if r.split != "val"} == {"train", "test"}
    assert all(r.path.startswith("Manually_Annotated_Images/") for r in m.rows)
    assert sorted(r.label for r in m.rows if r.split == "test") == ["neutral", "sad"]


def test_generic_layout(src, tmp_path):
    root = samples.make_generic(src, tmp_path)
    m = ds.load_generic(root, name="mine")
    assert_split_rules(m, by_subject=False)
    assert {r.label for r in m.rows} == {"happy", "anger", "sad"}
    assert len(m.rows) == 11 and m.drop_counts() == {"unknown_label:other": 1}
    assert all(r.dataset == "mine" for r in m.rows)


def test_manifests_are_deterministic(src, tmp_path):
    """Two loads of the same files (in different folders) write identical manifests."""
    texts = []
    for run in ("a", "b"):
        root = samples.make_muxspace(src, tmp_path / run)
        m = ds.load_muxspace(root)
        mf.write_manifest(tmp_path / run / "muxspace.csv", m.rows)
        mf.write_drops(tmp_path / run / "muxspace_dropped.csv", m.dropped)
        texts.append(((tmp_path / run / "muxspace.csv").read_bytes(),
                      (tmp_path / run / "muxspace_dropped.csv").read_bytes()))
    assert texts[0] == texts[1]
    assert mf.write_manifest(tmp_path / "a" / "muxspace.csv", mf.read_manifest(tmp_path / "a" / "muxspace.csv")) is False
    with open(tmp_path / "a" / "muxspace.csv", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == mf.MANIFEST_FIELDS


def test_split_groups_fractions_and_seed():
    sizes = {f"S{i:03d}": 1 + i % 5 for i in range(200)}
    a = mf.split_groups(sizes)
    assert a == mf.split_groups(dict(reversed(list(sizes.items()))))  # order-free
    assert a != mf.split_groups(sizes, seed=1)
    total = sum(sizes.values())
    share = {s: sum(n for g, n in sizes.items() if a[g] == s) / total for s in mf.SPLITS}
    assert abs(share["train"] - 0.70) < 0.03 and abs(share["val"] - 0.15) < 0.03


def test_committed_manifests_follow_the_rules():
    """The committed manifests (if built) obey the same rules as the samples."""
    folder = MANIFEST_DIR
    found = sorted(p for p in folder.glob("*.csv") if not p.name.endswith("_dropped.csv"))
    if not found:
        pytest.skip("no committed manifests yet")
    for path in found:
        rows = mf.read_manifest(path)
        by_subject = path.stem in ("ckplus", "muxspace")
        assert_split_rules(mf.Manifest(rows), by_subject=by_subject)


def test_fer_csv_rows_are_read_in_one_pass(src, tmp_path, monkeypatch):
    """`ImageReader.read` opens a FER2013 CSV once for all the rows of a block
    (the cache builder's unit), and the rows come back in the asked order."""
    import builtins
    path = samples.make_fer_csv(src, tmp_path)
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)
    monkeypatch.setattr(builtins, "open", counting_open)
    want = [f"fer2013.csv#{i}" for i in (4, 0, 7, 4)]
    images = ds.ImageReader(path.parent).read(want)
    monkeypatch.setattr(builtins, "open", real_open)
    assert [p for p in opened if p.endswith(".csv")] == [str(path)]
    singles = [ds.ImageReader(path.parent)(p) for p in want]
    assert all(np.array_equal(a, b) for a, b in zip(images, singles))
    assert images[0].shape == (48, 48, 3) and np.array_equal(images[0], images[3])
    with pytest.raises(IndexError):
        ds.ImageReader(path.parent).read(["fer2013.csv#999"])
