"""The serving engine's entry: `Analyzer.analyze(requests) -> Analysis`, batched
over decoded images: detection + alignment (model/faces), the encoders with the
mirror pass where it can change the answer (model/nets/mirror.py), and on request the
identity encoder + renderer for neutral faces. What runs where is the
`ServingPlan` (plan.py), decided once. No HTTP, no Redis: errors are typed
exceptions in the image's slot, timings are returned, not left on the object."""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from model import faces as facelib
from model.labels import EXPRESSIONS
from model.nets.serving import inference_form
from model.nets import mirror
from model.serving.face_state import FaceState
from model.serving.plan import ServingPlan, autocast_for
from model.weights import DEFAULT_WEIGHTS_DIR, LoadedWeights, load_weights


@dataclass
class ImageRequest:
    image: np.ndarray             # decoded RGB (or grey) pixels
    aligned: bool = False         # the image is already a crop of one face
    max_faces: int | None = None  # keep the best N detections (None: all)
    largest: bool = False         # keep only the largest face (the one a portrait is of)
    neutral: bool = False         # render each face's neutral face


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


@dataclass
class ImageResult:
    faces: list[FacePrediction] = field(default_factory=list)  # best detection first
    detected: int = 0                # faces found, also those beyond the max_faces cap
    error: Exception | None = None   # this image failed (typed: model.images' errors); its neighbours did not


@dataclass
class Analysis:
    images: list[ImageResult]        # one per request, in order
    timings: dict[str, float]        # the batch's seconds per stage: detect_s, align_s, encode_s, render_s
    mirrored: int = 0                # faces that got the mirror pass


