"""Deployment files, checked without Docker (no daemon here or in CI): docker-compose.yml,
docker/Dockerfile (CUDA workers), docker/Dockerfile.cpu (API, CPU workers),
.dockerignore, docker/prometheus.yml and docker/healthcheck.py.

What a `docker compose up` would trip over and can be checked by reading: the services,
profiles, ports, dependencies and healthchecks; the GPU reservation; every command a
container runs, parsed by the real `ipdfer` argparse; every IPDFER_* variable a real
Settings field; every file a Dockerfile COPYs present and inside the build context;
non-root users; pins equal to pyproject.toml's; nothing downloaded at run time. The
health check script runs for real (against a small HTTP server and the suite's Redis),
and a wheel built from the sources carries the web page.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from service.cli import SUBCOMMANDS, build_parser
from service.settings import Settings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = {"cuda": ROOT / "docker" / "Dockerfile", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE_SERVICES = ("api", "worker", "worker-cpu")  # services that run an ipdfer image
DOWNLOADERS = re.compile(r"\b(curl|wget|huggingface|hf_hub|torch\.hub|gdown|pip\s+install)\b|https?://", re.I)

# --- compose: load with compose's own variable interpolation -----------------------------

_VAR = re.compile(r"\$(?:\$|\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|(?P<bare>\w+))")


def interpolate(value, env: dict[str, str]):
    """${VAR}, ${VAR:-default}, ${VAR-default}, $VAR and $$, as docker compose does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        got = env.get(name)
        if m.group("op") == ":-" and not got:
            return m.group("default")
        if m.group("op") == "-" and got is None:
            return m.group("default")
        return got or ""
    return _VAR.sub(sub, value)


def compose(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml as compose sees it with this shell environment (none by default)."""
    doc = interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})
    for svc in doc["services"].values():  # compose casts these fields to int after interpolation
        deploy = svc.get("deploy") or {}
        if "replicas" in deploy:
            deploy["replicas"] = int(deploy["replicas"])
    return doc


def default_services(doc: dict) -> set[str]:
    return {name for name, svc in doc["services"].items() if not svc.get("profiles")}


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(a + b for a, b in parts) == text, f"bad duration {text!r}"
    return sum(float(a) * units[b] for a, b in parts)


def size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).lower())
    assert m, f"bad size {text!r}"
    return int(m.group(1)) * 1024 ** " kmg".index(m.group(2) or " ")


def env_of(svc: dict) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return env


# --- Dockerfiles: a small parser (continuations, comments, flags, exec form, stages) ----


@dataclass
class Instruction:
    cmd: str
    args: str
    flags: dict[str, str] = field(default_factory=dict)

    @property
    def exec_form(self) -> list[str] | None:
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages)."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue  # comments (parser directives included), also inside a continuation
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        cmd, _, rest = line.partition(" ")
        cmd, rest = cmd.upper(), rest.strip()
        flags = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key] = value
            rest = rest.strip()
        ins = Instruction(cmd, rest, flags)
        if cmd == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert cmd == "ARG", f"{path.name}: {cmd} before the first FROM"
            key, _, value = rest.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(ins)
    return global_args, stages


def env_pairs(ins: Instruction) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(ins.args))


def image_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.all("ENV"):
        env.update(env_pairs(ins))
    return env


def copies(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of the stage's COPY/ADD from the build context."""
    out = []
    for ins in stage.all("COPY") + stage.all("ADD"):
        if "from" in ins.flags:
            continue
        words = ins.exec_form or shlex.split(ins.args)
        out.append((words[:-1], words[-1]))
    return out


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, Path, dict[str, str], list[Stage]]:
    path = DOCKERFILES[request.param]
    global_args, stages = parse_dockerfile(path)
    return request.param, path, global_args, stages


# --- .dockerignore: Docker's matching (last matching pattern wins, parents count) -------


def dockerignore() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").strip().strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        patterns.append((negate, re.compile(rx + r"\Z")))
    return patterns


