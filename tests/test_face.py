"""model/images.py and model/faces/ on real images: decoding, detection, alignment, dlib chips, pipeline."""
from __future__ import annotations

import io
import itertools
import json
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from skimage import data as skdata

from model.faces import (
    CANONICAL_LANDMARKS, DLIB_CHIP_LANDMARKS, Detection, FaceDetector, FacePipeline, align_face,
    center_landmarks, dlib_chip, dlib_chip_transform, similarity_transform, to_model_input, to_uint8,
)
from model.images import (
    ImageDecodeError, ImageError, ImageTooLargeError, UnsupportedImageType, _open, _read_bytes, load_image,
)
from tests import data_samples as samples

ASTRONAUT_BOX = np.array([181, 62, 268, 172])  # MTCNN's face box, measured once


# -- fixtures and helpers ---------------------------------------------------------

def image_format(data: bytes) -> str | None:
    """Pillow's format name from the header, or None (what the decoder saw)."""
    try:
        with _open(_read_bytes(data, 1 << 25)) as im:
            return im.format
    except ImageError:
        return None


def center_crop_face(image_rgb: np.ndarray, size: int = 64, margin: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """The template over the image's central square (grown by -margin, moved by dy), aligned."""
    return align_face(image_rgb, center_landmarks(np.shape(image_rgb), margin, dy), size)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()


@pytest.fixture(scope="module")
def astronaut_face(detector, astronaut) -> Detection:
    faces = detector.detect([astronaut])[0]
    assert len(faces) == 1
    return faces[0]


@pytest.fixture(scope="module")
def muxspace(shared_dir: Path) -> Path:
    folder = shared_dir / "data" / "muxspace" / "images"
    if not folder.is_dir():
        pytest.skip(f"no muxspace images at {folder}")
    return folder


@pytest.fixture(scope="module")
def testvectors(shared_dir: Path) -> Path:
    folder = shared_dir / "testvectors" / "dlib_resnet"
    if not (folder / "descriptors.json").is_file():
        pytest.skip(f"no dlib test vectors at {folder}")
    return folder


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose IHDR declares width x height (a decompression bomb's header)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def eyes_vertical(d: Detection) -> bool:
    dx, dy = np.abs(d.landmarks[1] - d.landmarks[0])
    return dy > dx


# -- 1. decoding ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_roundtrip(astronaut, fmt):
    out = load_image(encode(astronaut, fmt))
    assert out.dtype == np.uint8 and out.shape == astronaut.shape
    assert np.array_equal(out, astronaut)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats(astronaut, fmt):
    out = load_image(encode(astronaut, fmt, quality=95))
    assert out.dtype == np.uint8 and out.shape == astronaut.shape
    assert np.abs(out.astype(int) - astronaut).mean() < 4


def test_path_and_str_input(tmp_path, astronaut):
    path = tmp_path / "a.png"
    path.write_bytes(encode(astronaut, "PNG"))
    assert np.array_equal(load_image(path), astronaut)
    assert np.array_equal(load_image(str(path)), astronaut)


def test_grayscale_png_to_rgb():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = load_image(encode(grey, "PNG"))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[:, :, c], grey) for c in range(3))


def test_alpha_composited_on_white():
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], np.uint8)
    out = load_image(encode(rgba, "PNG"))
    assert out.shape == (1, 3, 3)
    assert out[0, 0].tolist() == [255, 255, 255]     # fully transparent -> white
    assert out[0, 1].tolist() == [0, 0, 255]         # opaque kept
    assert np.all(np.abs(out[0, 2].astype(int) - 127) <= 1)  # half black on white
    la = np.array([[[0, 0], [200, 255]]], np.uint8)
    assert load_image(encode(la, "PNG"))[0].tolist() == [[255] * 3, [200] * 3]


def test_16bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535, 1000]], np.uint16)
    im = Image.fromarray(values)
    assert im.mode.startswith("I;16")
    out = load_image(encode(values, "PNG"))
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 100, 255, 4]