class Analyzer:
    """Load once, call `analyze` on batches. Thread-compatible, not thread-safe:
    one batching loop owns an Analyzer."""

    def __init__(self, weights: LoadedWeights, plan: ServingPlan, min_face_size: int = 40,
                 pipeline: facelib.FacePipeline | None = None):
        self.weights, self.plan = weights, plan
        self.device = torch.device(plan.device)
        self.model = inference_form(weights.model).to(self.device)   # the original stays on the CPU
        self.image_size = weights.config.image_size
        # the editing renderer edits a larger crop of the face: served renders are render_size²
        self.render_size = weights.config.render_size if self.model.edits_input else 0
        nets = None
        if plan.detector_runtime == "onnxruntime":  # one set of sessions for all of this Analyzer's detectors
            from model.serving.mtcnn_onnx import OnnxNets, read_manifest
            nets = OnnxNets(read_manifest(plan.mtcnn_folder), plan.mtcnn_folder, threads=plan.threads)
        self.pipeline = pipeline or facelib.FacePipeline(
            facelib.FaceDetector(device=plan.device, min_face_size=min_face_size, nets=nets),
            size=self.image_size, device=plan.device, render_size=self.render_size)
        self._autocast = autocast_for(plan.device, plan.precision)
        self._identity = None   # the dlib port loads on the first neutral request
        self._graph = None      # the encoders' ONNX graph, when the plan runs them in ONNX Runtime
        if plan.encoder_runtime == "onnxruntime":   # renders stay in PyTorch
            from model.serving.encoders_int8 import load_int8_encoders
            from model.serving.encoders_onnx import load_onnx_encoders
            load = load_int8_encoders if plan.precision == "int8" else load_onnx_encoders
            self._graph = load(weights, threads=plan.threads)

    @classmethod
    def load(cls, weights_dir: Path | str | None = None, *, min_face_size: int = 40, **plan: object) -> Analyzer:
        """The weights of `weights_dir` (default: the package's), served as
        `ServingPlan.resolve(weights, **plan)` decides (device, precision, runtime,
        flip_tta, mirror_margin, threads)."""
        weights = load_weights(Path(weights_dir) if weights_dir else DEFAULT_WEIGHTS_DIR)
        return cls(weights, ServingPlan.resolve(weights, **plan), min_face_size=min_face_size)

    @property
    def info(self) -> dict:
        m = self.weights.manifest
        return {"name": m["name"], "version": m["version"], "sha256": m["sha256"],
                "device": self.plan.device, "precision": self.plan.precision, "runtime": self.plan.encoder_runtime,
                "mirror_margin": self.plan.mirror_margin, "detector_runtime": self.plan.detector_runtime,
                "threads": self.plan.threads,
                "image_size": self.image_size, "trained": bool(m.get("trained", False))}

    @property
    def identity(self) -> torch.nn.Module:
        if self._identity is None:
            from model.faces.identity import load_identity_encoder
            self._identity = load_identity_encoder(device=str(self.device))
        return self._identity

    def warmup(self, neutral: bool = True) -> None:
        """Run every network once so the first real request is not slow."""
        blank = np.full((self.image_size, self.image_size, 3), 128, np.uint8)
        self.analyze([ImageRequest(blank, aligned=True, max_faces=1, neutral=neutral)])

    # -- batched building blocks -------------------------------------------
    @torch.inference_mode()
    def _encode(self, aligned: list[np.ndarray], mirror_margin: float | None = None,
                exact: bool = False) -> dict[str, torch.Tensor]:
        """The encoders, with the mirror pass for faces below `mirror_margin`
        (None: as served). `exact`: never the int8 graph (the codes a render starts from)."""
        x = facelib.to_model_input(np.stack(aligned)).to(self.device)
        margin = self.plan.mirror_margin if mirror_margin is None else mirror.check_margin(mirror_margin)
        graph = self._graph is not None and not (exact and self.plan.precision == "int8")
        return mirror.encode_with_mirror(self._graph if graph else self._torch_one_pass, x, margin)

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
    def analyze(self, requests: list[ImageRequest]) -> Analysis:
        """One `ImageResult` per request: its faces, or the typed error that image
        raised. A failing image never fails its neighbours."""
        t0 = time.perf_counter()
        detect_s = 0.0
        found: list[facelib.Faces | Exception] = [facelib.Faces() for _ in requests]
        for flag in (False, True):  # detection runs batched over the photos, then over the crops
            idx = [i for i, r in enumerate(requests) if r.aligned == flag]
            if idx:
                self.pipeline.detector.last_seconds = 0.0
                for i, result in zip(idx, self._process(flag, [requests[i] for i in idx])):
                    found[i] = result
                # aligned crops are located by the CropLocator's own detectors (MTCNN on the crop)
                detect_s += self.pipeline.crops.last_seconds if flag else self.pipeline.detector.last_seconds
        results = [ImageResult(error=fs) if isinstance(fs, Exception) else ImageResult(detected=fs.detected)
                   for fs in found]
        flat = [(i, f) for i, fs in enumerate(found) if not isinstance(fs, Exception) for f in fs]
        t1 = time.perf_counter()
        timings = {"detect_s": detect_s, "align_s": t1 - t0 - detect_s, "encode_s": 0.0, "render_s": 0.0}
        if not flat:
            return Analysis(results, timings)
        enc = self._encode([f.aligned for _, f in flat])
        t2 = time.perf_counter()
        probs = enc["probs"].cpu().numpy()
        poses = enc["pose"].cpu().numpy()
        states = [FaceState(f.aligned, f.chip, f.large) for _, f in flat]
        want = [k for k, (i, _) in enumerate(flat) if requests[i].neutral]
        renders = {}
        if want:  # the codes just computed, unless they came from the int8 graph (`_render`)
            sub = {key: v[want] for key, v in enc.items()} if self.plan.precision != "int8" else None
            rendered, _ = self._render([states[k] for k in want], sub)
            renders = {k: png_bytes(img) for k, img in zip(want, rendered)}
        for k, (i, f) in enumerate(flat):
            det = f.detection
            top = int(probs[k].argmax())
            results[i].faces.append(FacePrediction(
                box=[round(float(v), 2) for v in det.box] if det else None,
                landmarks=[[round(float(a), 2), round(float(b), 2)] for a, b in det.landmarks] if det else None,
                score=round(float(det.score), 4) if det else None,
                probabilities={c: round(float(p), 5) for c, p in zip(EXPRESSIONS, probs[k])},
                label=EXPRESSIONS[top], confidence=round(float(probs[k, top]), 5),
                pose={a: round(float(v), 2) for a, v in zip(("yaw", "pitch", "roll"), poses[k])},
                state=states[k], neutral_png=renders.get(k)))
        timings.update(encode_s=t2 - t1, render_s=time.perf_counter() - t2)  # render: with reading the results out
        return Analysis(results, timings, mirrored=int(enc["mirrored"].sum()))

    def _process(self, aligned: bool, requests: list[ImageRequest]) -> list[facelib.Faces | Exception]:
        def process(batch: list[ImageRequest]) -> list[facelib.Faces]:
            # faces beyond an image's cap are never aligned nor rendered
            return self.pipeline.process([r.image for r in batch], aligned=aligned,
                                         max_faces=[r.max_faces for r in batch], largest=[r.largest for r in batch])
        try:
            return process(requests)
        except Exception:  # isolate the failing image by retrying one at a time
            batch = []
            for r in requests:
                try:
                    batch.append(process([r])[0])
                except Exception as exc:  # noqa: BLE001 - returned to that image's caller
                    batch.append(exc)
            return batch

    @torch.inference_mode()
    def identities(self, states: list[FaceState]) -> np.ndarray:
        """(N,128) identity descriptors of the faces (the frozen dlib network; same
        person when closer than 0.6), e.g. to keep a person's track in a video."""
        if not states:
            return np.zeros((0, 128), np.float32)
        return self._identity_codes([s.chip for s in states]).float().cpu().numpy()

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
