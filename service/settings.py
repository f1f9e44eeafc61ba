"""Service configuration: one pydantic-settings class, read from the environment.

Every variable is `IPDFER_<FIELD>` (e.g. `IPDFER_MAX_BATCH_SIZE=8`); the Redis URL
is also read from the conventional plain `REDIS_URL`. A `.env` file in the working
directory is read too. This class is the only place a serving default is declared:
the command-line options of `ipdfer serve`, `worker` and `predict` are made from its
fields (`add_options`), and the settings tables of the README and
docs/configuration.md are printed from it (`ipdfer settings --markdown`;
tests/test_config_docs.py compares).
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.images import PHOTO_MIN_FACE_SIZE
from model.serving.plan import PRECISIONS, RUNTIMES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IPDFER_", env_file=".env", extra="ignore", populate_by_name=True,
    )

    # --- where jobs go -----------------------------------------------------------
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("redis_url", "IPDFER_REDIS_URL", "REDIS_URL"),
        description="Redis URL (also plain REDIS_URL). Unset: in-process mode, the API "
                    "process runs the model itself with the same batching loop.")
    queue_prefix: str = Field("ipdfer", description="Prefix of every Redis key this service uses.")

    # --- dynamic batching -------------------------------------------------------
    max_batch_size: int = Field(16, ge=1, le=1024, description="Most jobs in one model batch. Where several "
                                "batch loops or workers share the queue, each takes at most its fair share of the "
                                "jobs outstanding, so none runs dry while another holds the backlog.")
    max_wait_ms: float = Field(10.0, ge=0, description="Longest a job waits for a batch to fill, "
                               "measured from the oldest job in the batch.")
    batch_alone_pixels: int = Field(1_000_000, ge=1, description="A photo over this many pixels (its "
                                    "detection alone takes ~0.1-1 s) runs in a model call of its own after the "
                                    "rest of its batch, whose answers go out first.")
    workers_inprocess: int | None = Field(None, ge=1, le=16, description="In-process mode: model copies, "
                                          "each owned by its own batch loop and thread (an Analyzer is not "
                                          "thread-safe). Unset: 1 on CUDA, else one per CPU core up to 4.")

    # --- queue, results, timeouts -----------------------------------------------
    queue_maxlen: int = Field(256, ge=1, description="Jobs waiting or in flight before /predict "
                              "answers 503 with Retry-After (backpressure).")
    request_timeout_s: float = Field(30.0, gt=0, description="Longest a request waits for its "
                                     "result before answering 504.")
    result_ttl_s: int = Field(60, ge=1, description="Expiry of a job's result in Redis (a client "
                              "that gave up leaves nothing behind).")
    face_ttl_s: int = Field(600, ge=1, description="How long a face of a /predict stays available "
                            "to GET /neutralize?face_id=... (404 after).")
    face_cache_max: int = Field(10_000, ge=1, description="Most faces kept for GET /neutralize, in "
                                "process and in Redis alike (oldest dropped first).")
    face_cache_max_mb: float = Field(200.0, gt=0, description="Most megabytes of face states kept for "
                                     "GET /neutralize (a state is ~30 KB zlib'd), in process and in Redis alike "
                                     "(oldest dropped first): with compose's 512 MB Redis, jobs keep room.")
    visibility_timeout_s: float = Field(10.0, gt=0, description="A job delivered to a worker and "
                                        "not acknowledged within this is reclaimed by another worker "
                                        "(XAUTOCLAIM). Must exceed the slowest batch and stay below "
                                        "request_timeout_s, or a crashed worker's jobs are reclaimed "
                                        "only after their clients got a 504 (refused otherwise).")
    max_attempts: int = Field(3, ge=1, description="Deliveries of a job before it goes to the "
                              "dead-letter stream and its client gets a 500 with the reason.")
    dead_letter_maxlen: int = Field(10_000, ge=1, description="Dead-letter stream length cap.")
    heartbeat_interval_s: float = Field(2.0, gt=0, description="Worker heartbeat period; a worker "
                                        "counts as alive for 3 periods after its last beat.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) sent with 503 answers.")

    # --- request limits -----------------------------------------------------------
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest request body, "
                                "enforced while reading (413).")
    batch_max_images: int = Field(32, ge=1, le=256, description="POST /predict/batch: most images in "
                                  "one request (413 beyond).")
    batch_max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="POST /predict/batch: largest "
                                 "request body (413); each image also keeps max_body_bytes.")
    body_timeout_s: float = Field(30.0, gt=0, description="Longest a client may take to send its request "
                                  "body (408 after).")
    header_timeout_s: float = Field(10.0, gt=0, description="`ipdfer serve`: longest a client may take "
                                    "to send a request's line and headers, from connecting or from the previous "
                                    "response (408 and closed after): slow clients cannot hold connections.")
    max_connections: int = Field(1000, ge=1, description="`ipdfer serve`: most concurrent connections "
                                 "and requests (503 beyond); idle keep-alive connections close after 5 s.")
    max_pixels: int = Field(40_000_000, ge=1, description="Largest image (width x height), checked "
                            "from the header before decoding (413).")
    decode_max_side: int = Field(2560, ge=64, description="Uploads with a longer side are decoded "
                                 "smaller (JPEG inside the codec, other formats right after decoding; boxes "
                                 "and landmarks are still in the upload's pixels): memory per image stays "
                                 "~20 MB whatever was sent. 2x the detector's 1280 px: the smallest face the "
                                 "detector finds still spans >= 40 decoded pixels.")
    max_faces: int = Field(16, ge=1, le=64, description="Most faces analysed per image (best detections "
                           "first; the reply's faces_skipped counts the rest). A request's max_faces "
                           "can lower it, not raise it: one crowded photo cannot hold a batch for seconds.")
    min_image_side: int = Field(16, ge=1, description="Smallest accepted image side in pixels (422 "
                                "below: no face can be found in fewer pixels).")
    api_key: SecretStr | None = Field(None, description="If set, /predict and /neutralize require "
                                      "this value in the X-API-Key header (401 otherwise).")
    protect_operations: bool = Field(False, description="With api_key set: /readyz (worker names, PIDs), "
                                     "/metrics and the API docs (/docs, /redoc, /openapi.json) require the "
                                     "key too. Off by default so probes and Prometheus scrape without it; "
                                     "/healthz and the web page stay open either way.")

    # --- videos (POST /videos) -----------------------------------------------------
    video_max_mb: float = Field(256.0, gt=0, description="Largest video upload, in megabytes (413).")
    video_body_timeout_s: float = Field(300.0, gt=0, description="Longest a client may take to send a video "
                                        "upload (408 after).")
    video_max_duration_s: float = Field(600.0, gt=0, description="Longest video, from its header or while "
                                        "decoding (413 / status failed).")
    video_max_side: int = Field(3840, ge=64, description="Largest frame side of a video (413).")
    video_dir: Path | None = Field(None, description="Where uploaded videos wait until analysed (deleted "
                                   "after); unset: the system's temporary folder.")
    video_max_active: int = Field(1, ge=1, le=16, description="Videos analysed at once (their frames share "
                                  "the batches with /predict); the rest wait as status queued.")
    video_max_waiting: int = Field(8, ge=0, description="Videos waiting for a slot before POST /videos "
                                   "answers 503 with Retry-After.")
    video_frames_in_flight: int = Field(8, ge=1, le=256, description="A video's sampled frames queued at once "
                                        "as jobs: enough to fill a batch, few enough to leave room to /predict.")
    video_max_rows: int = Field(30_000, ge=1, description="Most result rows a video may make (sampled frames "
                                "from the header x max_faces; 413 beyond): results are kept whole, in memory or Redis.")
    video_ttl_s: int = Field(3600, ge=1, description="How long a video's status and result stay available "
                             "to GET /videos/{video_id} after its last change (404 after).")

    # --- model -------------------------------------------------------------------
    weights_dir: Path | None = Field(None, description="Weights folder (manifest + state_dict); "
                                     "unset: the package's weights/.")
    device: str | None = Field(None, description="torch device; unset: cuda if available else cpu.")
    flip_tta: bool | None = Field(None, description="Expression probabilities average the face and its "
                                  "mirror image (true) or come from the face alone (false); unset: as the weights "
                                  "are served (`flip_tta` in their config, as the model card's figures). false on "
                                  "weights served with the mirror pass skips it (encoders 25% faster at batch 1, "
                                  "40% at 32) and costs accuracy.")
    mirror_margin: float = Field(
        0.3, ge=0, le=1, description="With the mirror pass: only faces whose one-pass margin (top-1 minus "
                                     "top-2 probability) is below this get it, the others keep their one-pass "
                                     "probabilities. 0.3 (chosen on FER2013 validation) mirrors ~37% of faces for "
                                     "the accuracy of mirroring all; 1 = every face, 0 = none.")
    precision: Literal[PRECISIONS] = Field(
        "auto", description="Numeric precision of the encoders: auto = fp16 autocast on CUDA, fp32 on the "
                            "CPU. bf16 (CPUs with native bf16: AVX-512 BF16 / AMX) was 11% faster at 16 clients "
                            "and slower for a lone client, and moves probabilities by up to 0.04; asked for on "
                            "a CPU without it, it is refused. int8 (CPU): the encoders' quantized graph "
                            "(weights/encoders.int8.onnx) in ONNX Runtime, 1.6-1.7x the faces/s on one thread, 1.2-1.4x on two; FER2013 test "
                            "67.68% vs 67.82%, same top label for 97.8% of faces. Renders stay fp32.")
    min_face_size: int = Field(PHOTO_MIN_FACE_SIZE, ge=12, description="Smallest face MTCNN looks for, in pixels of the photo "
                               "as detected (after the 1280 px cap). 40: the smallest faces the model was trained "
                               "on (FER2013's); 20 also finds smaller ones at ~1.6x the detection time.")
    runtime: Literal[RUNTIMES] = Field(
        "auto", description="What runs the per-request encoders and MTCNN's networks: auto = ONNX Runtime "
                            "on the CPU in fp32 when the weights folder has its encoders.onnx and weights/mtcnn/ "
                            "the graphs of the installed facenet-pytorch (ipdfer export-onnx; encoders 2.7x the "
                            "faces/s at batch 1 on an AVX2 CPU), else PyTorch; each part is chosen on its own. "
                            "Renders always run in PyTorch.")
    heap_trim_interval_s: float = Field(2.0, ge=0, description="After a batch, give freed heap memory "
                                        "back to the system (glibc malloc_trim) at most this often per batch "
                                        "loop; 0: never. Without it RSS wandered 15-30% above its start under "
                                        "varied traffic; a trim costs ~0.1-0.3 s.")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads for the model. Unset: "
                                      "in process on the CPU, the cores divided among the batch loops (1 each on "
                                      "2 cores; 2 threads' spinning competes with the API's own thread: "
                                      "docs/benchmarks.md, load test); elsewhere torch's default.")

    # --- processes ---------------------------------------------------------------
    host: str = Field("127.0.0.1", description="`ipdfer serve` bind address.")
    port: int = Field(8000, ge=0, le=65535, description="`ipdfer serve` port.")
    worker_name: str | None = Field(None, description="Consumer name of a worker; unset: host-pid.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="`ipdfer worker`: serve its "
                                     "own Prometheus metrics (batch sizes, model time) on this port.")
    log_level: str = Field("info", description="Logging level.")

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.redis_url == "":
            self.redis_url = None
        if self.visibility_timeout_s >= self.request_timeout_s:
            raise ValueError(f"visibility_timeout_s ({self.visibility_timeout_s:g}) must be below "
                             f"request_timeout_s ({self.request_timeout_s:g}): a crashed worker's jobs are "
                             "reclaimed after the visibility timeout, and their clients wait only the request timeout")
        return self

    @classmethod
    def from_args(cls, args: Any, names: tuple[str, ...] = (), **renamed: str) -> "Settings":
        """The environment's settings, overridden by the command-line options given:
        `names` are options spelled like fields; `renamed` maps field=option."""
        pairs = {**{n: n for n in names}, **renamed}
        return cls(**{f: getattr(args, o) for f, o in pairs.items() if getattr(args, o, None) is not None})

    def inprocess_plan(self, cuda: bool) -> tuple[int, int | None]:
        """(batch loops, torch threads) of in-process mode: what is set, else one loop
        per core (up to 4) sharing the cores on the CPU, one loop on CUDA."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        loops = self.workers_inprocess or (1 if cuda else min(cores, 4))
        threads = self.torch_threads or (None if cuda else max(1, cores // loops))
        return loops, threads

    def configure_logging(self) -> None:
        import logging
        logging.basicConfig(level=self.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def plan_options(self) -> dict[str, Any]:
        """What `ServingPlan.resolve` takes from the settings (threads: torch's count,
        set by the caller before the model loads)."""
        return {"device": self.device, "precision": self.precision, "runtime": self.runtime,
                "flip_tta": self.flip_tta, "mirror_margin": self.mirror_margin}

    @property
    def video_max_bytes(self) -> int:
        return int(self.video_max_mb * (1 << 20))

    @property
    def face_cache_max_bytes(self) -> int:
        return int(self.face_cache_max_mb * (1 << 20))

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def heartbeat_ttl_s(self) -> float:
        return 3.0 * self.heartbeat_interval_s

    def consumer_name(self) -> str:
        return self.worker_name or f"{socket.gethostname()}-{os.getpid()}"

    @classmethod
    def variable(cls, name: str) -> str:
        return f"IPDFER_{name.upper()}" + (" or REDIS_URL" if name == "redis_url" else "")

    @classmethod
    def shown_default(cls, name: str) -> str:
        default = cls.model_fields[name].default
        if default is None:
            return "unset"
        if isinstance(default, bool):
            return str(default).lower()
        return f"{default:g}" if isinstance(default, float) else str(default)

    @classmethod
    def markdown_table(cls, names: list[str] | None = None, short: bool = False) -> str:
        """The settings as a Markdown table (`short`: each description's first sentence)."""
        rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
        for name in names or list(cls.model_fields):
            text = cls.model_fields[name].description or ""
            text = first_sentence(text) if short else text
            default = cls.shown_default(name)
            variable = " or ".join(f"`{v}`" for v in cls.variable(name).split(" or "))
            rows.append(f"| {variable} | {'unset' if default == 'unset' else f'`{default}`'} | "
                        f"{text.replace('|', '/')} |")
        return "\n".join(rows) + "\n"


def first_sentence(text: str) -> str:
    return re.split(r"(?<!e\.g)(?<=[A-Za-z0-9)'])\. (?=\S)", text)[0].rstrip(".") + "."


def _option_type(annotation: Any) -> tuple[Any, tuple | None]:
    """(argparse type, choices) of a field's annotation: X | None -> X; Literal -> choices."""
    kind = annotation
    if typing.get_origin(kind) is not Literal:
        kind = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    if typing.get_origin(kind) is Literal:
        return str, typing.get_args(kind)
    if kind is bool:
        return lambda v: v.lower() in ("1", "true", "yes", "on"), None
    if kind is SecretStr:
        return str, None
    return kind, None


# option spellings that differ from the field's (kept from earlier releases)
OPTION_NAMES = {"worker_name": "--name", "torch_threads": "--threads"}


def add_options(parser: argparse.ArgumentParser, names: tuple[str, ...], **spellings: tuple[str, ...]) -> None:
    """One command-line option per setting in `names` (--field-name, OPTION_NAMES'
    or `spellings[name]`), its help and default taken from the field; given options
    override the environment (`Settings.from_args(args, names)`)."""
    for name in names:
        field = Settings.model_fields[name]
        kind, choices = _option_type(field.annotation)
        first = first_sentence(field.description or "").rstrip(".")
        flags = spellings.get(name) or (OPTION_NAMES.get(name, "--" + name.replace("_", "-")),)
        parser.add_argument(*flags, dest=name, type=kind,
                            choices=choices, metavar=None if choices else "N" if kind is int else name.split("_")[-1].upper(),
                            help=f"{first} ({Settings.variable(name)}, default {Settings.shown_default(name)})")


def main(argv: list[str] | None = None) -> int:
    """`ipdfer settings`: the settings in effect here (environment, .env), or the tables."""
    parser = argparse.ArgumentParser(prog="ipdfer settings")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true", help="print every setting as a Markdown table")
    parser.add_argument("--short", nargs="*", metavar="FIELD",
                        help="with --markdown: only these settings, first sentences (the README's table)")


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        print(Settings.markdown_table(args.short or None, short=args.short is not None), end="")
        return 0
    settings = Settings()
    for name in Settings.model_fields:
        value = getattr(settings, name)
        shown = "(set)" if isinstance(value, SecretStr) else value
        print(f"{Settings.variable(name).split()[0]}={'' if value is None else shown}")
    return 0
