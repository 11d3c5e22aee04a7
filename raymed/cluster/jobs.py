"""A Ray cluster's Jobs API (`JobSubmissionClient`) as raymed uses it: submit a `raymed …`
command with a runtime_env, follow its logs, query, list and stop jobs.

Address: the one given, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else
http://127.0.0.1:8265 (Ray's own client lets those variables override an explicit address; here
the explicit address wins, so a shell that exports RAY_ADDRESS can still talk to another cluster).

Authentication: Ray clusters started with `ray start` / `ray.init()` (Ray >= 2.52) and KubeRay
clusters with `authOptions.mode: token` require a bearer token. Ray's client sends it only when
RAY_AUTH_MODE=token; raymed also sends it when a token is named (RAY_AUTH_TOKEN or
RAY_AUTH_TOKEN_PATH), or when the cluster is on this machine and `ray start` left its token in
~/.ray/auth_token. RAY_AUTH_MODE=disabled sends none.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import secrets
import shlex
import time
import urllib.parse
from collections.abc import Callable, Iterator

from raymed.errors import ConfigError, RaymedError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# The raymed commands that make sense as a cluster job.
CLUSTER_COMMANDS = ("train", "tune", "evaluate")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ClusterError(RaymedError):
    """The cluster cannot be reached, refused a request, or has no such job."""


def resolve_address(address: str | None) -> str:
    for candidate in (address, *(os.environ.get(name) for name in ADDRESS_VARIABLES)):
        if candidate:
            return candidate
    return DEFAULT_ADDRESS


def is_loopback(address: str) -> bool:
    host = urllib.parse.urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_headers(address: str) -> dict:
    """The `authorization` header for `address`, from Ray's token sources (see the module doc)."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path and not os.environ.get("RAY_AUTH_TOKEN") and not os.path.isfile(token_path):
        raise ClusterError(f"RAY_AUTH_TOKEN_PATH={token_path}: no such file")
    named = mode == "token" or bool(os.environ.get("RAY_AUTH_TOKEN") or token_path)
    if not (named or is_loopback(address)):
        return {}
    token = read_token(token_path)
    return {"authorization": f"Bearer {token}"} if token else {}


def read_token(token_path: str | None) -> str | None:
    """Ray's token, from where Ray itself looks: RAY_AUTH_TOKEN, the RAY_AUTH_TOKEN_PATH file, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = token_path or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


@contextlib.contextmanager
def without_variables(names: tuple[str, ...]) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def entrypoint(command: list[str]) -> str:
    """The shell command a job runs: `raymed COMMAND …`, quoted as given."""
    if not command:
        raise ConfigError("nothing to run: put the raymed command after --, "
                          "e.g. raymed submit -- train ae --data s3://bucket/cohort --storage s3://bucket/runs")
    if command[0] not in CLUSTER_COMMANDS:
        raise ConfigError(f"{command[0]!r} cannot be submitted: the command after -- is one of "
                          f"{', '.join(CLUSTER_COMMANDS)}")
    return shlex.join(["raymed", *command])


def parse_env(items: list[str]) -> dict[str, str]:
    """`NAME=VALUE`, or `NAME` alone to pass this shell's value on."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not ENV_NAME.fullmatch(name):
            raise ConfigError(f"--env {item!r}: expected NAME=VALUE or NAME")
        if not sep:
            if name not in os.environ:
                raise ConfigError(f"--env {name}: not set in this shell (give NAME=VALUE)")
            value = os.environ[name]
        env[name] = value
    return env


def build_runtime_env(working_dir: str | None = None, pip: list[str] = (), env: list[str] = ()) -> dict:
    """Ray's runtime_env: the code folder to upload, extra pip packages, environment variables."""
    runtime_env = {}
    if working_dir:
        if not os.path.isdir(working_dir):
            raise ConfigError(f"--working-dir {working_dir}: not a folder")
        runtime_env["working_dir"] = working_dir
    if pip:
        # One requirements file is handed to Ray as a path; Ray reads it here, before upload.
        runtime_env["pip"] = pip[0] if len(pip) == 1 and os.path.isfile(pip[0]) else list(pip)
    if env:
        runtime_env["env_vars"] = parse_env(list(env))
    return runtime_env


