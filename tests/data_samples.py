"""Small real-image copies of the public dataset layouts, built in a tmp folder.

Every image is a real file from ../shared/data (copied, or re-encoded where a
layout needs another format); duplicates and conflicts are planted on purpose so
the split rules have something to catch.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def data_dir(shared_dir: Path) -> Path:
    d = shared_dir / "data"
    if not (d / "fer2013").is_dir():
        pytest.skip(f"shared data not found under {d} (set IPDFER_SHARED)")
    return d


def _first(folder: Path, prefix: str, n: int) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(prefix))[:n]


def make_fer_folders(src: Path, dst: Path) -> dict:
    """fer2013/{train,test}/<emo>/ with 2 Training + 1 PublicTest + 1 PrivateTest per
    emotion for 3 emotions, plus: a test copy of a train image (must be dropped),
    a same-label train duplicate (one kept), a conflicting-label pair (both dropped)."""
    root = dst / "fer2013"
    emos = ("angry", "happy", "surprise")
    for emo in emos:
        for top, prefix, n in (("train", "Training", 2), ("test", "PublicTest", 1), ("test", "PrivateTest", 1)):
            (root / top / emo).mkdir(parents=True, exist_ok=True)
            for f in _first(src / "fer2013" / top / emo, prefix, n):
                shutil.copy(f, root / top / emo / f.name)
    train_happy = sorted((root / "train" / "happy").iterdir())
    shutil.copy(train_happy[0], root / "test" / "happy" / "PrivateTest_99000001.jpg")  # leak into test
    shutil.copy(train_happy[1], root / "train" / "happy" / "Training_99000002.jpg")    # same-label dup
    conflict = sorted((root / "train" / "angry").iterdir())[0]
    shutil.copy(conflict, root / "train" / "surprise" / "Training_99000003.jpg")       # conflicting label
    return {"root": root, "leak": "test/happy/PrivateTest_99000001.jpg",
            "leak_source": train_happy[0].relative_to(root).as_posix(),
            "dup": "train/happy/Training_99000002.jpg", "dup_source": train_happy[1].relative_to(root).as_posix(),
            "conflict": [conflict.relative_to(root).as_posix(), "train/surprise/Training_99000003.jpg"]}


def make_fer_csv(src: Path, dst: Path) -> Path:
    """fer2013.csv (emotion, pixels, Usage) from real FER JPEGs, one row duplicated
    across Training/PrivateTest and one duplicated with another label."""
    files = [(0, "Training", p) for p in _first(src / "fer2013/train/angry", "Training", 3)]
    files += [(3, "Training", p) for p in _first(src / "fer2013/train/happy", "Training", 3)]
    files += [(3, "PublicTest", p) for p in _first(src / "fer2013/test/happy", "PublicTest", 2)]
    files += [(6, "PrivateTest", p) for p in _first(src / "fer2013/test/neutral", "PrivateTest", 2)]
    files += [(0, "PrivateTest", files[0][2]),   # row 10: copy of train row 0 -> dropped
              (5, "Training", files[3][2]),      # row 11: row 3 with another label -> both dropped
              ]
    path = dst / "fercsv" / "fer2013.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["emotion", "pixels", "Usage"])
        for code, usage, f in files:
            pix = np.asarray(Image.open(f).convert("L")).ravel()
            w.writerow([code, " ".join(map(str, pix)), usage])
    return path


def make_ckplus(src: Path, dst: Path, subjects: int = 8) -> Path:
    """ckplus48/<emo>/ with every file of `subjects` subjects, two of them with contempt."""
    root = dst / "ckplus48"
    all_files = sorted((src / "ckplus48").glob("*/*.png"))
    with_contempt = sorted({f.name[:4] for f in all_files if f.parent.name == "contempt"})[:2]
    others = sorted({f.name[:4] for f in all_files} - set(with_contempt))
    keep = with_contempt + others[:subjects - 2]
    for f in all_files:
        if f.name[:4] in keep:
            (root / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / f.parent.name / f.name)
    return root


MUX_PICK = ["George_W_Bush_0001", "George_W_Bush_0002", "George_W_Bush_0003", "Colin_Powell_0001",
            "Colin_Powell_0002", "Tony_Blair_0001", "Serena_Williams_0001", "Aaron_Peirsol_0001",
            "Aaron_Peirsol_0002", "HrithikRoshan_12", "HrithikRoshan_13", "KatrinaKaif_1", "Dileep_10",
            "facial-expressions_2868588k", "facial-expressions_2868585k", "Avinash_30"]


def make_muxspace(src: Path, dst: Path) -> Path:
    """muxspace/images + legend.csv with the real labels of MUX_PICK; some legend
    names carry .png (files are .jpg), one row repeated, Avinash_30 conflicting."""
    root = dst / "muxspace"
    (root / "images").mkdir(parents=True)
    legend = {}
    with open(src / "muxspace" / "legend.csv", newline="") as fh:
        for rec in csv.DictReader(fh):
            legend.setdefault(Path(rec["image"]).stem, []).append(rec)
    rows = []
    for i, stem in enumerate(MUX_PICK):
        shutil.copy(src / "muxspace/images" / f"{stem}.jpg", root / "images" / f"{stem}.jpg")
        for rec in legend[stem]:
            name = f"{stem}.png" if i % 3 == 0 else rec["image"]
            rows.append([rec["user.id"], name, rec["emotion"]])
    rows.append(rows[1])  # a repeated legend row, same label
    with open(root / "legend.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user.id", "image", "emotion"])
        w.writerows(rows)
    return root


def make_rafdb(src: Path, dst: Path) -> Path:
    """RAF-DB/basic with 8 train + 3 test aligned images (real FER faces, re-saved)."""
    base = dst / "RAF-DB" / "basic"
    (base / "EmoLabel").mkdir(parents=True)
    (base / "Image" / "aligned").mkdir(parents=True)
    (base / "Image" / "original").mkdir(parents=True)
    faces = _first(src / "fer2013/train/happy", "Training", 6) + _first(src / "fer2013/train/sad", "Training", 5)
    lines = []
    for i, f in enumerate(faces):
        name = f"train_{i + 1:05d}.jpg" if i < 8 else f"test_{i - 7:04d}.jpg"
        code = 4 if "happy" in str(f) else 5  # 4 = happiness, 5 = sadness
        stem = Path(name).stem
        if i == 2:  # only the original exists for this one
            shutil.copy(f, base / "Image" / "original" / name)
        else:
            shutil.copy(f, base / "Image" / "aligned" / f"{stem}_aligned.jpg")
        lines.append(f"{name} {code}")
    lines.append("train_09999.jpg 7")  # listed, not on disk
    (base / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return dst / "RAF-DB"


def make_affectnet(src: Path, dst: Path) -> Path:
    """AffectNet layout: training.csv / validation.csv + Manually_Annotated_Images/<n>/<file>."""
    root = dst / "affectnet"
    faces = sorted((src / "muxspace/images").glob("Colin_Powell_000*.jpg"))[:6] + \
        sorted((src / "muxspace/images").glob("Tony_Blair_000*.jpg"))[:4]
    header = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
              "facial_landmarks", "expression", "valence", "arousal"]
    codes = [0, 1, 7, 9, 3, 6, 1, 0, 10, 2]  # 7 = contempt, 9 / 10 dropped
    recs = {"training.csv": [], "validation.csv": []}
    for i, (f, code) in enumerate(zip(faces, codes)):
        sub = f"{i % 3 + 1}/{f.name}"
        (root / "Manually_Annotated_Images" / sub).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / "Manually_Annotated_Images" / sub)
        recs["training.csv" if i < 7 else "validation.csv"].append([sub, 0, 0, 224, 224, "", code, 0, 0])
    for name, rows in recs.items():
        with open(root / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    return root


def make_generic(src: Path, dst: Path) -> Path:
    """<root>/<label>/*.{jpg,png}: CK+ PNGs and FER JPEGs, an unknown label folder."""
    root = dst / "mine"
    for label, files in (("Happy", sorted((src / "ckplus48/happy").iterdir())[:4]),
                         ("angry", _first(src / "fer2013/train/angry", "Training", 4)),
                         ("Sadness", sorted((src / "ckplus48/sadness").iterdir())[:3]),
                         ("other", _first(src / "fer2013/train/fear", "Training", 1))):
        (root / label).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / label / f.name)
    return root
