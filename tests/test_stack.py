"""The embedded stack's life cycle against the real servers: S3, MLflow runs, registry, restart."""

from __future__ import annotations

import os
import subprocess
import sys
import json
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from mlflow import MlflowClient

from mycelium import stack as stack_mod
from tests.conftest import start_stack


def _s3(cfg, signed=True):
    creds = stack_mod.stack_env(cfg)
    kwargs = dict(endpoint_url=cfg.s3_endpoint, region_name="us-east-1")
    if signed:
        kwargs.update(aws_access_key_id=creds["AWS_ACCESS_KEY_ID"], aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])
        return boto3.client("s3", config=Config(s3={"addressing_style": "path"}), **kwargs)
    return boto3.client("s3", config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}), **kwargs)


def _pids_alive(pids):
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                alive.append(pid)
        except (ProcessLookupError, FileNotFoundError):
            pass
    return alive


def _group_pids(pgid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    out.append(int(entry))
            except ProcessLookupError:
                pass
    return out


def test_stack_lifecycle_persists_data(tmp_path, monkeypatch):
    cfg = start_stack(tmp_path / "state")
    env = stack_mod.stack_env(cfg)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        # Only loopback listeners, and anonymous requests are refused.
        s3 = _s3(cfg)
        key = f"smoke/{uuid.uuid4().hex}.txt"
        s3.put_object(Bucket="mycelium-data", Key=key, Body=b"spores")
        assert s3.get_object(Bucket="mycelium-data", Key=key)["Body"].read() == b"spores"
        assert key in [o["Key"] for o in s3.list_objects_v2(Bucket="mycelium-data", Prefix="smoke/")["Contents"]]
        with pytest.raises(Exception, match="AccessDenied|Access Denied"):
            _s3(cfg, signed=False).get_object(Bucket="mycelium-data", Key=key)

        # An MLflow run whose artifact lands as an object in S3 under models/.
        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        exp = client.create_experiment(f"stack-{uuid.uuid4().hex[:8]}")
        run = client.create_run(exp)
        (tmp_path / "note.txt").write_text("artifact body")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"), "notes")
        client.set_terminated(run.info.run_id)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mycelium-data", Prefix="models/")["Contents"]]
        art_key = next(k for k in keys if run.info.run_id in k and k.endswith("notes/note.txt"))
        assert s3.get_object(Bucket="mycelium-data", Key=art_key)["Body"].read() == b"artifact body"

        # Registry: a version and an alias round trip.
        name = f"stack-model-{uuid.uuid4().hex[:8]}"
        client.create_registered_model(name)
        mv = client.create_model_version(name, f"runs:/{run.info.run_id}/notes", run_id=run.info.run_id)
        client.set_registered_model_alias(name, "champion", mv.version)
        assert client.get_model_version_by_alias(name, "champion").version == mv.version

        # `up` twice starts nothing new.
        pids_before = {s: stack_mod._read_pid(cfg, s) for s in ("seaweedfs", "mlflow")}
        stack_mod.up(cfg, log=lambda *_: None)
        assert {s: stack_mod._read_pid(cfg, s) for s in ("seaweedfs", "mlflow")} == pids_before

        # down -> up: object, run and alias survive.
        groups = [pid for pid in pids_before.values()]
        members = [p for g in groups for p in _group_pids(g)]
        assert len(members) >= 2
        stack_mod.down(cfg, log=lambda *_: None)
        assert _pids_alive(members) == []
        assert stack_mod.status(cfg)["mlflow"]["running"] is False

        stack_mod.up(cfg, log=lambda *_: None)
        s3 = _s3(cfg)
        assert s3.get_object(Bucket="mycelium-data", Key=key)["Body"].read() == b"spores"
        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
        assert client.get_model_version_by_alias(name, "champion").version == mv.version
    finally:
        stack_mod.down(cfg, log=lambda *_: None)
    assert stack_mod.status(cfg) == {
        "seaweedfs": {"pid": None, "url": cfg.s3_endpoint, "running": False, "healthy": False},
        "mlflow": {"pid": None, "url": cfg.tracking_uri, "running": False, "healthy": False},
    }


def test_stale_pid_and_busy_port(tmp_path, stack):
    # A stale pid file (a process that no longer exists) is recognised and ignored.
    cfg = stack_mod.StackConfig(state_dir=tmp_path / "s", ports=stack_mod.free_ports())
    cfg.state_dir.mkdir(parents=True)
    cfg.pid_file("mlflow").write_text("999999")
    assert stack_mod._read_pid(cfg, "mlflow") is None
    # A pid that is alive but is not our program (pid reuse) is not taken for ours.
    cfg.pid_file("seaweedfs").write_text(str(os.getpid()))
    assert stack_mod._read_pid(cfg, "seaweedfs") is None

    # A port in use gives a clear error that names the port and the option to change it.
    busy = stack_mod.StackConfig(state_dir=tmp_path / "b", ports={**stack_mod.free_ports(), "s3": stack.ports["s3"]})
    with pytest.raises(stack_mod.StackError, match=rf"port {stack.ports['s3']} \(s3\).*--s3-port"):
        stack_mod.up(busy, log=lambda *_: None)


def test_cli_status_and_env(stack):
    out = subprocess.run(
        [sys.executable, "-m", "mycelium.cli", "stack", "status", "--state-dir", str(stack.state_dir)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "seaweedfs  healthy" in out and "mlflow     healthy" in out
    assert stack.tracking_uri in out
    env = subprocess.run(
        [sys.executable, "-m", "mycelium.cli", "stack", "env", "--state-dir", str(stack.state_dir)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert f"export MLFLOW_TRACKING_URI={stack.tracking_uri}\n" in env
    assert f"export AWS_ENDPOINT_URL_S3={stack.s3_endpoint}\n" in env


def _bare_env(state_dir) -> dict[str, str]:
    """A new shell: nothing points at a tracking server, an S3 endpoint or credentials."""
    drop = (*stack_mod.POINTING_VARS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
            "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "MYCELIUM_STACK_DIR": str(state_dir)}


def test_commands_find_the_running_stack_in_a_new_shell(stack, tmp_path):
    env = _bare_env(stack.state_dir)
    prefix = f"s3://mycelium-data/tests/auto-{os.getpid()}"
    demo = subprocess.run([sys.executable, "-m", "mycelium.cli", "data", "demo", "--dest", prefix, "--files", "1", "--per-file", "5"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert f"using the embedded stack in {stack.state_dir} (MLflow {stack.tracking_uri}" in demo.stderr
    assert "c6: 1 files" in demo.stdout  # written with the stack's credentials
    # predict asks the stack's registry (not a local sqlite file) and names the missing model.
    pred = subprocess.run([sys.executable, "-m", "mycelium.cli", "predict", "--task", "c6", "--registered-model", "no-such-model",
                           "--input", "-"], input="What is 1/2 + 1/3?\n", capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert pred.returncode != 0 and "no-such-model" in pred.stderr, pred.stderr[-2000:]
    assert "using the embedded stack" in pred.stderr and "sqlite" not in pred.stderr


def test_commands_without_a_stack_say_how_to_start_one(tmp_path):
    env = _bare_env(tmp_path / "no-stack")
    pred = subprocess.run([sys.executable, "-m", "mycelium.cli", "predict", "--task", "c6", "--input", "-"], input="1+1\n",
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert pred.returncode == 2
    assert "mycelium stack up" in pred.stderr and "MLFLOW_TRACKING_URI" in pred.stderr and str(tmp_path / "no-stack") in pred.stderr
    train = subprocess.run([sys.executable, "-m", "mycelium.cli", "train", "--task", "c4", "--backbone", "minilm"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert train.returncode == 2 and "mycelium stack up" in train.stdout + train.stderr


def _listening_ports(pids) -> set[int]:
    """TCP ports in LISTEN state owned by ``pids`` (Linux /proc): what the stack really opened."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _anonymous(method: str, url: str, body: bytes | None = None):
    """Status of an unauthenticated request, or the name of the error that ended it."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method=method), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return type(e).__name__


def _tls_probe(port: int, tls_dir, with_certificate: bool) -> str:
    """Open TLS (gRPC's HTTP/2) to ``port``; 'ok' or the error. The server certificate is checked
    against the stack's CA, so 'ok' also proves the port speaks TLS with it."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    ctx.set_alpn_protocols(["h2"])
    if with_certificate:
        ctx.load_cert_chain(str(tls_dir / "tls.crt"), str(tls_dir / "tls.key"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            return "ok" if s.recv(9) else "closed"
    except (OSError, ssl.SSLError) as e:
        return str(e)


def test_no_port_of_the_stack_serves_data_without_credentials(stack, tmp_path):
    s3 = _s3(stack)
    key = f"locks/{uuid.uuid4().hex}.jsonl"
    s3.put_object(Bucket="mycelium-data", Key=key, Body=b'{"label": "kept"}\n')
    client = MlflowClient(tracking_uri=stack.tracking_uri)  # the stack's user, from the session env
    run = client.create_run(client.create_experiment(f"locks-{uuid.uuid4().hex[:8]}"))
    (tmp_path / "weights.txt").write_text("trained")
    client.log_artifact(run.info.run_id, str(tmp_path / "weights.txt"), "model")
    artifact = f"{run.info.experiment_id}/{run.info.run_id}/artifacts/model/weights.txt"

    pids = [p for service in ("seaweedfs", "mlflow") for p in _group_pids(stack_mod._read_pid(stack, service))]
    listening = _listening_ports(pids)
    assert listening <= set(stack.all_ports().values()), f"a port the stack does not declare: {listening - set(stack.all_ports().values())}"
    grpc = set(stack.grpc_ports.values())
    for port in sorted(listening):
        base = f"http://127.0.0.1:{port}"
        # Each way to name the object: the filer's path, S3's path style, MLflow's artifact proxy.
        for path in (f"/buckets/mycelium-data/{key}", "/buckets/mycelium-data/locks/", f"/mycelium-data/{key}",
                     f"/api/2.0/mlflow-artifacts/artifacts/{artifact}", f"/api/2.0/mlflow-artifacts/artifacts?path={run.info.experiment_id}"):
            for method, body in (("GET", None), ("PUT", b"overwritten"), ("DELETE", None)):
                status = _anonymous(method, base + path, body)
                assert not (isinstance(status, int) and status < 300), f"anonymous {method} {base}{path} answered {status}"
        if port in grpc:  # gRPC (the filer's can list and delete any entry) takes only clients with our certificate
            assert "CERTIFICATE_REQUIRED" in _tls_probe(port, stack.state_dir / "tls", with_certificate=False), port
            assert _tls_probe(port, stack.state_dir / "tls", with_certificate=True) == "ok", port
    # A volume write needs a JWT even with a file id the master hands out to anyone.
    assigned = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{stack.ports['master']}/dir/assign", timeout=5).read())
    assert _anonymous("POST", f"http://127.0.0.1:{stack.ports['volume']}/{assigned['fid']}", b"x") == 401

    # Nothing was changed, and the credentialed paths still work.
    assert s3.get_object(Bucket="mycelium-data", Key=key)["Body"].read() == b'{"label": "kept"}\n'
    assert (Path(client.download_artifacts(run.info.run_id, "model/weights.txt", str(tmp_path / "dl"))).read_text()) == "trained"
    secret_files = ["credentials.json", "security.toml", "mlflow-auth.ini", "tls/tls.key"]
    assert all((stack.state_dir / f).stat().st_mode & 0o077 == 0 for f in secret_files), "a secret readable by others"
