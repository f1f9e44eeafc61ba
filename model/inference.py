"""Batched inference over the exported weights: detection + alignment (the shared
face pipeline), expression and pose encoders, and on request the identity
encoder + decoder for neutral renders. The service and `ipdfer predict` use this
module only; it knows nothing about HTTP or Redis."""
from __future__ import annotations

import io
import struct
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from model import faces as facelib, mirror
from model.faces.mtcnn_onnx import MANIFEST as MTCNN_MANIFEST, SUBFOLDER as MTCNN_SUBFOLDER
from model.labels import EXPRESSIONS
from model.onnx_runtime import check_runtime
from model.precisions import PRECISIONS, cpu_has_native_bf16
from model.nets.serving import inference_form
from model.weights import DEFAULT_WEIGHTS_DIR, LoadedWeights, load_weights


@dataclass
class FaceState:
    """What a later neutral/residue render needs: the aligned face, the 150×150
    identity chip (grayscale, the model sees no colour) and, for the editing
    renderer, the larger crop it edits. Serialised as a small header + zlib'd raw
    bytes: never pickle anything that goes to Redis."""
    aligned: np.ndarray              # (S,S) uint8
    chip: np.ndarray                 # (150,150) uint8
    large: np.ndarray | None = None  # (R,R) uint8, same alignment as `aligned`

    MAGIC = b"IPDF2"

    def to_bytes(self) -> bytes:
        s, c = self.aligned.shape[0], self.chip.shape[0]
        r = 0 if self.large is None else self.large.shape[0]
        raw = b"".join(np.ascontiguousarray(a).tobytes() for a in (self.aligned, self.chip, self.large)
                       if a is not None)
        # level 1: 0.8 vs 1.2 ms a face at level 6, the same ~30 KB (camera noise barely compresses)
        return self.MAGIC + struct.pack("<HHH", s, c, r) + zlib.compress(raw, 1)

    @classmethod
    def from_bytes(cls, data: bytes) -> FaceState:
        if not data.startswith(cls.MAGIC):
            raise ValueError("not a FaceState")
        s, c, r = struct.unpack_from("<HHH", data, len(cls.MAGIC))
        raw = zlib.decompress(data[len(cls.MAGIC) + 6:])
        if len(raw) != s * s + c * c + r * r:
            raise ValueError("corrupt FaceState")
        aligned = np.frombuffer(raw[:s * s], np.uint8).reshape(s, s)
        chip = np.frombuffer(raw[s * s:s * s + c * c], np.uint8).reshape(c, c)
        large = np.frombuffer(raw[s * s + c * c:], np.uint8).reshape(r, r) if r else None
        return cls(aligned=aligned, chip=chip, large=large)


@dataclass
class FacePrediction:
    box: list[float] | None
    landmarks: list[list[float]] | None
    score: float | None
    probabilities: dict[str, float]
    label: str
    confidence: float
    pose: dict[str, float]
    state: FaceState
    neutral_png: bytes | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict without the state and raw PNG bytes."""
        return {"box": self.box, "landmarks": self.landmarks, "score": self.score,
                "expression": {"label": self.label, "confidence": self.confidence,
                               "probabilities": self.probabilities},
                "pose": self.pose}


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def residue_heatmap(face: np.ndarray, residue: np.ndarray) -> np.ndarray:
    """Blend |residue| as a JET heatmap over the grayscale face -> RGB uint8."""
    magnitude = np.abs(residue)
    magnitude = (255 * magnitude / max(float(magnitude.max()), 1e-6)).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(magnitude, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    base = cv2.cvtColor(face, cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(base, 0.5, heat, 0.5, 0)


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """"auto": fp16 on CUDA, fp32 on the CPU. bf16 is a switch for CPUs that compute
    it natively (AVX-512 BF16 / AMX). Measured with the folded, channels-last
    encoders (benchmarks/load.py, 2 loops x 1 thread): bf16 was slower for a lone
    client (27 vs 30 req/s, encode 10.0 vs 8.3 ms) and 11% faster at 16 clients
    (65 vs 59 req/s), and it moves probabilities by up to 0.04 (same top label for
    99% of FER2013 test faces); fp32 serves exactly the evaluated model. int8 is
    the encoders' quantized graph in ONNX Runtime on the CPU (model/encoders_int8.py)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "int8" and device.type != "cpu":
        raise ValueError("int8 runs the encoders' quantized graph in ONNX Runtime on the CPU only "
                         "(IPDFER_DEVICE=cpu), not on " + device.type)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise ValueError("bf16 asked for, but this CPU has no native bf16 (AVX-512 BF16 / AMX)")
    return precision


