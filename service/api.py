"""HTTP routes. Endpoints read the request, call the backend, shape the answer;
service errors become HTTP answers in the handlers of service/server.py."""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, Security, WebSocket
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.backend import Backend
from service.errors import RETRY_LATER, JobError, ResultTimeout, client_detail, http_status
from service.images import probe
from service.metrics import ApiMetrics
from service.schemas import (
    BatchItemOut, BatchOut, ErrorOut, HealthOut, NeutralizeOptions, PredictOptions, PredictOut, ReadyOut,
    RenderKind, ValidationErrorOut, VideoFormat, VideoOptionsIn, VideoOut,
)
from service.settings import Settings
from service.uploads import read_upload, read_uploads, save_video_upload
from service.videos import VideoJobs

log = logging.getLogger(__name__)

# --- dependencies ------------------------------------------------------------------


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_backend(request: Request) -> Backend:
    return request.app.state.backend


def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


def get_videos(request: Request) -> VideoJobs:
    return request.app.state.videos


SettingsDep = Annotated[Settings, Depends(get_settings)]
VideosDep = Annotated[VideoJobs, Depends(get_videos)]
BackendDep = Annotated[Backend, Depends(get_backend)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                               description="Required only when the service sets IPDFER_API_KEY.")


def require_api_key(settings: SettingsDep, key: Annotated[str | None, Security(_api_key_header)] = None) -> None:
    expected = settings.api_key.get_secret_value() if settings.api_key else None
    # constant time: the comparison must not tell an attacker how much of a guess was right
    if expected and not hmac.compare_digest((key or "").encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong X-API-Key header", headers={"WWW-Authenticate": "APIKey"})


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


# --- OpenAPI descriptions of what the routes answer --------------------------------

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer"}}}
_E = {"model": ErrorOut}
_IMAGE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_E, "description": "Empty, truncated or undecodable image, or a malformed body."},
    401: {**_E, "description": "Missing or wrong X-API-Key (only when an API key is configured)."},
    413: {**_E, "description": "Body over the byte limit, or image over the pixel limit."},
    415: {**_E, "description": "Not a JPEG, PNG, WebP, BMP or TIFF image, or an unsupported body type."},
    422: {"model": ValidationErrorOut, "description": "Invalid options, image too small, or no face."},
    500: {**_E, "description": "The job failed repeatedly and was dead-lettered; the reason is given."},
    503: {**_E, "headers": _RETRY_AFTER, "description": "Queue full, no worker ready, or Redis down."},
    504: {**_E, "description": "The result did not arrive within the request timeout."},
}
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "The image."}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    **{t: {"schema": {"type": "string", "format": "binary"}}
       for t in ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff")},
}}}
_BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "The images, one part each (any field name; the parts' order is kept)."}}}}}}}
_VIDEO_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "The video."}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    **{t: {"schema": {"type": "string", "format": "binary"}}
       for t in ("video/mp4", "video/quicktime", "video/webm", "video/x-matroska", "video/x-msvideo")},
}}}
_VIDEO_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_E, "description": "Empty body, not a video container, no video stream, or a malformed body."},
    401: _IMAGE_ERRORS[401],
    408: {**_E, "description": "The body did not arrive within IPDFER_VIDEO_BODY_TIMEOUT_S."},
    413: {**_E, "description": "Body over IPDFER_VIDEO_MAX_MB, or a video longer or larger than the limits."},
    415: {**_E, "description": "A container this service does not take (an image, a raw stream), or an "
                              "unsupported body type."},
    422: {"model": ValidationErrorOut, "description": "Invalid options."},
    503: {**_E, "headers": _RETRY_AFTER, "description": "Too many videos waiting, or Redis down."},
}
_PNG = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}

async def _analyze(image: bytes, options: PredictOptions, settings: Settings, backend: Backend,
                   metrics: ApiMetrics, rid: str, t0: float) -> PredictOut:
    """One image through the backend, as POST /predict answers it (errors raised)."""
    _, width, height = probe(image, max_pixels=settings.max_pixels, max_bytes=settings.max_body_bytes,
                             min_side=settings.min_image_side)
    reply = await backend.analyze(image, aligned=options.aligned, max_faces=options.max_faces,
                                  neutral=options.neutral, pixels=width * height)
    metrics.observe_reply(reply)
    return PredictOut(request_id=rid, faces=reply["faces"],
                      faces_skipped=reply.get("faces_skipped", 0), image=reply["image"],
                      model=reply["model"], worker=reply["worker"], batch_size=reply["batch_size"],
                      timings={**reply["timings"], "total_ms": round((time.perf_counter() - t0) * 1000, 2)})


