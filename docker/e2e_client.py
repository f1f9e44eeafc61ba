"""HTTP side of docker/e2e.sh (standard library only: it also runs inside the image).

    python e2e_client.py ready URL [TIMEOUT_S]       wait for GET /readyz 200 with a model loaded
    python e2e_client.py roundtrip URL PHOTO         POST /predict?neutral=true + GET /neutralize, checked
    python e2e_client.py burst URL PHOTO DIR         requests until DIR/killed exists and 5 more were answered 200

Each prints one line per check and exits 1 on the first failure. burst writes
DIR/answered (a count, for e2e.sh to time the kill) and DIR/burst.json (every answer).
"""
from __future__ import annotations

import base64
import json
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RETRYABLE = {503, 504}  # service/README.md: 503 + Retry-After (no worker, queue full), 504 (timeout)
LABELS = {"neutral", "happy", "sad", "surprise", "fear", "disgust", "anger"}


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def ready(url: str, timeout_s: float = 300) -> None:
    t0, last = time.monotonic(), None
    while time.monotonic() - t0 < timeout_s:
        try:
            status, _, body = http("GET", f"{url}/readyz", timeout=10)
            last = f"{status} {body[:200]!r}"
            if status == 200:
                info = json.loads(body)
                workers = info.get("workers") or []
                if not info["ready"] or not workers or not all(w.get("sha256") for w in workers):
                    fail(f"/readyz 200 without a loaded model: {info}")
                print(f"ok   /readyz 200 after {time.monotonic() - t0:.1f} s: ready, mode={info['mode']}, "
                      f"{info['detail']!r}, models: "
                      + ", ".join(f"{w.get('worker')} {w.get('device')} sha256 {w['sha256'][:12]}" for w in workers),
                      flush=True)
                return
        except (OSError, ValueError) as exc:  # not listening yet
            last = repr(exc)
        time.sleep(1)
    fail(f"/readyz not 200 within {timeout_s:.0f} s (last: {last})")


def roundtrip(url: str, photo: Path) -> None:
    data = photo.read_bytes()
    t0 = time.monotonic()
    status, headers, body = http("POST", f"{url}/predict?neutral=true", data, {"Content-Type": "image/jpeg"})
    if status != 200:
        fail(f"POST /predict: {status} {body[:300]!r}")
    out = json.loads(body)
    for key in ("request_id", "faces", "model", "worker", "batch_size", "timings"):
        if key not in out:
            fail(f"POST /predict: no {key!r} in {sorted(out)}")
    if not out["faces"]:
        fail("POST /predict: no face found on the astronaut")
    face = out["faces"][0]
    for key in ("face_id", "box", "landmarks", "score", "expression", "pose", "neutral_png"):
        if key not in face:
            fail(f"POST /predict: face has no {key!r}")
    expr = face["expression"]
    total = sum(expr["probabilities"].values())
    if set(expr["probabilities"]) != LABELS or abs(total - 1) > 1e-3 or expr["label"] not in LABELS:
        fail(f"POST /predict: bad expression {expr}")
    if not base64.b64decode(face["neutral_png"]).startswith(PNG_MAGIC):
        fail("POST /predict: neutral_png is not a PNG")
    print(f"ok   POST /predict 200 in {time.monotonic() - t0:.2f} s: {len(out['faces'])} face(s), "
          f"{expr['label']} {expr['confidence']:.2f}, pose {face['pose']}, worker {out['worker']}, "
          f"model {out['model'].get('name')} {out['model'].get('version')} on {out['model'].get('device')}",
          flush=True)
    t0 = time.monotonic()
    status, headers, png = http("GET", f"{url}/neutralize?face_id={face['face_id']}")
    if status != 200 or headers.get("content-type") != "image/png" or not png.startswith(PNG_MAGIC):
        fail(f"GET /neutralize: {status} {headers.get('content-type')} {png[:80]!r}")
    print(f"ok   GET /neutralize?face_id={face['face_id']} 200 image/png, {len(png)} bytes, PNG magic, "
          f"in {time.monotonic() - t0:.2f} s", flush=True)
    status, _, body = http("GET", f"{url}/neutralize?face_id={'0' * 32}")
    if status != 404:
        fail(f"GET /neutralize with an unknown face: {status}, expected 404")
    print("ok   GET /neutralize with an unknown face_id: 404", flush=True)


