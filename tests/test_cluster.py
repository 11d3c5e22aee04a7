"""`raymed submit` / `raymed jobs` against a real Ray head started the way a user starts one.

The head is `ray start --head --block` with token auth, its own temp dir and ports on
127.0.0.1, in its own process group so that stopping it touches no other Ray on the machine. It
gets no S3 settings: the S3 variant passes them with `--env`, as a user would for a cluster whose
nodes lack them. Clients are `raymed` subprocesses with an explicit --address.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

import psutil
import pytest
import yaml

from raymed.cluster.jobs import (ClusterError, auth_headers, build_runtime_env, entrypoint, is_loopback, parse_env,
                                 resolve_address)
from raymed.cli import main
from raymed.errors import ConfigError
from tests.conftest import free_port, upload_folder

TINY_AE = ["--set", "data.size=32", "--set", "channels=[8,16]", "--set", "latent_size=16",
           "--set", "train.batch_size=8"]
CLIENT_UNSET = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")


@dataclass
class Head:
    address: str
    token: str
    temp_dir: str

    def env(self, **extra: str) -> dict:
        """A client's environment: this head's token, no inherited Ray address or auth settings."""
        env = {k: v for k, v in os.environ.items() if k not in CLIENT_UNSET}
        return {**env, "RAY_AUTH_TOKEN": self.token, **extra}

    def raymed(self, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "raymed.cli", *args], env=env or self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def tail(self, lines: int = 30) -> str:
        """The end of `ray start`'s log and of its record of exited processes, for failure messages."""
        logs = [os.path.join(self.temp_dir, "head.log"),
                os.path.join(self.temp_dir, "session_latest", "logs", "ray_process_exit.log")]
        return "\n".join(f"--- {p}\n" + "".join(open(p).readlines()[-lines:]) for p in logs if os.path.exists(p))

    def check(self, done: subprocess.CompletedProcess, status: int = 0) -> subprocess.CompletedProcess:
        assert done.returncode == status, "\n".join([done.stdout[-3000:], done.stderr[-3000:], self.tail()])
        return done

    def processes(self, prefix: str) -> list[psutil.Process]:
        """This head's worker processes whose title starts with `prefix` (e.g. ray::RayTrainWorker)."""
        raylets = [p for p in psutil.process_iter(["name", "cmdline"])
                   if p.info["name"] == "raylet" and any(self.temp_dir in a for a in p.info["cmdline"] or [])]
        found = []
        for raylet in raylets:
            for child in raylet.children(recursive=True):
                try:
                    if " ".join(child.cmdline()).startswith(prefix):
                        found.append(child)
                except psutil.NoSuchProcess:
                    pass
        return found