def _png(data: bytes, rid: str, **headers: str) -> Response:
    return Response(content=data, media_type="image/png", headers={"X-Request-ID": rid, **headers})


# --- routes ------------------------------------------------------------------------

router = APIRouter()


@router.post("/predict", response_model=PredictOut, tags=["inference"], responses=_IMAGE_ERRORS,
             openapi_extra=_UPLOAD_BODY, dependencies=[Depends(require_api_key)],
             summary="Expressions, head pose and (optionally) neutral faces of every face in an image")
async def predict(request: Request, options: Annotated[PredictOptions, Query()], settings: SettingsDep,
                  backend: BackendDep, metrics: MetricsDep) -> PredictOut:
    t0 = time.perf_counter()
    image = await read_upload(request, settings)
    return await _analyze(image, options, settings, backend, metrics, request_id(request), t0)


@router.post("/predict/batch", response_model=BatchOut, tags=["inference"],
             responses={k: v for k, v in _IMAGE_ERRORS.items() if k in (400, 401, 413, 415, 422)},
             openapi_extra=_BATCH_BODY, dependencies=[Depends(require_api_key)],
             summary="POST /predict for several images in one request, each answered in order")
async def predict_batch(request: Request, options: Annotated[PredictOptions, Query()], settings: SettingsDep,
                        backend: BackendDep, metrics: MetricsDep) -> BatchOut:
    """Each image is its own job (in Redis mode several workers share a batch) and
    gets its own result or its own error: a broken image fails itself only. The
    answer is 200 once the request was read; each entry's `status` is what
    POST /predict would have answered for that image."""
    t0 = time.perf_counter()
    rid = request_id(request)
    uploads = await read_uploads(request, settings)

    async def one(index: int, filename: str | None, image: bytes) -> BatchItemOut:
        try:
            result = await _analyze(image, options, settings, backend, metrics, f"{rid}/{index}", t0)
            return BatchItemOut(index=index, filename=filename, status=200, result=result)
        except (JobError, ResultTimeout, *RETRY_LATER) as e:
            if isinstance(e, JobError) and e.kind == "dead_letter":
                metrics.dead_lettered.inc()
            return BatchItemOut(index=index, filename=filename, status=http_status(e), detail=client_detail(e))
        except Exception as e:  # noqa: BLE001 - one image's failure must not fail its neighbours
            log.exception("batch image %d failed", index)
            return BatchItemOut(index=index, filename=filename, status=500,
                                detail=f"internal error: {type(e).__name__}")

    results = await asyncio.gather(*(one(i, name, data) for i, (name, data) in enumerate(uploads)))
    return BatchOut(request_id=rid, images=len(results), succeeded=sum(r.status == 200 for r in results),
                    results=results)


@router.get("/neutralize", tags=["inference"], response_class=Response,
            responses={200: {**_PNG, "description": "The neutral render (or the residue heatmap)."},
                       404: {**_E, "description": "Unknown or expired face_id."},
                       **{k: v for k, v in _IMAGE_ERRORS.items() if k in (401, 422, 500, 503, 504)}},
            dependencies=[Depends(require_api_key)],
            summary="The neutral face of a face of an earlier /predict, as PNG")
async def neutralize_face(
    request: Request, backend: BackendDep, metrics: MetricsDep,
    face_id: Annotated[str, Query(pattern=r"^[0-9a-f]{32}$", description="`face_id` from /predict.")],
    kind: Annotated[RenderKind, Query(description="neutral: the neutral render; residue: where the face "
                                                  "differs from it, as a heatmap.")] = "neutral",
) -> Response:
    reply = await backend.render(face_id, kind)
    metrics.observe_reply(reply)
    return _png(base64.b64decode(reply["png"]), request_id(request), **{"X-Face-Id": face_id})


@router.post("/neutralize", tags=["inference"], response_class=Response,
             responses={200: {**_PNG, "description": "The neutral render of the largest face."},
                        **_IMAGE_ERRORS},
             openapi_extra=_UPLOAD_BODY, dependencies=[Depends(require_api_key)],
             summary="The neutral face of the largest face in an image, as PNG")
async def neutralize_image(request: Request, options: Annotated[NeutralizeOptions, Query()],
                           settings: SettingsDep, backend: BackendDep, metrics: MetricsDep) -> Response:
    image = await read_upload(request, settings)
    _, width, height = probe(image, max_pixels=settings.max_pixels, max_bytes=settings.max_body_bytes,
                             min_side=settings.min_image_side)
    reply = await backend.analyze(image, aligned=options.aligned, max_faces=1, largest=True, neutral=True,
                                  pixels=width * height)
    metrics.observe_reply(reply)
    if not reply["faces"]:
        raise JobError("no_face", "no face was found in the image")
    face = reply["faces"][0]
    return _png(base64.b64decode(face["neutral_png"]), request_id(request), **{"X-Face-Id": face["face_id"]})