def ignored(path: str, patterns=None) -> bool:
    patterns = dockerignore() if patterns is None else patterns
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for negate, rx in patterns:
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


# === docker-compose.yml =====================================================================


def test_compose_services_and_profiles():
    doc = compose()
    assert set(doc["services"]) == {"redis", "api", "worker", "worker-cpu", "prometheus"}
    # plain `docker compose up`: Redis, the API and a GPU worker; the rest behind profiles
    assert default_services(doc) == {"redis", "api", "worker"}
    assert doc["services"]["worker-cpu"]["profiles"] == ["cpu"]
    assert doc["services"]["prometheus"]["profiles"] == ["monitoring"]
    for name, svc in doc["services"].items():
        for dep, how in (svc.get("depends_on") or {}).items():
            assert dep in default_services(doc), f"{name} depends on {dep}, which plain `up` does not start"
            assert how["condition"] in ("service_started", "service_healthy")
        if name in IMAGE_SERVICES:
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
            assert svc.get("init") is True, f"{name}: signals must reach ipdfer (init: true)"
            assert svc.get("restart") == "unless-stopped", name
        assert ":" in svc["image"] and not svc["image"].endswith(":latest"), f"{name}: pin the image tag"


def test_redis_is_sized_and_configured_as_a_queue():
    redis = compose()["services"]["redis"]
    cmd = redis["command"]
    assert cmd[0] == "redis-server"
    opts = dict(zip(cmd[1::2], cmd[2::2]))
    # evicting would silently drop accepted jobs or results: refuse writes instead (503)
    assert opts["--maxmemory-policy"] == "noeviction"
    limit = size_bytes(redis["deploy"]["resources"]["limits"]["memory"])
    assert 0 < size_bytes(opts["--maxmemory"]) < limit, "maxmemory must leave headroom under the container limit"
    assert opts["--appendonly"] == "no" and opts["--save"] == ""
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis, "Redis must not be published on the host by default"
    bigger = compose({"REDIS_MAXMEMORY": "2gb", "REDIS_MEMORY_LIMIT": "3g"})["services"]["redis"]
    assert "2gb" in bigger["command"] and bigger["deploy"]["resources"]["limits"]["memory"] == "3g"


def test_api_service():
    doc = compose()
    api = doc["services"]["api"]
    assert api["build"] == {"context": ".", "dockerfile": "docker/Dockerfile.cpu"}
    assert api["ports"] == ["8000:8000"]
    assert compose({"IPDFER_PUBLISH_PORT": "9000"})["services"]["api"]["ports"] == ["9000:8000"]
    args = build_parser("serve").parse_args(api["command"])
    assert (args.host, args.port) == ("0.0.0.0", 8000)  # the container port published above
    env = env_of(api)
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["REDIS_URL"].split("//")[1].split(":")[0] in doc["services"]
    assert env["IPDFER_API_KEY"] is None  # passed through from the host only when set there
    moved = compose({"REDIS_URL": "rediss://:pw@redis.example:6380/2"})
    assert env_of(moved["services"]["api"])["REDIS_URL"] == "rediss://:pw@redis.example:6380/2"
    hc = api["healthcheck"]
    assert hc["test"] == ["CMD", "python", "/app/healthcheck.py", "api"]
    assert duration_s(hc["timeout"]) < duration_s(hc["interval"])