@pytest.fixture(scope="module")
def head():
    """A Ray head with the Jobs API on 127.0.0.1 and token auth (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN)."""
    temp_dir = tempfile.mkdtemp(prefix="rmh-", dir="/tmp")  # short: Ray's socket paths live under it
    token = secrets.token_hex(16)
    port, dashboard, agent, client = free_port(), free_port(), free_port(), free_port()
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_UNSET and k not in S3_SETTINGS}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # no 30 s drain on SIGTERM: nothing to hand over
    log = open(os.path.join(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         # the agent's and the Ray Client's ports are fixed by default (52365, 10001): taken if
         # another Ray runs here, and without its agent a head accepts no jobs
         "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
         "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    version = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(version, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"ray start --head did not come up: {open(log.name).read()[-2000:]}")
            time.sleep(0.5)
    yield Head(address, token, temp_dir)
    proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of this head's group still alive
    except ProcessLookupError:
        pass
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def train_args(data: str, storage: str, name: str, *extra: str) -> list[str]:
    return ["train", "ae", "--data", data, "--storage", storage, "--name", name, *TINY_AE, *extra]


def test_submit_trains_on_s3_data_with_a_config_from_its_working_dir(head, demo_cohort, s3_bucket, tmp_path):
    """The job reads its config file from the uploaded --working-dir and its data from S3, and
    writes its checkpoints to S3; the S3 endpoint and credentials reach it through --env only
    (the head has none)."""
    working_dir = tmp_path / "project"
    working_dir.mkdir()
    (working_dir / "tiny.yaml").write_text(yaml.safe_dump(
        {"data": {"size": 32}, "train": {"batch_size": 8}, "channels": [8, 16], "latent_size": 16, "epochs": 1}))
    upload_folder(demo_cohort, f"{s3_bucket}/cohort")
    storage = f"{s3_bucket}/runs"
    submitted = head.check(head.raymed(
        "submit", "--address", head.address, "--working-dir", str(working_dir), "--no-wait",
        *[a for n in S3_SETTINGS for a in ("--env", n)], "--",
        "train", "ae", "--data", f"{s3_bucket}/cohort", "--storage", storage, "--name", "ae-job", "--config", "tiny.yaml"))
    job_id = submitted.stdout.strip()
    assert job_id.startswith("raymed-train-")
    logs = head.check(head.raymed("jobs", "logs", job_id, "--follow", "--address", head.address))
    assert "epoch 1/1" in logs.stdout and "best checkpoint:" in logs.stdout
    assert f"run: {storage}/ae-job" in logs.stdout
    from raymed.data.io import exists, join, read_bytes

    summary = json.loads(read_bytes(f"{storage}/ae-job/result.json"))
    assert summary["best_checkpoint"].startswith(f"{storage}/ae-job/checkpoint_")
    assert exists(join(summary["best_checkpoint"], "state.pt"))

    # an explicit --address wins over a RAY_ADDRESS that points elsewhere
    status = head.check(head.raymed("jobs", "status", job_id, "--address", head.address,
                                    env=head.env(RAY_ADDRESS="http://127.0.0.1:9")))
    assert f"{job_id}: SUCCEEDED" in status.stdout
    listed = head.check(head.raymed("jobs", "list", "--address", head.address))
    assert listed.stdout.startswith("JOB ID")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(f"{job_id} "))
    assert "SUCCEEDED" in row and "raymed train ae" in row


def test_jobs_stop_stops_a_running_training(head, demo_cohort, tmp_path):
    args = train_args(str(demo_cohort), str(tmp_path / "runs"), "long", "--set", "epochs=1000")
    submit = subprocess.Popen([sys.executable, "-m", "raymed.cli", "submit", "--address", head.address,
                               "--job-id", "long-train", "--", *args],
                              env=head.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(400, submit.kill)
    watchdog.start()
    try:
        seen = []
        for line in submit.stdout:  # wait until training is under way, as the streamed logs show it
            seen.append(line)
            if "epoch 2/1000" in line:
                break
        assert any("epoch 2/1000" in line for line in seen), "".join(seen)[-3000:] + head.tail()
        assert head.processes("ray::RayTrainWorker")

        stopped = head.check(head.raymed("jobs", "stop", "long-train", "--address", head.address))
        assert stopped.stdout.strip() == "job long-train STOPPED"
        rest, errors = submit.communicate(timeout=120)
    finally:
        watchdog.cancel()
    assert submit.returncode == 1
    assert "job long-train STOPPED" in errors
    assert not (tmp_path / "runs" / "long" / "result.json").exists()
    deadline = time.monotonic() + 60
    while head.processes("ray::RayTrainWorker") and time.monotonic() < deadline:
        time.sleep(1)
    assert not head.processes("ray::RayTrainWorker"), "training workers outlived the stopped job"
    again = head.check(head.raymed("jobs", "stop", "long-train", "--address", head.address))
    assert "was not running (STOPPED)" in again.stdout


def test_cluster_errors_are_one_line(head):
    no_token = head.check(head.raymed("jobs", "list", "--address", head.address,
                                      env=head.env(RAY_AUTH_MODE="disabled")), status=2)
    assert no_token.stderr.strip() == (f"raymed: error: the Ray cluster at {head.address} requires a token: "
                                       "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token")
    wrong = head.check(head.raymed("jobs", "list", "--address", head.address,
                                   env=head.env(RAY_AUTH_TOKEN="not-the-token")), status=2)
    assert "rejected the token" in wrong.stderr
    missing = head.check(head.raymed("jobs", "status", "no-such-job", "--address", head.address), status=2)
    assert missing.stderr.strip() == f"raymed: error: job no-such-job: no such job on {head.address}"


def test_unreachable_cluster_and_bad_commands_fail_before_submitting(monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    down = f"http://127.0.0.1:{free_port()}"
    assert main(["jobs", "list", "--address", down]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raymed: error: cannot reach the Ray Jobs API at {down} (")
    assert err.endswith("): is the cluster up and its dashboard port reachable?") and "\n" not in err
    assert main(["submit", "--address", down, "--", "train", "ae", "--data", "x", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "cannot reach" not in err


def test_runtime_env_and_entrypoint(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    assert parse_env(["A=1", "B=x=y", "AWS_ENDPOINT_URL"]) == {"A": "1", "B": "x=y",
                                                                "AWS_ENDPOINT_URL": "http://minio:9000"}
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    with pytest.raises(ConfigError, match="NOT_SET_HERE: not set in this shell"):
        parse_env(["NOT_SET_HERE"])
    with pytest.raises(ConfigError, match="expected NAME=VALUE"):
        parse_env(["=1"])
    assert build_runtime_env(str(tmp_path), ["monai==1.6.0"], ["A=1"]) == {
        "working_dir": str(tmp_path), "pip": ["monai==1.6.0"], "env_vars": {"A": "1"}}
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("monai\n")
    assert build_runtime_env(pip=[str(requirements)]) == {"pip": str(requirements)}
    with pytest.raises(ConfigError, match="not a folder"):
        build_runtime_env(str(tmp_path / "missing"))
    assert entrypoint(["train", "ae", "--name", "my run"]) == "raymed train ae --name 'my run'"
    with pytest.raises(ConfigError, match="one of train, tune, evaluate"):
        entrypoint(["data", "demo"])


def test_address_precedence_and_loopback(monkeypatch):
    for name in CLIENT_UNSET:
        monkeypatch.delenv(name, raising=False)
    assert resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert resolve_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert resolve_address(None) == "http://api:8265"
    assert resolve_address("http://mine:8265") == "http://mine:8265"
    assert is_loopback("http://127.0.0.1:8265") and is_loopback("localhost:8265") and is_loopback("http://[::1]:1")
    assert not is_loopback("http://10.0.0.3:8265") and not is_loopback("https://ray.example.org")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/nonexistent/token")
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH=/nonexistent/token: no such file"):
        auth_headers("http://10.0.0.3:8265")


def test_the_token_comes_from_where_ray_keeps_it(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_headers("http://127.0.0.1:8265") == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_headers("http://127.0.0.1:8265") == {"authorization": "Bearer from-home"}
    assert auth_headers("http://10.0.0.3:8265") == {}  # a remote cluster gets a token only when one is named
    (tmp_path / "token").write_text(" from-file ")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert auth_headers("http://10.0.0.3:8265") == {"authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_headers("http://10.0.0.3:8265") == {"authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_headers("http://10.0.0.3:8265") == {}