def burst(url: str, photo: Path, folder: Path, concurrency: int = 4, deadline_s: float = 300) -> None:
    """Requests until the worker was killed (folder/killed, written by e2e.sh) and 5 requests
    sent after that were answered 200. Every request carries its own X-Request-ID and must
    get exactly one answer: 200 (its id echoed) or a retryable 503/504."""
    data, lock, answers = photo.read_bytes(), threading.Lock(), []
    killed = folder / "killed"
    stop = threading.Event()
    t0 = time.monotonic()

    def after_kill_ok() -> int:
        return sum(1 for a in answers if a["status"] == 200 and a["sent_after_kill"])

    def client() -> None:
        while not stop.is_set():
            rid = uuid.uuid4().hex
            sent_after_kill = killed.exists()
            t, sent_epoch = time.monotonic(), time.time()
            try:
                status, headers, body = http("POST", f"{url}/predict", data,
                                             {"Content-Type": "image/jpeg", "X-Request-ID": rid}, timeout=90)
                echoed = json.loads(body).get("request_id") if status == 200 else headers.get("x-request-id")
            except OSError as exc:  # no answer at all: counted as a failure below
                status, echoed, headers = None, repr(exc), {}
            a = {"id": rid, "status": status, "echoed": echoed, "sent_at": round(t - t0, 2),
                 "took_s": round(time.monotonic() - t, 2), "sent_after_kill": sent_after_kill,
                 "sent_epoch": sent_epoch, "done_epoch": time.time(),
                 "retry_after": headers.get("retry-after")}
            with lock:
                answers.append(a)
                (folder / "answered").write_text(str(len(answers)))
                if after_kill_ok() >= 5 or time.monotonic() - t0 > deadline_s:
                    stop.set()
            if status == 503:
                time.sleep(float(headers.get("retry-after") or 1))  # as a client should

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (folder / "burst.json").write_text(json.dumps(answers, indent=1))
    counts: dict = {}
    for a in answers:
        counts[a["status"]] = counts.get(a["status"], 0) + 1
    print(f"     burst: {len(answers)} requests in {time.monotonic() - t0:.1f} s, {concurrency} at a time; "
          f"answers by status: {dict(sorted(counts.items(), key=str))}", flush=True)
    ids = [a["id"] for a in answers]
    if len(set(ids)) != len(ids):
        fail("a request id was used twice")
    bad = [a for a in answers if a["status"] != 200 and a["status"] not in RETRYABLE]
    if bad:
        fail(f"{len(bad)} answers neither 200 nor retryable: {bad[:3]}")
    wrong = [a for a in answers if a["status"] == 200 and a["echoed"] != a["id"]]
    if wrong:
        fail(f"{len(wrong)} 200 answers carry another request's id: {wrong[:3]}")
    if not killed.exists():
        fail("the burst ended before the worker was killed")
    t_kill = float(killed.read_text())
    in_flight = [a for a in answers if a["sent_epoch"] < t_kill < a["done_epoch"]]
    if not in_flight:
        fail("no request was in flight when the worker was killed")
    print(f"     {len(in_flight)} requests in flight at the kill: "
          + ", ".join(f"{a['status']} after {a['took_s']} s" for a in in_flight), flush=True)
    if after_kill_ok() < 5:
        fail(f"only {after_kill_ok()} requests sent after the kill were answered 200 within {deadline_s:.0f} s")
    during = [a for a in answers if a["status"] != 200]
    first_ok = min((a["sent_at"] for a in answers if a["status"] == 200 and a["sent_after_kill"]), default=None)
    print(f"ok   every request answered exactly once (ids unique and echoed); {len(during)} retryable "
          f"answers around the kill; first request sent after the kill and answered 200 was sent at "
          f"t={first_ok} s", flush=True)


if __name__ == "__main__":
    cmd, url, *rest = sys.argv[1:]
    url = url.rstrip("/")
    if cmd == "ready":
        ready(url, float(rest[0]) if rest else 300)
    elif cmd == "roundtrip":
        roundtrip(url, Path(rest[0]))
    elif cmd == "burst":
        burst(url, Path(rest[0]), Path(rest[1]))
    else:
        fail(f"unknown command {cmd}")