def test_palette_png():
    im = Image.new("P", (4, 4))
    im.putpalette([10, 20, 30] * 256)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    assert load_image(buf.getvalue())[0, 0].tolist() == [10, 20, 30]


def test_exif_orientation_is_applied(detector, astronaut):
    # Orientation 6: the stored pixels must be turned 90 deg clockwise for display.
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(astronaut)))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    out = load_image(buf.getvalue())
    assert out.shape == astronaut.shape
    assert np.abs(out.astype(int) - astronaut).mean() < 4
    faces = detector.detect([out])[0]
    assert len(faces) == 1 and not eyes_vertical(faces[0])


def test_truncated_files_are_rejected(astronaut):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    for fmt in ("JPEG", "PNG"):
        blob = encode(astronaut, fmt)
        with pytest.raises(ImageDecodeError):
            load_image(blob[: len(blob) // 2])


@pytest.mark.parametrize("blob", [b"", np.random.default_rng(0).bytes(5000), b"\x89PNG\r\n\x1a\n"])
def test_garbage_is_a_decode_error(blob):
    with pytest.raises(ImageDecodeError):
        load_image(blob)


@pytest.mark.parametrize("size", [(20000, 20000), (8000, 6000)])
def test_pixel_bomb_rejected_from_the_header(size):
    blob = png_header_only(*size)
    assert len(blob) < 100
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="too large|limit"):
        load_image(blob)
    assert time.perf_counter() - start < 0.5


def test_byte_limit():
    with pytest.raises(ImageTooLargeError):
        load_image(encode(np.zeros((64, 64, 3), np.uint8), "BMP"), max_bytes=1000)


def test_gif_is_unsupported():
    gif = encode(np.zeros((8, 8, 3), np.uint8), "GIF")
    assert image_format(gif) == "GIF"
    with pytest.raises(UnsupportedImageType, match="GIF"):
        load_image(gif)


def test_image_format_and_error_types():
    assert image_format(encode(np.zeros((4, 4, 3), np.uint8), "PNG")) == "PNG"
    assert image_format(b"not an image") is None
    for cls in (ImageDecodeError, ImageTooLargeError, UnsupportedImageType):
        assert issubclass(cls, ImageError) and issubclass(cls, ValueError)


# -- 2. detection -------------------------------------------------------------------

def test_astronaut_one_face(astronaut_face):
    d = astronaut_face
    assert np.all(np.abs(np.array(d.box) - ASTRONAUT_BOX) < 8), d.box
    x1, y1, x2, y2 = d.box
    assert np.all((d.landmarks >= [x1, y1]) & (d.landmarks <= [x2, y2]))
    assert d.landmarks[0, 0] < d.landmarks[1, 0]  # "left eye" = image left
    assert d.score >= 0.9
    assert json.loads(json.dumps(d.to_dict()))["landmarks"][2] == pytest.approx(
        d.landmarks[2].tolist())


@pytest.mark.parametrize("shape", [(1, 1, 3), (10, 10, 3), (5, 300, 3), (240, 320, 3)])
def test_no_face_is_an_empty_list(detector, shape):
    assert detector.detect([np.full(shape, 128, np.uint8)]) == [[]]


def test_two_people_side_by_side(detector, muxspace):
    left = load_image(muxspace / "George_W_Bush_0001.jpg")
    right = load_image(muxspace / "Serena_Williams_0001.jpg")
    both = np.hstack([left, right])
    half = left.shape[1]
    faces = sorted(detector.detect([both])[0], key=lambda d: d.box[0])
    assert len(faces) == 2
    centres = [(d.box[0] + d.box[2]) / 2 for d in faces]
    assert centres[0] < half < centres[1]
    assert faces[0].box[2] < half + 10 and faces[1].box[0] > half - 10


def test_rotated_face_gives_consistent_landmarks(detector, astronaut, astronaut_face):
    # 90 deg: MTCNN (trained on upright faces) finds nothing here; whatever it finds
    # must have its eyes stacked vertically.
    faces = detector.detect([np.ascontiguousarray(np.rot90(astronaut))])[0]
    assert isinstance(faces, list)
    assert all(eyes_vertical(d) for d in faces)
    # 30 deg: found, and the landmarks turn with the face (measured 1.8 px).
    m = cv2.getRotationMatrix2D((255.5, 255.5), 30, 1.0)
    turned = cv2.warpAffine(astronaut, m, (512, 512), borderMode=cv2.BORDER_REPLICATE)
    [face] = detector.detect([turned])[0]
    expected = astronaut_face.landmarks @ m[:, :2].T + m[:, 2]
    assert np.linalg.norm(face.landmarks - expected, axis=1).mean() < 4


def test_huge_image_is_downscaled_and_mapped_back(detector, astronaut, astronaut_face):
    canvas = np.full((8000, 8000, 3), 90, np.uint8)
    canvas[4000:6048, 3000:5048] = cv2.resize(astronaut, (2048, 2048),
                                              interpolation=cv2.INTER_LINEAR)
    start = time.perf_counter()
    faces = detector.detect([canvas])[0]
    elapsed = time.perf_counter() - start
    assert len(faces) == 1
    # x4 upscale maps x -> 4x + 1.5 (pixel centres), then the paste offset.
    expected = np.array(astronaut_face.box) * 4 + 1.5 + [3000, 4000, 3000, 4000]
    width = expected[2] - expected[0]
    assert np.all(np.abs(np.array(faces[0].box) - expected) < 0.05 * width), faces[0].box
    assert elapsed < 30  # detection ran at <= 1280 px, not at 8000


def test_small_crop_is_upscaled(detector, shared_dir):
    path = shared_dir / "data" / "fer2013" / "test" / "happy" / "PrivateTest_10613684.jpg"
    if not path.is_file():
        pytest.skip(f"missing {path}")
    image = load_image(path)
    assert image.shape == (48, 48, 3)
    faces = detector.detect([image])[0]
    assert len(faces) >= 1
    assert np.all((faces[0].landmarks > 0) & (faces[0].landmarks < 48))


def test_batch_equals_one_by_one(detector, muxspace):
    mux = load_image(muxspace / "George_W_Bush_0002.jpg")
    small = cv2.resize(mux, (80, 80), interpolation=cv2.INTER_AREA)  # another size group
    grey = np.full((224, 224, 3), 128, np.uint8)
    images = [mux, small, grey, np.ascontiguousarray(mux[:, ::-1])]
    batched = detector.detect(images)
    assert len(batched) == len(images) and batched[2] == []
    assert all(len(batched[i]) == 1 for i in (0, 1, 3))
    for image, result in zip(images, batched):
        single = detector.detect([image])[0]
        assert len(result) == len(single)
        for a, b in zip(result, single):
            assert np.allclose(a.box, b.box, atol=1e-3)
            assert np.allclose(a.landmarks, b.landmarks, atol=1e-3)


# -- 3. alignment -------------------------------------------------------------------

def test_similarity_transform_recovers_a_known_transform():
    angle, scale, t = np.radians(25), 3.7, np.array([40.0, -12.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = CANONICAL_LANDMARKS * 100
    dst = src @ (scale * rot).T + t
    m = similarity_transform(src, dst)
    assert np.allclose(m, np.hstack([scale * rot, t[:, None]]))
    mirrored = dst * [-1, 1]  # no reflection, even when it would fit better
    assert np.linalg.det(similarity_transform(src, mirrored)[:, :2]) > 0


def test_align_face_puts_landmarks_on_the_template():
    # Five dots at a rotated, scaled, shifted copy of the template: after alignment
    # each dot's centroid must sit on the template point (< 1 px).
    size = 64
    m_true = cv2.getRotationMatrix2D((0, 0), 17, 3.1) + np.array([[0, 0, 150.0], [0, 0, 90.0]])
    lm = (CANONICAL_LANDMARKS * size - 0.5) @ m_true[:, :2].T + m_true[:, 2]
    image = np.zeros((400, 400, 3), np.uint8)
    for x, y in lm:
        # 4 fractional bits: sub-pixel centres, radius 3 px
        cv2.circle(image, (round(x * 16), round(y * 16)), 3 * 16, (255, 255, 255), -1,
                   cv2.LINE_AA, 4)
    aligned = align_face(image, lm, size)
    assert aligned.shape == (size, size) and aligned.dtype == np.uint8
    template = CANONICAL_LANDMARKS * size - 0.5
    ys, xs = np.mgrid[:size, :size]
    for tx, ty in template:
        near = ((xs - tx) ** 2 + (ys - ty) ** 2 < 4 ** 2) * aligned.astype(float)
        cx, cy = (near * xs).sum() / near.sum(), (near * ys).sum() / near.sum()
        assert np.hypot(cx - tx, cy - ty) < 1.0


def test_align_face_on_a_real_face(astronaut, astronaut_face):
    size = 64
    lm = astronaut_face.landmarks
    m = similarity_transform(lm, CANONICAL_LANDMARKS * size - 0.5)
    warped = lm @ m[:, :2].T + m[:, 2]
    err = np.linalg.norm(warped - (CANONICAL_LANDMARKS * size - 0.5), axis=1)
    assert err[:2].max() < 2.0  # eyes; a real (smiling) face is no exact copy of the template
    aligned = align_face(astronaut, lm, size)
    assert aligned.shape == (size, size) and aligned.dtype == np.uint8


def test_align_face_does_not_alias():
    # 1-px black/white stripes shrunk 16x (rotated) must average to grey; plain
    # bilinear sampling would pick single stripes and return black/white noise.
    stripes = np.zeros((1024, 1024, 3), np.uint8)
    stripes[:, ::2] = 255
    rot = cv2.getRotationMatrix2D((0, 0), 20, 1.0)[:, :2]
    lm = (CANONICAL_LANDMARKS * 1024 - 512) @ rot.T + 512
    out = align_face(stripes, lm, 64)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 3


def test_center_crop_face():
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), (0, 0), 3)
    plain = center_crop_face(image, 64, margin=0.0, dy=0.0)
    resized = cv2.cvtColor(cv2.resize(image, (64, 64), interpolation=cv2.INTER_LINEAR),
                           cv2.COLOR_RGB2GRAY)
    assert np.abs(plain.astype(int) - resized).max() <= 1
    fallback = center_crop_face(image, 64, margin=-0.075, dy=-0.06)  # grown and raised
    assert fallback.shape == (64, 64) and fallback.dtype == np.uint8
    wide = center_landmarks((48, 96, 3))  # the central square of a wide image
    assert np.allclose(wide, center_landmarks((48, 48, 3)) + [24, 0])


# -- dlib chips ----------------------------------------------------------------------

# dlib's 5-point chip template (interpolation.h, get_face_chip_details): eye corners, nose base.
DLIB5 = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                  [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                  [0.4901123135679, 0.6277975316475]])