@router.post("/videos", status_code=202, response_model=VideoOut, tags=["video"], responses=_VIDEO_ERRORS,
             openapi_extra=_VIDEO_BODY, dependencies=[Depends(require_api_key)],
             summary="Upload a video; its frames are analysed in the background (poll GET /videos/{video_id})")
async def submit_video(request: Request, options: Annotated[VideoOptionsIn, Query()], settings: SettingsDep,
                       videos: VideosDep) -> JSONResponse:
    """Answers 202 once the upload is stored and its header checked (a broken or
    too long video is refused here); `Location` is the status URL. Sampled frames
    go through the same queue and batches as /predict; each face gets a track id
    across frames and smoothed probabilities."""
    video_id, path = videos.reserve()   # 503 at once when full, before the body is read
    try:
        await save_video_upload(request, settings, path)
    except BaseException:
        videos.release(path)
        raise
    record = await videos.start(video_id, path, options.model_dump())
    return JSONResponse(VideoOut(**record).model_dump(), status_code=202,
                        headers={"Location": f"/videos/{video_id}", "X-Request-ID": request_id(request)})


@router.get("/videos/{video_id}", response_model=VideoOut, tags=["video"], dependencies=[Depends(require_api_key)],
            responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                             "description": "The status (JSON), or with format=csv the rows."},
                       404: {**_E, "description": "Unknown or expired video_id."},
                       409: {**_E, "description": "format=csv before the video is done."},
                       **{k: v for k, v in _IMAGE_ERRORS.items() if k in (401, 422, 503)}},
            summary="A video's status and progress, and once done its frames, face tracks and summary")
async def video_status(video_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="From POST /videos.")],
                       query: Annotated[VideoFormat, Query()], backend: BackendDep) -> Response:
    record = await backend.get_video(video_id)
    if record is None:
        raise HTTPException(404, "unknown or expired video_id")
    if query.format == "json":
        return JSONResponse(VideoOut(**record).model_dump())
    if record["status"] != "done":
        raise HTTPException(409, f"the video is {record['status']}; its CSV is ready once the status is done")
    from model.video.analyze import VideoResult, to_csv
    r = record["result"]
    csv_text = to_csv(VideoResult(info=r["video"], frames=r["frames"], tracks=r["tracks"], stats=r["stats"]))
    return Response(csv_text, media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{video_id}.csv"'})


@router.websocket("/live")
async def live(ws: WebSocket,
               smoothing: Annotated[float, Query(ge=0, le=10, description="Smoothing time constant, s.")] = 0.5,
               max_faces: Annotated[int, Query(ge=1, le=64, description="Faces per frame.")] = 4) -> None:
    """Live camera: binary frames in, tracked and smoothed faces out (service/live.py)."""
    from service import live as live_session
    settings = ws.app.state.settings
    await live_session.session(ws, settings, ws.app.state.backend, smoothing, min(max_faces, settings.max_faces))


@router.get("/healthz", response_model=HealthOut, tags=["operations"], summary="The process is alive")
async def healthz() -> HealthOut:
    return HealthOut()


@router.get("/readyz", response_model=ReadyOut, tags=["operations"],
            responses={503: {"model": ReadyOut, "headers": _RETRY_AFTER,
                             "description": "Not ready: Redis down, no worker, or model loading."}},
            summary="Ready to answer /predict (Redis reachable, a worker with weights loaded)")
async def readyz(backend: BackendDep, settings: SettingsDep) -> JSONResponse:
    state = ReadyOut(**await backend.readiness())
    if state.ready:
        return JSONResponse(state.model_dump())
    return JSONResponse(state.model_dump(), status_code=503,
                        headers={"Retry-After": str(settings.retry_after_s)})


@router.get("/metrics", tags=["operations"], response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format."}})
async def metrics_endpoint(backend: BackendDep, metrics: MetricsDep) -> Response:
    stats = await backend.stats()
    if stats.get("queue_depth") is not None:
        metrics.queue_depth.set(stats["queue_depth"])
    if stats.get("dead_letters") is not None:
        metrics.dead_letter_jobs.set(stats["dead_letters"])
    metrics.workers_ready.set(stats.get("workers") or 0)
    if stats.get("face_state_bytes") is not None:  # in process (in Redis mode: Redis's own INFO)
        metrics.face_states.set(stats["face_states"])
        metrics.face_state_bytes.set(stats["face_state_bytes"])
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