def test_gpu_and_cpu_workers():
    doc = compose()
    gpu, cpu = doc["services"]["worker"], doc["services"]["worker-cpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile" and cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and (d["count"] == "all" or d["count"] >= 1)
               for d in devices), devices
    assert "reservations" not in (cpu.get("deploy", {}).get("resources") or {})
    # CPU: one single-threaded worker per core (2 x 1 served 1.4-1.5x 1 x 2's requests)
    assert gpu["deploy"]["replicas"] == 1 and cpu["deploy"]["replicas"] == 2
    assert build_parser("worker").parse_args(cpu["command"]).torch_threads == 1
    scaled = compose({"IPDFER_GPU_WORKERS": "3", "IPDFER_CPU_WORKERS": "2", "IPDFER_CPU_THREADS": "4"})
    assert scaled["services"]["worker"]["deploy"]["replicas"] == 3
    assert scaled["services"]["worker-cpu"]["deploy"]["replicas"] == 2
    cpu_args = build_parser("worker").parse_args(scaled["services"]["worker-cpu"]["command"])
    assert (cpu_args.device, cpu_args.torch_threads) == ("cpu", 4)
    for svc in (gpu, cpu):
        hc = svc["healthcheck"]
        assert hc["test"] == ["CMD", "python", "/app/healthcheck.py", "worker"]
        # no heartbeat until the weights are loaded and warm: don't count that as failures
        assert duration_s(hc["start_period"]) >= 60
        # SIGTERM: the worker finishes its batch; leave it time before SIGKILL
        assert duration_s(svc["stop_grace_period"]) >= 10
        assert env_of(svc)["REDIS_URL"] == "redis://redis:6379/0"