def _vector_faces(testvectors: Path, muxspace: Path):
    for face in json.loads((testvectors / "descriptors.json").read_text())["faces"]:
        chip = np.array(Image.open(testvectors / face["chip"]).convert("RGB"))
        if face["name"] == "astronaut":
            source, k = skdata.astronaut(), 1.0
        else:  # dlib saw the 350x350 originals; the shared copies are 224x224
            source, k = load_image(muxspace / f"{face['name']}.jpg"), 224 / 350
        yield face["name"], chip, source, np.array(face["landmarks5"], float) * k


def test_dlib_chip_matches_dlibs_geometry(detector, testvectors, muxspace):
    """Cut from the source image with MTCNN points, our chip lands where dlib's
    (from its own landmarks) did: mean misplacement over the chip, in chip pixels."""
    grid = np.stack(np.meshgrid(np.arange(0, 150, 5.0), np.arange(0, 150, 5.0)), -1).reshape(-1, 2)
    faces = list(_vector_faces(testvectors, muxspace))
    detections = detector.detect([source for _, _, source, _ in faces])
    errors = []
    for (name, chip, source, dlib5), found in zip(faces, detections):
        truth = similarity_transform(dlib5, (0.25 + DLIB5) / 1.5 * 150 - 0.5)  # image -> chip
        assert np.abs(cv2.warpAffine(source, truth, (150, 150)).astype(int) - chip).mean() < 6, name
        ours = dlib_chip_transform(found[0].landmarks)
        inv = cv2.invertAffineTransform(truth)
        moved = (grid @ inv[:, :2].T + inv[:, 2]) @ ours[:, :2].T + ours[:, 2]
        errors.append(np.linalg.norm(moved - grid, axis=1).mean())
    # measured: mean 3.2 px, worst 7.6 px (a half-profile face); 1 px ~ 1% of the face
    assert np.mean(errors) < 4.5 and max(errors) < 10, errors