def resolve_runtime(weights: LoadedWeights, device: torch.device, precision: str, runtime: str = "auto") -> str:
    """What runs the per-request encoders. "auto": ONNX Runtime on the CPU in fp32
    when the weights come with their exported one-pass graph (model/encoders_onnx.py:
    2.7x the faces/s of PyTorch at batch 1 on an AVX2 CPU), else PyTorch;
    "onnxruntime" insists. int8 exists only as a graph: ONNX Runtime, or refused.
    The mirror pass is a second run of whichever runs (model/mirror.py)."""
    check_runtime(runtime)
    if precision == "int8":
        if runtime == "torch":
            raise ValueError("int8 is the encoders' graph in ONNX Runtime: not with runtime torch")
        return "onnxruntime"
    if runtime == "torch":
        return runtime
    from model.encoders_onnx import onnx_entry
    usable = device.type == "cpu" and precision == "fp32"
    if runtime == "onnxruntime" and not usable:
        raise ValueError(f"runtime onnxruntime runs the encoders in fp32 on the CPU; asked: {precision} on "
                         f"{device.type}")
    if runtime == "auto":
        return "onnxruntime" if usable and onnx_entry(weights) is not None else "torch"
    return runtime


def mtcnn_folder(weights: LoadedWeights) -> Path | None:
    """MTCNN's graphs: beside the served weights when that folder has them (an
    installed image keeps its weights outside the package), else the shipped ones."""
    folder = weights.directory / MTCNN_SUBFOLDER if weights.directory else None
    return folder if folder and (folder / MTCNN_MANIFEST).is_file() else None


def autocast_for(device: torch.device | str, precision: str):
    """The autocast context of a resolved precision (fp32: none)."""
    device = torch.device(device)
    if precision in ("fp32", "int8"):  # int8: what PyTorch runs (renders) stays fp32
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