def new_job_id(command: str) -> str:
    return f"raymed-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def request_error(err: RuntimeError) -> str | None:
    """The first line of a failed Jobs API request, or None for any other RuntimeError."""
    text = str(err).strip()
    if not text.startswith(("Request failed with status code", "WebSocket")):
        return None
    return text.splitlines()[0].removesuffix(".")


def root_cause(err: BaseException) -> str:
    while err.__cause__ or err.__context__:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class Cluster:
    """One Ray cluster's Jobs API; its failures become one-line `ClusterError`s."""

    def __init__(self, address: str | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = resolve_address(address)
        headers = auth_headers(self.address)
        with self.errors("connect"), without_variables(ADDRESS_VARIABLES):
            self.client = JobSubmissionClient(self.address, headers=headers)

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as err:
            if str(err).startswith("Authentication failed"):
                raise ClusterError(f"the Ray cluster at {self.address} rejected the token (taken from "
                                   "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)") from None
            raise ClusterError(f"the Ray cluster at {self.address} requires a token: set RAY_AUTH_TOKEN "
                               "(or RAY_AUTH_TOKEN_PATH) to the cluster's token") from None
        except (ConnectionError, requests.exceptions.ConnectionError, aiohttp.ClientError) as err:
            reason = root_cause(err)  # e.g. ConnectionRefusedError under Ray's and requests' wrappers
            raise ClusterError(f"cannot reach the Ray Jobs API at {self.address} ({reason}): "
                               "is the cluster up and its dashboard port reachable?") from None
        except RuntimeError as err:
            message = request_error(err)
            if message is None:
                raise
            if "status code 404" in message:
                raise ClusterError(f"{what}: no such job on {self.address}") from None
            raise ClusterError(f"{what}: {message}") from None

    def submit(self, command: list[str], runtime_env: dict | None = None, job_id: str | None = None,
               agent_wait_s: float = 120) -> str:
        """Submit `raymed COMMAND …`; returns the job ID.

        A cluster that has just started answers "No available agent …, please try again later"
        until its head node's agent is up: that answer is retried for up to `agent_wait_s`.
        """
        line = entrypoint(command)
        job_id = job_id or new_job_id(command[0])
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                with self.errors(f"submit {job_id}"):
                    return self.client.submit_job(entrypoint=line, runtime_env=runtime_env or None,
                                                  submission_id=job_id, metadata={"raymed_command": command[0]})
            except ClusterError as err:
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
            time.sleep(2)

    def info(self, job_id: str):
        with self.errors(f"job {job_id}"):
            return self.client.get_job_info(job_id)

    def list(self) -> list:
        """Submitted jobs (not plain drivers), oldest first."""
        with self.errors("list jobs"):
            jobs = self.client.list_jobs()
        return sorted((j for j in jobs if j.submission_id), key=lambda j: j.start_time or 0)

    def logs(self, job_id: str) -> str:
        with self.errors(f"job {job_id}"):
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], object]):
        """Stream the job's logs to `write` until it ends; returns its final details."""

        async def stream() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                write(chunk)

        self.info(job_id)
        with self.errors(f"job {job_id}"):
            asyncio.run(stream())
        return self.wait(job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5):
        """Poll until the job reaches a terminal status; its details (as they are at the timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.info(job_id)
            if info.status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
                return info
            time.sleep(poll)

    def stop(self, job_id: str, timeout: float = 60):
        """Ask the job to stop (SIGTERM, then SIGKILL) and wait for it; (was_running, details)."""
        with self.errors(f"stop {job_id}"):
            was_running = self.client.stop_job(job_id)
        info = self.wait(job_id, timeout)
        if not info.status.is_terminal():
            raise ClusterError(f"job {job_id} is still {info.status} {timeout:g} s after the stop request")
        return was_running, info