def test_dlib_chip_of_a_chip_is_nearly_itself(detector, testvectors):
    """MTCNN on dlib's own chips finds points near DLIB_CHIP_LANDMARKS, and re-cutting
    the chip from them nearly reproduces it. Scale: shifting these chips by 1/2/3 px
    gives a mean abs difference of 3.8/7.3/10.4 grey levels; two different faces ~56."""
    template = (0.25 + DLIB_CHIP_LANDMARKS) / 1.5 * 150 - 0.5
    paths = sorted(testvectors.glob("*_chip150.png"))
    chips = [np.array(Image.open(p).convert("RGB")) for p in paths]
    assert len(chips) == 10
    diffs, errors = [], []
    for chip, faces in zip(chips, detector.detect(chips)):
        assert faces
        lm = faces[0].landmarks
        errors.append(np.linalg.norm(lm[:3] - template[:3], axis=1).mean())
        recut = dlib_chip(chip, lm)
        assert recut.shape == (150, 150, 3) and recut.dtype == np.uint8
        diffs.append(np.abs(recut.astype(int) - chip).mean())
    # measured: eyes+nose error median ~3 px; re-cut difference median 11, worst 56
    # (a half-profile chip where MTCNN misplaces the eyes)
    assert np.median(errors) < 5, errors
    assert np.median(diffs) < 15, diffs


