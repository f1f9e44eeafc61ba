"""Request options and response bodies of the HTTP API (input and output models
kept separate). These are also the OpenAPI schemas the docs and schemathesis see."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model.labels import EXPRESSIONS

MAX_FACES_LIMIT = 64

# --- input -------------------------------------------------------------------------


class PredictOptions(BaseModel):
    """Query options of POST /predict."""
    model_config = ConfigDict(extra="forbid")

    neutral: bool = Field(False, description="Include each face's synthesized neutral face "
                                             "(base64 PNG in `neutral_png`).")
    max_faces: int | None = Field(None, ge=1, le=MAX_FACES_LIMIT,
                                  description="Keep at most this many faces (best detections first).")
    aligned: bool = Field(False, description="The image already is one face crop (the face filling it): "
                                             "no search for faces in a photo; MTCNN runs on the crop only "
                                             "to align it as training crops were (a centre crop if it "
                                             "finds none), and the reply has no box, landmarks or score.")


class NeutralizeOptions(BaseModel):
    """Query options of POST /neutralize."""
    model_config = ConfigDict(extra="forbid")

    aligned: bool = Field(False, description="The image already is one face crop: aligned on the crop "
                                             "as with /predict?aligned=true.")


RenderKind = Literal["neutral", "residue"]


class VideoOptionsIn(BaseModel):
    """Query options of POST /videos."""
    model_config = ConfigDict(extra="forbid")

    fps: float = Field(5.0, gt=0, le=30, description="Frames analysed per second of video (the first frame "
                                                      "at or after each instant).")
    smoothing: float = Field(0.5, ge=0, le=10, description="Time constant in seconds of each face's "
                                                           "smoothed probabilities (0: none).")
    max_faces: int = Field(8, ge=1, le=MAX_FACES_LIMIT, description="Faces per frame, best detections first "
                                                                    "(capped by IPDFER_MAX_FACES).")
    neutral: bool = Field(False, description="Each track's summary gains the neutral render (base64 PNG, "
                                             "`neutral_png`) of its best frame (`neutral_frame`: the surest "
                                             "detection of the most frontal face).")


class VideoFormat(BaseModel):
    """Query options of GET /videos/{video_id}."""
    model_config = ConfigDict(extra="forbid")

    format: Literal["json", "csv"] = Field("json", description="json: status, progress and, when done, the "
                                           "result; csv: one row per (sampled frame, face track), once done.")

# --- output ------------------------------------------------------------------------


class Expression(BaseModel):
    label: str = Field(description=f"Top class, one of {', '.join(EXPRESSIONS)}.")
    confidence: float = Field(ge=0, le=1, description="Probability of the top class.")
    probabilities: dict[str, float] = Field(description="Probability of each of the 7 classes (sum 1).")


class Pose(BaseModel):
    yaw: float = Field(description="Degrees, + = the face turns to the image's right.")
    pitch: float = Field(description="Degrees, + = the face looks up.")
    roll: float = Field(description="Degrees, in-plane rotation.")


class FaceOut(BaseModel):
    face_id: str = Field(description="Id for GET /neutralize (kept for the configured face TTL).")
    box: list[float] | None = Field(description="x1, y1, x2, y2 in pixels; null for aligned input.",
                                    min_length=4, max_length=4)
    landmarks: list[list[float]] | None = Field(
        description="5 points (x, y): left eye, right eye, nose, left and right mouth corner; "
                    "null for aligned input.")
    score: float | None = Field(description="Detection confidence; null for aligned input.")
    expression: Expression
    pose: Pose
    neutral_png: str | None = Field(None, description="Base64 PNG of the neutral render "
                                                      "(only with ?neutral=true).")


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    sha256: str
    device: str


class Timings(BaseModel):
    queue_ms: float = Field(description="Waiting for a batch (queue + batch fill).")
    decode_ms: float = Field(0.0, description="Decoding the image in the worker.")
    detect_ms: float = Field(0.0, description="Face detection (MTCNN) of the whole batch.")
    align_ms: float = Field(0.0, description="Alignment and crops of the whole batch's faces.")
    encode_ms: float = Field(0.0, description="Expression and pose encoders of the whole batch.")
    render_ms: float = Field(0.0, description="Neutral renders (when asked) of the whole batch.")
    model_ms: float = Field(description="Encoders and renders of the whole batch (encode_ms + render_ms).")
    total_ms: float = Field(description="Request received to answer ready, in the API.")


class ImageSize(BaseModel):
    width: int
    height: int


class PredictOut(BaseModel):
    request_id: str
    faces: list[FaceOut] = Field(description="Detected faces, best detection first ([] = no face).")
    faces_skipped: int = Field(0, ge=0, description="Faces detected beyond the request's max_faces or "
                                                    "the server's IPDFER_MAX_FACES cap, not analysed.")
    image: ImageSize
    model: ModelInfo
    worker: str = Field(description="Which worker served the request.")
    batch_size: int = Field(description="Jobs in the model batch that served this request.")
    timings: Timings


class BatchItemOut(BaseModel):
    index: int = Field(ge=0, description="Position of the image in the request (0-based).")
    filename: str | None = Field(description="The part's filename, when the client sent one.")
    status: int = Field(description="The HTTP status POST /predict would have answered for this image "
                                    "alone (200 = `result` is set; otherwise `detail` says why).")
    detail: str | None = Field(None, description="Why this image failed.")
    result: PredictOut | None = Field(None, description="The image's analysis, as POST /predict answers it.")


class BatchOut(BaseModel):
    request_id: str
    images: int = Field(description="Images received.")
    succeeded: int = Field(description="Images analysed (status 200).")
    results: list[BatchItemOut] = Field(description="One entry per image, in the request's order.")


VideoStatus = Literal["queued", "running", "done", "failed"]


class VideoProgress(BaseModel):
    frames_done: int = Field(description="Sampled frames analysed so far.")
    frames_expected: int | None = Field(description="Sampled frames the video's header promises (null: "
                                                    "the header gives no duration).")


class VideoError(BaseModel):
    kind: str = Field(description="bad_video, unsupported_video, video_too_large, unavailable or failed.")
    detail: str


class VideoOut(BaseModel):
    video_id: str
    status: VideoStatus = Field(description="queued (waiting for a slot), running, done or failed.")
    created: float = Field(description="Unix time of the upload.")
    updated: float = Field(description="Unix time of the last change.")
    options: VideoOptionsIn
    progress: VideoProgress
    video: dict | None = Field(None, description="The container's header: container, codec, width, height, "
                                                 "fps, duration_s, frames.")
    error: VideoError | None = Field(None, description="Why the video failed (status failed).")
    result: dict | None = Field(None, description="When done: `frames` (per sampled frame: frame, t and each "
                                                  "face's track, box, score, pose, probabilities, label, smoothed "
                                                  "probabilities and label), `tracks` (per face track: first_s, "
                                                  "last_s, frames, dominant, share, mean_pose; with neutral=true "
                                                  "neutral_frame and neutral_png) and `stats`.")


class ErrorOut(BaseModel):
    detail: str = Field(description="What went wrong, readable by a person.")


class ValidationErrorOut(BaseModel):
    detail: str = Field(description="What was wrong with the request options.")
    errors: list[dict] = Field(default_factory=list, description="One entry per invalid field.")


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyOut(BaseModel):
    ready: bool
    mode: Literal["redis", "inprocess"]
    detail: str
    workers: list[dict] = Field(default_factory=list, description="Model info of each ready worker.")
    queue_depth: int | None = Field(None, description="Jobs waiting or in flight.")
