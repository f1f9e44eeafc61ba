"""Streamed, sampled decoding with PyAV (FFmpeg): frames are decoded one packet
at a time and only the sampled ones are converted to RGB, so memory does not
grow with the video's length. The container's header is checked against the
limits before anything is decoded; what the header does not say (a WebM
without a duration) is checked while decoding.

Error kinds (the service maps them to HTTP statuses): `bad_video` (not a
container PyAV opens, no video stream, truncated before any frame),
`unsupported_video` (a container FFmpeg reads but this service does not take:
an image, a raw stream), `video_too_large` (duration, resolution or frame count
over the limits)."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

VIDEO_ERROR_KINDS = ("bad_video", "unsupported_video", "video_too_large")
# FFmpeg demuxer names taken (MP4/MOV/3GP, Matroska/WebM, AVI): an image is not a video
CONTAINERS = frozenset({"mov", "mp4", "matroska", "webm", "avi"})
SEND = "send MP4, MOV, WebM, MKV or AVI"


class VideoError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        assert kind in VIDEO_ERROR_KINDS, kind
        super().__init__(detail)
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class VideoLimits:
    max_duration_s: float = 600.0     # 10 minutes
    max_side: int = 3840              # 4K
    max_frames: int = 100_000         # decoded frames, sampled or not
    max_fps: float = 240.0            # a header claiming more is refused as broken


@dataclass(frozen=True)
class VideoInfo:
    container: str
    codec: str
    width: int
    height: int
    fps: float | None           # average frame rate from the header (None: not given)
    duration_s: float | None    # None: the header does not say (checked while decoding)
    frames: int | None          # None: not in the header

    def expected_samples(self, every_s: float) -> int | None:
        # instants 0, every_s, ... before the end (the last frame starts one frame before it)
        return None if self.duration_s is None else max(1, math.ceil(self.duration_s / every_s - 1e-6))


@dataclass
class SampledFrame:
    index: int          # the decoded frame's number in the stream
    t: float            # seconds from the stream's start
    rgb: np.ndarray     # (H, W, 3) uint8


Source = Path | str | bytes | BinaryIO


def _open(source: Source):
    import av
    av.logging.set_level(None)   # FFmpeg's own log lines would go to stderr, per broken packet
    try:
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else
                       str(source) if isinstance(source, (str, Path)) else source, mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoError("bad_video", f"not a video container PyAV/FFmpeg can read: {e}") from None


def probe(container, limits: VideoLimits) -> VideoInfo:
    """The header's facts about the first video stream, checked against the limits."""
    streams = container.streams.video
    if not streams:
        raise VideoError("bad_video", "the file holds no video stream (audio only, or not a video)")
    if not CONTAINERS & set(container.format.name.split(",")):
        raise VideoError("unsupported_video", f"a {container.format.long_name or container.format.name} file "
                                              f"is not a video this service takes: {SEND}")
    s = streams[0]
    width, height = s.codec_context.width, s.codec_context.height
    rate = float(s.average_rate) if s.average_rate else None
    duration = (float(s.duration * s.time_base) if s.duration and s.time_base else
                container.duration / 1e6 if container.duration else None)
    info = VideoInfo(container.format.name, s.codec_context.name, width, height, rate, duration, s.frames or None)
    if not width or not height:
        raise VideoError("bad_video", "the video stream declares no frame size")
    if max(width, height) > limits.max_side:
        raise VideoError("video_too_large", f"{width}x{height} frames; the limit is {limits.max_side} px a side")
    if rate is not None and not (0 < rate <= limits.max_fps):
        raise VideoError("bad_video", f"the header claims {rate:g} frames/s (accepted: up to {limits.max_fps:g})")
    if duration is not None and duration > limits.max_duration_s:
        raise VideoError("video_too_large", f"{duration:.0f} s long; the limit is {limits.max_duration_s:g} s")
    if info.frames and info.frames > limits.max_frames:
        raise VideoError("video_too_large", f"{info.frames} frames; the limit is {limits.max_frames}")
    return info


def read_info(source: Source, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    container = _open(source)
    try:
        return probe(container, limits)
    finally:
        container.close()


def sample(source: Source, every_s: float, limits: VideoLimits = VideoLimits(),
           stats: dict | None = None) -> Iterator[SampledFrame]:
    """The frames at 0, every_s, 2·every_s, ... seconds (the first frame at or after
    each instant), decoded as a stream. A packet that does not decode is skipped and
    counted in `stats["broken_packets"]`; a file that yields no frame at all is
    `bad_video`."""
    import av
    stats = stats if stats is not None else {}
    stats.update(decoded=0, sampled=0, broken_packets=0)
    container = _open(source)
    try:
        info = probe(container, limits)
        stats["info"] = info
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        next_t, start = 0.0, None
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.FFmpegError:   # a container cut short: what was read so far counts
                stats["broken_packets"] += 1
                break
            try:
                frames = packet.decode()
            except av.FFmpegError:
                stats["broken_packets"] += 1
                continue
            for frame in frames:
                stats["decoded"] += 1
                if stats["decoded"] > limits.max_frames:
                    raise VideoError("video_too_large", f"more than {limits.max_frames} frames")
                t = float(frame.time) if frame.time is not None else stats["decoded"] / (info.fps or 25.0)
                start = t if start is None else start
                t -= start
                if t > limits.max_duration_s:
                    raise VideoError("video_too_large", f"longer than the limit of {limits.max_duration_s:g} s")
                if t + 1e-6 < next_t:
                    continue
                yield SampledFrame(stats["decoded"] - 1, round(t, 4), frame.to_ndarray(format="rgb24"))
                stats["sampled"] += 1
                next_t = (math.floor(t / every_s + 1e-6) + 1) * every_s
        if stats["decoded"] == 0:
            raise VideoError("bad_video", "no frame could be decoded (a truncated or corrupt video)")
    finally:
        container.close()