@pytest.mark.parametrize("service", IMAGE_SERVICES)
def test_container_commands_parse_with_the_real_cli(service, monkeypatch):
    """ENTRYPOINT + compose command, through `ipdfer`'s own argparse; the environment
    through the real Settings."""
    svc = compose()["services"][service]
    _, stages = parse_dockerfile(ROOT / svc["build"]["dockerfile"])
    entry = stages[-1].all("ENTRYPOINT")[-1].exec_form
    assert entry == ["ipdfer"] and PYPROJECT["project"]["scripts"]["ipdfer"] == "service.cli:main"
    argv = svc["command"]
    assert argv[0] in SUBCOMMANDS
    build_parser(argv[0]).parse_args(argv)  # SystemExit on an unknown flag or bad value
    for key in list(os.environ):
        if key.startswith("IPDFER_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    for key, value in env_of(svc).items():
        if value is not None:
            monkeypatch.setenv(key, str(value))
    settings = Settings(_env_file=None)
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.max_batch_size == 16 and settings.queue_maxlen == 256


def test_environment_names_are_real_settings():
    """A misspelt IPDFER_* variable is silently ignored by pydantic-settings: catch it here."""
    fields = set(Settings.model_fields)
    names = set()
    for svc in compose()["services"].values():
        names |= set(env_of(svc))
    for path in DOCKERFILES.values():
        names |= set(image_env(parse_dockerfile(path)[1][-1]))
    ours = {n for n in names if n.startswith("IPDFER_")}
    assert ours, names
    unknown = {n for n in ours if n[len("IPDFER_"):].lower() not in fields}
    assert not unknown, f"not Settings fields: {sorted(unknown)}"


def test_prometheus_scrapes_the_api_and_every_worker():
    doc = compose()
    prom = doc["services"]["prometheus"]
    source, target, *_ = prom["volumes"][0].split(":")
    assert (ROOT / source).is_file() and target == "/etc/prometheus/prometheus.yml"
    assert f"--config.file={target}" in prom["command"]
    config = yaml.safe_load((ROOT / source).read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    api_target = jobs["ipdfer-api"]["static_configs"][0]["targets"]
    assert api_target == ["api:8000"] and jobs["ipdfer-api"]["metrics_path"] == "/metrics"
    dns = jobs["ipdfer-workers"]["dns_sd_configs"][0]
    assert set(dns["names"]) == {"worker", "worker-cpu"}
    for name in dns["names"]:
        args = build_parser("worker").parse_args(doc["services"][name]["command"])
        assert args.metrics_port == dns["port"], name


# === Dockerfiles ===========================================================================


def test_multi_stage_with_a_pinned_python_base(dockerfile):
    name, path, _, stages = dockerfile
    assert len(stages) >= 2, f"{name}: build and runtime stages"
    names = [s.name for s in stages]
    for stage in stages:
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", stage.base), stage.base
        version = tuple(int(x) for x in stage.base.split(":")[1].split("-")[0].split("."))
        assert version >= (3, 11)  # requires-python
        for ins in stage.all("COPY"):
            if "from" in ins.flags:
                assert ins.flags["from"] in names[: stages.index(stage)], f"COPY --from={ins.flags['from']}"
    final = stages[-1]
    assert any(i.cmd == "COPY" and i.flags.get("from") == stages[0].name for i in final.instructions)


def test_base_image_is_a_build_argument_defaulting_to_the_real_one(dockerfile):
    """docker/e2e.sh builds from a local stand-in where no registry is reachable; users
    build from python:3.11-slim-bookworm. No `# syntax=` line: BuildKit would pull
    docker/dockerfile from Docker Hub first, which fails offline (Docker 23+ has it built in)."""
    name, path, global_args, stages = dockerfile
    assert global_args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    names = [s.name for s in stages]
    raw_froms = [line.split()[1] for line in path.read_text().splitlines() if line.startswith("FROM ")]
    assert all(f == "${PYTHON_IMAGE}" or f in names for f in raw_froms), raw_froms
    assert not re.search(r"^#\s*syntax\s*=", path.read_text(), re.M | re.I), f"{name}: a # syntax= directive"


def test_redis_image_is_overridable():
    assert compose()["services"]["redis"]["image"] == "redis:7.4-alpine"
    local = compose({"IPDFER_REDIS_IMAGE": "ipdfer-local/redis:7-bookworm"})["services"]["redis"]
    assert local["image"] == "ipdfer-local/redis:7-bookworm"


def test_runs_as_a_non_root_user(dockerfile):
    name, _, _, stages = dockerfile
    final = stages[-1].instructions
    users = [i for i in final if i.cmd == "USER"]
    assert users, f"{name}: no USER in the final stage"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    last_user = final.index(users[-1])
    for cmd in ("ENTRYPOINT", "CMD", "HEALTHCHECK"):
        assert all(final.index(i) > last_user for i in final if i.cmd == cmd), f"{cmd} before USER"
    useradd = " ".join(i.args for i in final if i.cmd == "RUN")
    assert re.search(rf"useradd\b.*\b{re.escape(user)}\b", useradd), "the user is created in the image"


def test_copied_files_exist_and_are_in_the_build_context(dockerfile):
    name, _, _, stages = dockerfile
    patterns = dockerignore()
    seen = []
    for stage in stages:
        for sources, _ in copies(stage):
            for src in sources:
                path = ROOT / src
                assert path.exists(), f"{name}: COPY {src}: no such file"
                files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                kept = [f for f in files if not ignored(str(f.relative_to(ROOT)), patterns)]
                assert kept, f"{name}: COPY {src}: excluded by .dockerignore"
                missing = [str(f.relative_to(ROOT)) for f in files if "__pycache__" not in f.parts
                           and f.suffix != ".pyc" and f not in kept]
                assert not missing, f"{name}: .dockerignore drops {missing[:5]}"
                seen.append(src)
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "model", "service", "weights/ipdfer.pt",
                   "weights/manifest.json", "docker/healthcheck.py"):
        assert needed in seen, f"{name}: does not COPY {needed}"


def test_weights_and_networks_are_baked_in(dockerfile):
    name, _, _, stages = dockerfile
    final = stages[-1]
    dest = {src: dst for sources, dst in copies(final) for src in sources}
    env = image_env(final)
    manifest = json.loads((ROOT / "weights" / "manifest.json").read_text())
    # the model and its CPU graph, not judge/ or report/
    for src in ("weights/manifest.json", f"weights/{manifest['file']}", f"weights/{manifest['onnx']['file']}"):
        assert dest[src].rstrip("/") == env["IPDFER_WEIGHTS_DIR"], f"{name}: {src} -> {dest[src]}"
    # MTCNN's graphs, beside the weights where the Analyzer looks for them
    assert dest["weights/mtcnn/"].rstrip("/") == env["IPDFER_WEIGHTS_DIR"] + "/mtcnn", name
    assert (ROOT / "weights" / manifest["file"]).is_file()
    # the build loads weights, dlib's network (face-recognition-models) and MTCNN
    # (facenet-pytorch) with the network switched off: nothing is left to download
    offline = [i for i in final.all("RUN") if i.flags.get("network") == "none"]
    assert offline and "Pipeline.load" in offline[0].args, f"{name}: no offline load check"
    installs = " ".join(i.args for s in stages for i in s.all("RUN"))
    assert "facenet-pytorch==" in installs and "constraints.txt" in installs
    assert "pyproject.toml" in installs  # the dependency list is pyproject's, with its pins


def test_pins_match_the_project(dockerfile):
    name, _, _, stages = dockerfile
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;]+)$", "\n".join(PYPROJECT["project"]["dependencies"]), re.M))
    makefile_facenet = re.search(r"facenet-pytorch==([\w.]+)", (ROOT / "Makefile").read_text()).group(1)
    runs = " ".join(i.args for s in stages for i in s.all("RUN"))
    for package, version in re.findall(r"\b(torch|torchvision|facenet-pytorch)==([\w.+]+)", runs):
        want = makefile_facenet if package == "facenet-pytorch" else pins[package]
        assert version.split("+")[0] == want, f"{name}: {package}=={version}, project pins {want}"
    if name == "cpu":
        # the CPU wheels by default; the index and the +cpu suffix are build arguments
        args = dict(i.args.partition("=")[::2] for i in stages[0].all("ARG"))
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu" and args["TORCH_VARIANT"] == "+cpu"
        assert '--extra-index-url "${TORCH_INDEX_URL}"' in runs
        assert '"torch==2.14.1${TORCH_VARIANT}"' in runs and '"torchvision==0.29.1${TORCH_VARIANT}"' in runs
        assert image_env(stages[-1]).get("IPDFER_DEVICE") == "cpu"
    else:  # PyPI's torch is the CUDA build
        assert "whl/cpu" not in runs and "IPDFER_DEVICE" not in image_env(stages[-1])