# -- model tensors --------------------------------------------------------------------

def test_model_input_roundtrip():
    batch = np.random.default_rng(1).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    x = to_model_input(batch)
    assert x.shape == (3, 1, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert to_model_input(list(batch)).equal(x)
    assert np.array_equal(to_uint8(x), batch)
    with pytest.raises(ValueError):
        to_model_input(batch.astype(np.float32))


# -- 4. pipeline ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(detector) -> FacePipeline:
    return FacePipeline(detector=detector, size=64)


def test_pipeline_detects_and_aligns(pipeline, astronaut):
    first, second = pipeline.process([astronaut]), pipeline.process([astronaut])
    assert len(first) == 1 and len(first[0]) == 1
    face = first[0][0]
    assert face.detection is not None and not face.fallback
    assert face.aligned.shape == (64, 64) and face.aligned.dtype == np.uint8
    assert face.chip.shape == (150, 150) and face.chip.dtype == np.uint8
    again = second[0][0]  # deterministic
    assert np.array_equal(face.aligned, again.aligned) and np.array_equal(face.chip, again.chip)


def test_pipeline_fallback_and_no_face(detector):
    grey = np.full((48, 48, 3), 128, np.uint8)
    assert FacePipeline(detector=detector).process([grey]) == [[]]
    [[face]] = FacePipeline(detector=detector, fallback_to_center=True).process([grey])
    assert face.fallback and face.detection is None
    assert face.aligned.shape == (64, 64) and face.chip.shape == (150, 150)


def test_pipeline_already_aligned_input(pipeline, astronaut, astronaut_face):
    """A crop already in the canonical geometry is located again on the crop and
    comes out (nearly) as it went in."""
    aligned112 = align_face(astronaut, astronaut_face.landmarks, 112)
    [[face]] = pipeline.process([aligned112], aligned=True)
    assert face.detection is None and not face.fallback
    expected = cv2.resize(aligned112, (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(face.aligned.astype(int) - expected).mean() < 6
    # its chip is cut at the landmarks found on the crop: a face, not the border
    chip = face.chip
    assert chip[40:110, 40:110].std() > 20 and (chip[40:110, 40:110] > 0).all()


def test_aligned_crops_are_prepared_exactly_like_training_crops(pipeline, shared_dir):
    """aligned=true must give the model what `ipdfer prepare` gave it in training:
    the same landmarks (prepare.FaceWorker.detect) and the same aligned face, bit
    for bit, on real FER2013 test crops; a crop without a face takes the same
    central-square fallback."""
    from model.data.features import FaceWorker
    from model.faces.preprocess import SOURCE_FALLBACK, CropLocator
    files = sorted((samples.data_dir(shared_dir) / "fer2013/test/fear").iterdir())[:12]
    crops = [load_image(f) for f in files] + [np.full((48, 48, 3), 128, np.uint8)]
    worker = FaceWorker.__new__(FaceWorker)  # detection only: skip the identity network
    worker.locator = CropLocator(small=FaceDetector(min_face_size=40), large=FaceDetector())
    trained = worker.detect(crops)
    served = [fs[0] for fs in pipeline.process(crops, aligned=True)]
    for crop, t, s in zip(crops, trained, served):
        assert np.array_equal(s.aligned, align_face(crop, t["landmarks"], 64))
        assert s.fallback == (t["source"] == SOURCE_FALLBACK)
    assert served[-1].fallback and sum(not s.fallback for s in served[:-1]) >= 8


def test_pipeline_max_faces(pipeline, muxspace):
    both = np.hstack([load_image(muxspace / "George_W_Bush_0001.jpg"),
                      load_image(muxspace / "Serena_Williams_0001.jpg")])
    [faces] = pipeline.process([both], max_faces=1)
    assert len(faces) == 1


def test_one_identity_path_for_preparation_and_serving(pipeline, astronaut):
    """The descriptor G is conditioned on is computed the same way by `ipdfer prepare`
    (training) and by the service: the grey identity chip of the same landmarks.
    On a colour photo that differs from dlib's usual RGB chip, so the choice matters."""
    from model.faces.identity import load_identity_encoder
    from model.data.features import FaceWorker
    from model.faces.preprocess import identity_input
    trained = FaceWorker().features([astronaut])["identity"][0]
    [[face]] = pipeline.process([astronaut])
    encoder = load_identity_encoder()
    with torch.inference_mode():
        served = encoder(identity_input([face.chip]))[0].numpy()
        rgb = dlib_chip(astronaut, face.detection.landmarks)
        colour = encoder(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())[0].numpy()
    assert np.abs(trained - served).max() < 1e-4
    assert np.linalg.norm(colour - served) > 0.01


# -- detection work per image (model/faces/mtcnn.py) ---------------------------------------

def _muxspace_batch(folder: Path, n: int) -> np.ndarray:
    files = sorted(folder.glob("*.jpg"))[:n]
    return np.stack([load_image(f) for f in files])


def test_bounded_mtcnn_equals_facenet_pytorch_below_its_bounds(detector, muxspace, astronaut):
    from facenet_pytorch import MTCNN

    from model.faces.mtcnn import TorchNets, _ChannelsLastPool, detect_faces
    from model.serving.mtcnn_onnx import OnnxNets, read_manifest
    # ours runs channels-last in PyTorch, or in ONNX Runtime (the served default on
    # the CPU); the reference is facenet-pytorch's own, untouched
    assert isinstance(detector.mtcnn.pnet.pool1, _ChannelsLastPool)
    reference = MTCNN(keep_all=True, min_face_size=detector.min_face_size)
    for batch, nets in itertools.product((_muxspace_batch(muxspace, 8), astronaut[None]),
                                         (TorchNets(detector.mtcnn), OnnxNets(read_manifest()))):
        with torch.inference_mode():
            ours = detect_faces(batch, detector.mtcnn, nets=nets)
            boxes, probs, points = reference.detect(batch, landmarks=True)
        for (b, p), rb, rp, rpts in zip(ours, boxes, probs, points):
            assert len(b) == (0 if rb is None else len(rb))
            if len(b):
                rb, rp, rpts = (np.asarray(a, float) for a in (rb, rp, rpts))
                mine, ref = np.argsort(-b[:, 4]), np.argsort(-rp)
                np.testing.assert_allclose(b[mine, :4], rb[ref], atol=1e-3)
                np.testing.assert_allclose(b[mine, 4], rp[ref], atol=1e-5)
                np.testing.assert_allclose(p[mine], rpts[ref], atol=1e-3)


def test_mtcnn_steps_in_numpy_are_facenet_pytorchs_bit_for_bit():
    """The steps between MTCNN's networks are facenet-pytorch's torch helpers rewritten
    in NumPy: the same float32 values, not merely close ones."""
    from facenet_pytorch.models.utils.detect_face import bbreg, generateBoundingBox, pad, rerec

    from model.faces.mtcnn import _clamped, _pnet_boxes, _regressed, _squared
    rng = np.random.default_rng(3)
    reg = rng.standard_normal((3, 4, 29, 37)).astype(np.float32)
    probs = (rng.random((3, 29, 37)) ** 6).astype(np.float32)
    for scale in (0.3, 0.3 * 0.709 ** 4):
        want, want_inds = generateBoundingBox(torch.from_numpy(reg), torch.from_numpy(probs), scale, 0.6)
        got, got_inds = _pnet_boxes(reg, probs, scale, 0.6)
        assert len(got) > 10
        np.testing.assert_array_equal(got, want.numpy())
        np.testing.assert_array_equal(got_inds, want_inds.numpy())
    boxes = np.concatenate([rng.uniform(-20, 300, (64, 2)), rng.uniform(-20, 300, (64, 2)) + 40,
                            rng.random((64, 1))], 1).astype(np.float32)
    offsets = rng.normal(0, 0.2, (64, 4)).astype(np.float32)
    np.testing.assert_array_equal(_squared(boxes.copy()), rerec(torch.from_numpy(boxes.copy())).numpy())
    np.testing.assert_array_equal(_regressed(boxes.copy(), offsets),
                                  bbreg(torch.from_numpy(boxes.copy()), torch.from_numpy(offsets)).numpy())
    for got, want in zip(_clamped(boxes, 250, 230), pad(torch.from_numpy(boxes), 250, 230), strict=True):
        np.testing.assert_array_equal(got, want)


def test_summed_area_resampling_equals_torch_area_interpolation():
    """MTCNN's crops and pyramid come from summed-area tables; facenet-pytorch resamples
    with `interpolate(mode="area")`. Same means for shrinking, enlarging (regions
    smaller than the output), thin and one-pixel regions, and non-square outputs."""
    import torch.nn.functional as F

    from model.faces.mtcnn import AreaResampler
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 61, 47, 3), dtype=np.uint8)
    reference = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    sampler = AreaResampler(images)
    k = 40
    y0, x0 = rng.integers(0, 60, k), rng.integers(0, 46, k)
    y1, x1 = y0 + 1 + rng.integers(0, 61 - y0), x0 + 1 + rng.integers(0, 47 - x0)
    inds = rng.integers(0, 3, k)
    for size in ((24, 24), (48, 48), (7, 13)):
        got = sampler(inds, y0, y1, x0, x1, size)
        for j in range(k):
            want = F.interpolate(reference[inds[j]:inds[j] + 1, :, y0[j]:y1[j], x0[j]:x1[j]], size=size, mode="area")
            np.testing.assert_allclose(got[j], want[0].permute(1, 2, 0).numpy(), atol=1e-4)
    np.testing.assert_allclose(sampler.whole((20, 33)),
                               F.interpolate(reference, size=(20, 33), mode="area").permute(0, 2, 3, 1).numpy(),
                               atol=1e-4)


def test_mtcnn_crops_boxes_partly_outside_as_facenet_pytorch_and_drops_boxes_wholly_outside():
    from facenet_pytorch.models.utils.detect_face import imresample, pad

    from model.faces.mtcnn import AreaResampler, _crops, _with_pixels
    images = np.random.default_rng(1).integers(0, 256, (2, 50, 70, 3), dtype=np.uint8)
    boxes = np.array([[10.3, 5.7, 40.2, 30.9, .9],   # inside
                      [-8.0, -3.0, 20.0, 12.0, .9],  # over the top-left corner
                      [60.0, 40.0, 90.0, 66.0, .9],  # over the bottom-right corner
                      [0.5, 0.2, 1.4, 1.1, .9],      # one pixel, enlarged
                      [80.0, 10.0, 95.0, 30.0, .9]], np.float32)  # wholly right of the image
    kept, inds = _with_pixels(boxes, np.array([0, 1, 0, 1, 0]), 70, 50)
    np.testing.assert_array_equal(kept, boxes[:4])
    got = _crops(AreaResampler(images), kept, inds, 70, 50, 24)
    reference = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    y, ey, x, ex = pad(torch.from_numpy(kept), 70, 50)   # facenet-pytorch's own
    want = torch.cat([imresample(reference[inds[k], :, y[k] - 1:ey[k], x[k] - 1:ex[k]].unsqueeze(0), (24, 24))
                      for k in range(len(kept))])
    np.testing.assert_allclose(got, ((want - 127.5) * 0.0078125).permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_a_photo_of_hundreds_of_faces_costs_a_bounded_detection(muxspace):
    """A 1280x1280 photo tiled with 841 faces sent ~8,000 crops through MTCNN's second
    network and ~3,800 through its third (about a minute on 2 cores); now each image
    sends at most max_candidates and max_refine, and still finds faces."""
    faces = [Image.fromarray(im).resize((44, 44), Image.LANCZOS) for im in _muxspace_batch(muxspace, 16)]
    canvas = Image.new("RGB", (1276, 1276), (128, 128, 128))
    for k in range(29 * 29):
        canvas.paste(faces[k % len(faces)], ((k % 29) * 44, (k // 29) * 44))
    detector = FaceDetector(max_candidates=400, max_refine=100)  # counted in PyTorch's networks (the default)
    seen = {"rnet": 0, "onet": 0}
    for name in seen:
        net = getattr(detector.mtcnn, name)
        forward = net.forward
        net.forward = lambda x, name=name, forward=forward: seen.__setitem__(name, seen[name] + len(x)) or forward(x)
    found = detector.detect([np.asarray(canvas)])[0]
    assert 0 < seen["rnet"] <= 400 and 0 < seen["onet"] <= 100, seen
    assert 50 <= len(found) <= 100, len(found)


def test_aligned_crops_are_located_as_preparation_located_them_whatever_the_served_detector():
    """`aligned=true` crops must be aligned as the training crops were (`ipdfer prepare`:
    MTCNN min face 40 on small crops, 20 on the rest), even when the service looks
    for larger faces in photos (IPDFER_MIN_FACE_SIZE)."""
    from model.faces.preprocess import CROP_SMALL_MIN_FACE, FacePipeline
    pipeline = FacePipeline(FaceDetector(min_face_size=60))
    assert pipeline.crops.small.min_face_size == CROP_SMALL_MIN_FACE
    assert pipeline.crops.large.min_face_size == FaceDetector().min_face_size == 20
    assert pipeline.detector.min_face_size == 60


def test_detect_cli_looks_for_the_services_smallest_face():
    from service.cli import build_parser
    from service.settings import Settings
    args = build_parser("detect").parse_args(["detect", "photo.jpg"])
    assert args.min_face_size == Settings(redis_url=None).min_face_size == 40