class Analyzer:
    """Load once, call `analyze` on batches. Thread-compatible, not thread-safe:
    one batching loop owns an Analyzer."""

    def __init__(self, weights: LoadedWeights, device: str | None = None,
                 pipeline: facelib.FacePipeline | None = None, flip_tta: bool | None = None,
                 precision: str = "auto", runtime: str = "auto", min_face_size: int = 40,
                 mirror_margin: float = mirror.DEFAULT_MARGIN):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.weights = weights
        self.model = inference_form(weights.model).to(self.device)   # the original stays on the CPU
        self.image_size = weights.config.image_size
        # the editing renderer edits a larger crop of the face: served renders are render_size²
        self.render_size = weights.config.render_size if self.model.edits_input else 0
        self.pipeline = pipeline or facelib.FacePipeline(
            facelib.FaceDetector(device=str(self.device), min_face_size=min_face_size, runtime=runtime,
                                 onnx_folder=mtcnn_folder(weights)),
            size=self.image_size, device=str(self.device), render_size=self.render_size)
        # Expression probabilities average the face and its mirror image when the
        # weights are served so (`flip_tta` in their config; a distilled student
        # answers in one pass), for the faces whose one-pass margin is below
        # `mirror_margin` (model/mirror.py; 1 = every face, as `ipdfer evaluate`).
        self.flip_tta = weights.config.flip_tta if flip_tta is None else flip_tta
        self.mirror_margin = mirror.check_margin(mirror_margin) if self.flip_tta else 0.0
        self._identity = None   # the dlib port loads on the first neutral request
        # seconds spent by the last analyze(), per stage: detect, align, encode, render
        self.last_timings: dict[str, float] = {}
        self.last_mirrored = 0   # faces of the last analyze() that got the mirror pass
        self.precision = resolve_precision(self.device, precision)
        self._autocast = autocast_for(self.device, self.precision)
        self.runtime = resolve_runtime(weights, self.device, self.precision, runtime)
        self._onnx = None
        if self.runtime == "onnxruntime":  # the per-request encoders; renders stay in PyTorch
            from model.encoders_int8 import load_int8_encoders
            from model.encoders_onnx import load_onnx_encoders
            load = load_int8_encoders if self.precision == "int8" else load_onnx_encoders
            self._onnx = load(weights, threads=torch.get_num_threads())

    @classmethod
    def load(cls, weights_dir: Path | str | None = None, device: str | None = None,
             flip_tta: bool | None = None, precision: str = "auto", runtime: str = "auto",
             min_face_size: int = 40, mirror_margin: float = mirror.DEFAULT_MARGIN) -> Analyzer:
        return cls(load_weights(Path(weights_dir) if weights_dir else DEFAULT_WEIGHTS_DIR), device,
                   flip_tta=flip_tta, precision=precision, runtime=runtime, min_face_size=min_face_size,
                   mirror_margin=mirror_margin)

    @property
    def info(self) -> dict:
        m = self.weights.manifest
        return {"name": m["name"], "version": m["version"], "sha256": m["sha256"],
                "device": str(self.device), "precision": self.precision, "runtime": self.runtime,
                "mirror_margin": self.mirror_margin,
                "detector_runtime": self.pipeline.detector.nets.runtime,
                "image_size": self.image_size,
                "trained": bool(m.get("trained", False))}

    @property
    def identity(self) -> torch.nn.Module:
        if self._identity is None:
            from model.faces.identity import load_identity_encoder
            self._identity = load_identity_encoder(device=str(self.device))
        return self._identity

    def warmup(self, neutral: bool = True) -> None:
        """Run every network once so the first real request is not slow."""
        blank = np.full((self.image_size, self.image_size, 3), 128, np.uint8)
        self.analyze([blank], aligned=[True], max_faces=[1], neutral=[neutral])

    # -- batched building blocks -------------------------------------------
    @torch.inference_mode()
    def _encode(self, aligned: list[np.ndarray], mirror_margin: float | None = None,
                exact: bool = False) -> dict[str, torch.Tensor]:
        """The encoders, with the mirror pass for faces below `mirror_margin`
        (None: as served). `exact`: never the int8 graph (the codes a render starts from)."""
        x = facelib.to_model_input(np.stack(aligned)).to(self.device)
        margin = self.mirror_margin if mirror_margin is None else mirror.check_margin(mirror_margin)
        graph = self._onnx is not None and not (exact and self.precision == "int8")
        return mirror.encode_with_mirror(self._onnx if graph else self._torch_one_pass, x, margin)

    def _torch_one_pass(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._autocast:
            out = self.model.encode(x)
        return {k: v.float() for k, v in out.items()}

    @torch.inference_mode()
    def _identity_codes(self, chips: list[np.ndarray]) -> torch.Tensor:
        return self.identity(facelib.identity_input(chips).to(self.device))

    @torch.inference_mode()
    def _render(self, states: list[FaceState], enc: dict[str, torch.Tensor] | None = None,
                residue: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        # a render needs pose and expression codes, not probabilities: no mirror pass;
        # in fp32 (not int8), so that /predict and /neutralize render the same face
        enc = enc or self._encode([s.aligned for s in states], mirror_margin=0.0, exact=True)
        identity = self._identity_codes([s.chip for s in states])
        face = target = None
        if self.model.edits_input:
            face = facelib.to_model_input([s.aligned for s in states]).to(self.device)
            target = facelib.to_model_input([self._large(s) for s in states]).to(self.device)
        neutral = self.model.render(identity, enc["pose_feat"], None, face, target)
        diff = (self.model.render(identity, enc["pose_feat"], enc["exp"], face, target) - neutral
                if residue else None)
        to_u8 = lambda t: facelib.to_uint8(t.float().cpu())  # noqa: E731
        return to_u8(neutral), (diff.float().squeeze(1).cpu().numpy() if diff is not None else None)

    def _large(self, state: FaceState) -> np.ndarray:
        """The crop the editor renders; a state without one (stored by a
        pipeline that cut none) falls back to the aligned face, enlarged."""
        if state.large is not None and state.large.shape[0] == self.render_size:
            return state.large
        return cv2.resize(state.aligned, (self.render_size, self.render_size), interpolation=cv2.INTER_CUBIC)

    # -- public API -------------------------------------------------------------
    def analyze(self, images: list[np.ndarray], aligned: list[bool], max_faces: list[int | None],
                neutral: list[bool]) -> list[facelib.Faces | Exception]:
        """One result slot per image: its faces (`FacePrediction`s, with `.detected`
        counting the faces found before the `max_faces` cap), or the Exception that
        image raised. A failing image never fails its neighbours."""
        n = len(images)
        assert len(aligned) == len(max_faces) == len(neutral) == n
        t0 = time.perf_counter()
        detect_s = 0.0
        faces: list[facelib.Faces | Exception] = [facelib.Faces() for _ in range(n)]
        for flag in (False, True):  # detection runs batched over the non-aligned images
            idx = [i for i in range(n) if aligned[i] == flag]
            if idx:
                self.pipeline.detector.last_seconds = 0.0
                for i, result in zip(idx, self._process([images[i] for i in idx], flag,
                                                        [max_faces[i] for i in idx])):
                    faces[i] = result
                # aligned crops are located by the CropLocator's own detectors (MTCNN on the crop)
                detect_s += self.pipeline.crops.last_seconds if flag else self.pipeline.detector.last_seconds
        flat = [(i, f) for i, fs in enumerate(faces) if not isinstance(fs, Exception) for f in fs]
        results: list[facelib.Faces | Exception] = [
            fs if isinstance(fs, Exception) else facelib.Faces([], fs.detected) for fs in faces]
        t1 = time.perf_counter()
        self.last_timings = {"detect_s": detect_s, "align_s": t1 - t0 - detect_s, "encode_s": 0.0,
                             "render_s": 0.0}
        self.last_mirrored = 0
        if not flat:
            return results
        enc = self._encode([f.aligned for _, f in flat])
        self.last_mirrored = int(enc["mirrored"].sum())
        t2 = time.perf_counter()
        probs = enc["probs"].cpu().numpy()
        poses = enc["pose"].cpu().numpy()
        states = [FaceState(f.aligned, f.chip, f.large) for _, f in flat]
        want = [k for k, (i, _) in enumerate(flat) if neutral[i]]
        renders = {}
        if want:  # the codes just computed, unless they came from the int8 graph (`_render`)
            sub = {key: v[want] for key, v in enc.items()} if self.precision != "int8" else None
            rendered, _ = self._render([states[k] for k in want], sub)
            renders = {k: png_bytes(img) for k, img in zip(want, rendered)}
        for k, (i, f) in enumerate(flat):
            det = f.detection
            top = int(probs[k].argmax())
            results[i].append(FacePrediction(
                box=[round(float(v), 2) for v in det.box] if det else None,
                landmarks=[[round(float(a), 2), round(float(b), 2)] for a, b in det.landmarks] if det else None,
                score=round(float(det.score), 4) if det else None,
                probabilities={c: round(float(p), 5) for c, p in zip(EXPRESSIONS, probs[k])},
                label=EXPRESSIONS[top], confidence=round(float(probs[k, top]), 5),
                pose={a: round(float(v), 2) for a, v in zip(("yaw", "pitch", "roll"), poses[k])},
                state=states[k], neutral_png=renders.get(k)))
        self.last_timings["render_s"] = time.perf_counter() - t2  # with reading the results out
        self.last_timings["encode_s"] = t2 - t1
        return results

    def _process(self, images: list[np.ndarray], aligned: bool, max_faces: list[int | None]
                 ) -> list[facelib.Faces | Exception]:
        try:  # faces beyond an image's cap are never aligned nor rendered
            return self.pipeline.process(images, aligned=aligned, max_faces=list(max_faces))
        except Exception:  # isolate the failing image by retrying one at a time
            batch = []
            for img, m in zip(images, max_faces):
                try:
                    batch.append(self.pipeline.process([img], aligned=aligned, max_faces=[m])[0])
                except Exception as exc:  # noqa: BLE001 - returned to that image's caller
                    batch.append(exc)
            return batch

    def render(self, states: list[FaceState], kind: str = "neutral") -> list[bytes]:
        """PNG per state: the neutral render, or the residue heatmap."""
        if kind not in ("neutral", "residue"):
            raise ValueError(f"unknown render kind {kind!r}: use 'neutral' or 'residue'")
        if not states:
            return []
        neutral, diff = self._render(states, residue=kind == "residue")
        if kind == "neutral":
            return [png_bytes(img) for img in neutral]
        return [png_bytes(residue_heatmap(self._large(s) if self.model.edits_input else s.aligned, d))
                for s, d in zip(states, diff)]