def test_entrypoint_cmd_and_healthcheck(dockerfile):
    name, path, _, stages = dockerfile
    final = stages[-1]
    entry = final.all("ENTRYPOINT")[-1].exec_form
    cmd = final.all("CMD")[-1].exec_form
    assert entry == ["ipdfer"] and cmd, f"{name}: exec-form ENTRYPOINT and CMD"
    build_parser(cmd[0]).parse_args(cmd)
    assert cmd[0] == ("worker" if name == "cuda" else "serve")
    hc = final.all("HEALTHCHECK")
    assert hc, f"{name}: no HEALTHCHECK"
    words = hc[-1].args.split(None, 1)
    assert words[0] == "CMD"
    probe = json.loads(words[1])
    assert probe[:2] == ["python", "/app/healthcheck.py"]
    dest = {dst: srcs for srcs, dst in copies(final)}
    assert dest["/app/healthcheck.py"] == ["docker/healthcheck.py"]
    assert duration_s(hc[-1].flags["start-period"]) >= 60
    env = image_env(final)
    assert env["IPDFER_HOST"] == "0.0.0.0" and env["IPDFER_PORT"] in final.all("EXPOSE")[0].args.split()
    for ins in final.all("ENTRYPOINT") + final.all("CMD") + hc:
        assert not DOWNLOADERS.search(ins.args), f"{name}: {ins.cmd} downloads at run time: {ins.args}"
    for ins in final.all("RUN"):  # `ipdfer <sub> ...` run at build time exist too
        for sub, rest in re.findall(r"(?:^|&&|;)\s*ipdfer\s+(\w+)([^&|;]*)", ins.args):
            assert sub in SUBCOMMANDS
            with pytest.raises(SystemExit) as done:  # --help exits 0
                build_parser(sub).parse_args([sub, *shlex.split(rest.replace(">", " ").split("/dev/null")[0])])
            assert done.value.code == 0


