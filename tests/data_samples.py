"""Small real-image copies of the public dataset layouts, built in a tmp folder.

Every image is a real file from ../shared/data (copied, or re-encoded where a
layout needs another format); duplicates and conflicts are planted on purpose so
the split rules have something to catch.

Below them, real face photos for the tests that need a face, not the data sets:
crops of the astronaut portrait scikit-image ships (public domain).
"""
from __future__ import annotations

import csv
import io
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


# --- images the repository may ship: the astronaut ----------------------------------
# Tests that need real face photos, not the data sets, use skimage.data.astronaut()
# (Eileen Collins, a public-domain NASA portrait, 512 x 512 RGB, shipped with
# scikit-image): different crops, scales, mirror images and greyscale copies of it.
# They run on a fresh clone, without the research data.

ASTRONAUT_FACE = (224, 119)   # the centre of MTCNN's box on the portrait (x 180-268, y 62-176)


def astronaut() -> np.ndarray:
    from skimage import data
    return data.astronaut()


def astronaut_mouth_hidden(k: int) -> np.ndarray:
    """The portrait with the smile hidden or undone, the k-th of four ways: a grey
    patch over the mouth (two heights), the mouth blurred, the mouth upside down. What
    the model makes of those faces is unsure, unlike the astronaut's broad smile."""
    image = astronaut()
    mouth = (slice(125, 165), slice(195, 255)) if k % 4 != 1 else (slice(130, 170), slice(195, 255))
    if k % 4 in (0, 1):
        image[mouth] = 128
    elif k % 4 == 2:
        image[mouth] = np.asarray(Image.fromarray(image[mouth]).resize((6, 4)).resize((60, 40), Image.BILINEAR))
    else:
        image[128:160, 195:255] = image[128:160, 195:255][::-1].copy()
    return image


def _astronaut_crops(n: int, size: int, sides: tuple[int, int], jitter: int, seed: int,
                     mouth_hidden: bool = False) -> list[np.ndarray]:
    """n crops around the astronaut's face, each of another side (pixels of the
    portrait) and centre, resized to size x size; every 2nd mirrored, every 3rd grey
    (a 2-D array, as a greyscale photo file holds it). mouth_hidden: crops of
    `astronaut_mouth_hidden` portraits."""
    pad = 96
    images = [astronaut_mouth_hidden(k) for k in range(4)] if mouth_hidden else [astronaut()]
    images = [np.pad(im, ((pad, pad), (pad, pad), (0, 0)), mode="edge") for im in images]  # room for any crop
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = images[i % len(images)]
        side = int(rng.integers(*sides))
        cx, cy = np.array(ASTRONAUT_FACE) + pad + rng.integers(-jitter, jitter + 1, 2)
        crop = image[cy - side // 2:cy - side // 2 + side, cx - side // 2:cx - side // 2 + side]
        photo = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.LANCZOS)
        if i % 2:
            photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
        if i % 3 == 2:
            photo = photo.convert("L")
        out.append(np.asarray(photo))
    return out


def astronaut_photos(n: int, size: int = 224) -> list[np.ndarray]:
    """n different size x size photos of the astronaut's face, framed as muxspace's
    (LFW's) photos are: the face about a third of the side, not quite centred."""
    return _astronaut_crops(n, size, sides=(190, 300), jitter=16, seed=n)


def astronaut_jpegs(n: int, size: int = 224) -> list[bytes]:
    """`astronaut_photos` as JPEG files' bytes (greyscale ones as greyscale JPEGs)."""
    out = []
    for photo in astronaut_photos(n, size):
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def astronaut_face_crops(n: int, size: int = 48, mouth_hidden: bool = False) -> list[np.ndarray]:
    """n tight greyscale crops of the astronaut's face, size x size, framed as
    FER2013's and CK+48's crops are (the face fills the crop); mouth_hidden: of
    `astronaut_mouth_hidden` portraits."""
    return [np.asarray(Image.fromarray(c).convert("L"))
            for c in _astronaut_crops(n, size, sides=(110, 140), jitter=6, seed=n + 1, mouth_hidden=mouth_hidden)]


def make_astronaut_layout(dst: Path, per_folder: int = 4) -> Path:
    """A data folder with the layouts smoke_dataset reads (ckplus48/<emo>/*.png,
    fer2013/train/<emo>/*.jpg), every image an astronaut face crop, every other one
    with the smile hidden. Their labels are the folders' names, not the astronaut's
    expression: for the training loop's smoke tests, never for accuracy."""
    folders = [("ckplus48", emo, "png") for emo in ("anger", "contempt", "disgust", "fear", "happy", "sadness",
                                                     "surprise")]
    folders += [("fer2013/train", emo, "jpg") for emo in ("angry", "disgust", "fear", "happy", "neutral", "sad",
                                                           "surprise")]
    half = len(folders) * per_folder // 2 + 1
    crops = iter([c for pair in zip(astronaut_face_crops(half), astronaut_face_crops(half, mouth_hidden=True))
                  for c in pair])
    for top, emo, ext in folders:
        (dst / top / emo).mkdir(parents=True, exist_ok=True)
        for k in range(per_folder):
            Image.fromarray(next(crops)).save(dst / top / emo / f"astronaut_{k}.{ext}")
    return dst
