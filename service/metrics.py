"""Prometheus metrics. Each app (and each worker) owns a registry, so several apps
in one process (tests) do not collide.

API process (GET /metrics):
  ipdfer_http_requests_total{route,method,status}        requests answered
  ipdfer_http_request_duration_seconds{route,method}     latency histogram
  ipdfer_queue_depth                                     jobs waiting or in flight (read at scrape)
  ipdfer_workers_ready                                   workers with a fresh heartbeat (at scrape)
  ipdfer_dead_letter_jobs                                length of the dead-letter stream (at scrape)
  ipdfer_dead_lettered_total                             requests answered 500 after dead-lettering
  ipdfer_batch_size                                      size of the model batch that served a request
  ipdfer_model_seconds                                   that batch's model time (detect + encoders)
  ipdfer_faces_per_image                                 faces found per /predict image
Worker process (`ipdfer worker`, on IPDFER_METRICS_PORT when set):
  ipdfer_worker_batch_size / ipdfer_worker_batch_seconds  per batch
  ipdfer_worker_jobs_total{outcome}                       answered / failed / duplicate / expired
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MODEL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
FACE_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("ipdfer_http_requests_total", "HTTP requests answered",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("ipdfer_http_request_duration_seconds", "HTTP request latency",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("ipdfer_queue_depth", "Jobs waiting or in flight", registry=r)
        self.workers_ready = Gauge("ipdfer_workers_ready", "Workers with a fresh heartbeat", registry=r)
        self.dead_letter_jobs = Gauge("ipdfer_dead_letter_jobs", "Jobs in the dead-letter stream", registry=r)
        self.face_states = Gauge("ipdfer_face_states", "Face states kept for GET /neutralize (in process)",
                                 registry=r)
        self.face_state_bytes = Gauge("ipdfer_face_state_bytes", "Bytes of those face states (in process)",
                                      registry=r)
        self.dead_lettered = Counter("ipdfer_dead_lettered", "Requests answered 500 after their job "
                                     "was dead-lettered", registry=r)
        self.batch_size = Histogram("ipdfer_batch_size", "Size of the model batch that served a request",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.model_seconds = Histogram("ipdfer_model_seconds", "Model time (detect + encoders) of the "
                                       "batch that served a request", buckets=MODEL_BUCKETS, registry=r)
        self.faces = Histogram("ipdfer_faces_per_image", "Faces found per /predict image",
                               buckets=FACE_BUCKETS, registry=r)

    def observe_reply(self, reply: dict) -> None:
        t = reply.get("timings", {})
        if "batch_size" in reply:
            self.batch_size.observe(reply["batch_size"])
        self.model_seconds.observe((t.get("detect_ms", 0.0) + t.get("align_ms", 0.0)
                                    + t.get("model_ms", 0.0)) / 1000)
        if "faces" in reply:
            self.faces.observe(len(reply["faces"]))


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.batch_size = Histogram("ipdfer_worker_batch_size", "Jobs per model batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("ipdfer_worker_batch_seconds", "Seconds per model batch",
                                       buckets=MODEL_BUCKETS, registry=r)
        self.jobs = Counter("ipdfer_worker_jobs", "Jobs by outcome", ["outcome"], registry=r)