def test_dockerignore_keeps_the_context_small():
    for path in (".venv/bin/python", ".git/HEAD", ".env", "model/.env", "runs/x/ckpt.pt", "tests/test_deploy.py",
                 "model/__pycache__/face.cpython-311.pyc", ".pytest_cache/v", ".hypothesis/x", "benchmarks/load.py",
                 "ipdfer.egg-info/PKG-INFO", "docker/Dockerfile"):
        assert ignored(path), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "constraints.txt", "README.md", "model/faces/preprocess.py", "service/static/index.html",
                 "weights/manifest.json", "docker/healthcheck.py"):
        assert not ignored(path), path


# === docker/healthcheck.py, for real =======================================================


def run_healthcheck(role: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not (k.startswith("IPDFER_") or k == "REDIS_URL")}
    return subprocess.run([sys.executable, str(HEALTHCHECK), role], env={**base, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_api_healthcheck_probes_healthz():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b'{"status":"ok"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = str(server.server_address[1])
        ok = run_healthcheck("api", IPDFER_PORT=port)
        assert ok.returncode == 0 and ok.stdout.startswith("healthy"), ok.stdout + ok.stderr
    finally:
        server.shutdown()
        server.server_close()
    down = run_healthcheck("api", IPDFER_PORT=port)
    assert down.returncode == 1 and down.stdout.startswith("unhealthy"), down.stdout + down.stderr


def test_worker_healthcheck_reads_this_containers_heartbeat(redis_server):
    import asyncio

    from service.queue import RedisQueue

    prefix = f"hc{uuid.uuid4().hex[:8]}"
    me = f"{socket.gethostname()}-4242"

    async def beat(*names: str) -> None:
        queue = RedisQueue(redis_server.url, prefix=prefix)
        try:
            for n in names:
                await queue.heartbeat(n, {"worker": n, "device": "cpu"})
        finally:
            await queue.close()

    env = {"REDIS_URL": redis_server.url, "IPDFER_QUEUE_PREFIX": prefix}
    none = run_healthcheck("worker", **env)
    assert none.returncode == 1 and "no fresh heartbeat" in none.stdout, none.stdout + none.stderr
    asyncio.run(beat("some-other-host-1"))  # another replica's heartbeat does not count
    other = run_healthcheck("worker", **env)
    assert other.returncode == 1 and "1 other live workers" in other.stdout, other.stdout
    asyncio.run(beat(me))
    ok = run_healthcheck("worker", **env)
    assert ok.returncode == 0 and me in ok.stdout, ok.stdout + ok.stderr
    named = run_healthcheck("worker", **env, IPDFER_WORKER_NAME="some-other-host-1")
    assert named.returncode == 0, named.stdout
    t0 = time.monotonic()
    gone = run_healthcheck("worker", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert gone.returncode == 1 and "cannot read worker heartbeats" in gone.stdout, gone.stdout
    assert time.monotonic() - t0 < 15
    assert run_healthcheck("bogus").returncode == 1


# === the package carries the web page ==============================================


def test_wheel_ships_the_web_page(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("model", "service"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "-w", str(out), str(src)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = out.glob("ipdfer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = sorted(p.name for p in (ROOT / "service" / "static").iterdir() if p.is_file())
    assert {"index.html", "app.js", "style.css"} <= set(static)
    missing = [n for n in static if f"service/static/{n}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    # every module of the source tree is in the wheel (a folder without __init__.py is not)
    modules = sorted(str(p.relative_to(ROOT)) for pkg in ("model", "service") for p in (ROOT / pkg).rglob("*.py")
                     if "__pycache__" not in p.parts)
    missing = [m for m in modules if m not in names]
    assert not missing, f"modules not in the wheel: {missing}"
