"""Reading request bodies at the edge, within limits: the byte limit (from
Content-Length at once, then while reading: 413), the body deadline (408), the
body types taken (415), and multipart parsing (400 when malformed). Images are
read into memory (POST /predict, /predict/batch); a video is streamed to a file
(POST /videos)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator

from fastapi import HTTPException, Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.settings import Settings

async def _limited(request: Request, limit: int, timeout: float) -> AsyncIterator[bytes]:
    """The request body, failing with 413 as soon as it passes `limit` bytes and
    with 408 when it is not all there within `timeout` seconds (a slow client
    must not hold a connection and a buffer for ever)."""
    total, deadline = 0, time.monotonic() + timeout
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise HTTPException(408, f"request body not received within {timeout:g} s") from None
        total += len(chunk)
        if total > limit:
            raise HTTPException(413, f"request body is over the limit of {limit:,} bytes")
        yield chunk


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _refuse_declared_length(request: Request, limit: int, name: str = "limit") -> None:
    """413 at once when the Content-Length header already says the body is too large."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"request body is {int(length):,} bytes; the {name} is {limit:,}")


def _is_raw_body(media: str, kind: str) -> bool:
    """A body type that only says "raw bytes" (the bytes decide what they are): none,
    octet-stream, `kind`/* (image, video), or curl --data-binary's default form type."""
    return media in ("", "application/octet-stream", "application/x-www-form-urlencoded") \
        or media.startswith(f"{kind}/")


def _file_part(form: FormData, what: str) -> UploadFile:
    """The field `file` of a one-file multipart form, else its only file part (400 without one)."""
    if isinstance(form.get("file"), UploadFile):
        return form["file"]
    uploads = [v for v in form.values() if isinstance(v, UploadFile)]
    if not uploads:
        raise HTTPException(400, f"the multipart body has no file; send the {what} in the field 'file'")
    return uploads[0]


async def _parse_multipart(request: Request, limit: int, timeout: float, max_files: int,
                           too_many: HTTPException | None = None) -> FormData:
    """The parsed form of a multipart body read within `limit` bytes and `timeout`
    seconds; `too_many` answers a body of more than `max_files` files (else 400, as
    any malformed body)."""
    parser = MultiPartParser(request.headers, _limited(request, limit, timeout),
                             max_files=max_files, max_fields=16, max_part_size=64 * 1024)
    try:
        return await parser.parse()
    except MultiPartException as e:
        if too_many is not None and "Too many files" in e.message:
            raise too_many from None
        raise HTTPException(400, f"malformed multipart body: {e.message}") from None


async def read_upload(request: Request, settings: Settings) -> bytes:
    """The image bytes of a multipart upload (field `file`) or of a raw body."""
    limit = settings.max_body_bytes
    _refuse_declared_length(request, limit)
    media = _media_type(request)
    if media == "multipart/form-data":
        form = await _parse_multipart(request, limit, settings.body_timeout_s, max_files=1)
        try:
            return await _file_part(form, "image").read()
        finally:
            await form.close()
    if _is_raw_body(media, "image"):
        return b"".join([chunk async for chunk in _limited(request, limit, settings.body_timeout_s)])
    raise HTTPException(415, f"unsupported body type {media!r}: send the image as multipart/form-data "
                             "(field 'file') or as a raw image/* or application/octet-stream body")


async def read_uploads(request: Request, settings: Settings) -> list[tuple[str | None, bytes]]:
    """The (filename, bytes) of every file part of a multipart body, in order."""
    limit, most = settings.batch_max_bytes, settings.batch_max_images
    _refuse_declared_length(request, limit, "batch limit")
    media = _media_type(request)
    if media != "multipart/form-data":
        raise HTTPException(415, f"unsupported body type {media!r}: send the images as multipart/form-data, "
                                 "one file part each")
    form = await _parse_multipart(request, limit, settings.body_timeout_s, max_files=most, too_many=HTTPException(
        413, f"more than {most} images in one batch: send at most {most} (IPDFER_BATCH_MAX_IMAGES)"))
    try:
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not uploads:
            raise HTTPException(400, "the multipart body has no file part; send each image as a file part")
        return [(u.filename, await u.read()) for u in uploads]
    finally:
        await form.close()


async def save_video_upload(request: Request, settings: Settings, path: Path) -> int:
    """Stream a video upload (multipart field `file`, or a raw body) into `path`;
    returns its size. 413 past video_max_bytes, 408 past video_body_timeout_s."""
    limit, timeout = settings.video_max_bytes, settings.video_body_timeout_s
    _refuse_declared_length(request, limit, "video limit")
    media, size = _media_type(request), 0
    with open(path, "wb") as out:
        if media == "multipart/form-data":
            form = await _parse_multipart(request, limit, timeout, max_files=1)
            try:
                upload = _file_part(form, "video")
                while chunk := await upload.read(1 << 20):
                    out.write(chunk)
                    size += len(chunk)
            finally:
                await form.close()
        elif _is_raw_body(media, "video"):
            async for chunk in _limited(request, limit, timeout):
                out.write(chunk)
                size += len(chunk)
        else:
            raise HTTPException(415, f"unsupported body type {media!r}: send the video as multipart/form-data "
                                     "(field 'file') or as a raw video/* or application/octet-stream body")
    if size == 0:
        raise HTTPException(400, "empty body: send a video")
    return size
