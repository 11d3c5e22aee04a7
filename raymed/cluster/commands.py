"""`raymed submit` and `raymed jobs list|status|logs|stop`."""

from __future__ import annotations

import argparse
import logging
import sys
import time

ADDRESS_HELP = ("Ray Jobs API (dashboard) URL, e.g. http://127.0.0.1:8265 (default: RAY_API_SERVER_ADDRESS, "
                "then RAY_ADDRESS, then http://127.0.0.1:8265)")


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help=ADDRESS_HELP)


def register(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser(
        "submit", help="run train/tune/evaluate on a Ray cluster (Ray Jobs API)",
        usage="raymed submit [--address URL] [--working-dir DIR] [--pip REQ …] [--env NAME[=VALUE] …] "
              "[--job-id ID] [--no-wait] -- COMMAND [ARG …]",
        description="Submit `raymed COMMAND …` as a Ray job, stream its logs and exit with its status "
                    "(0 SUCCEEDED, 1 FAILED or STOPPED). Ctrl-C detaches: the job keeps running. "
                    "Paths in the command are read on the cluster: use s3:// for --data and --storage. "
                    "Token auth: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token.",
        epilog="example: raymed submit --address http://127.0.0.1:8265 --env AWS_ENDPOINT_URL -- "
               "train ae --data s3://bucket/cohort --storage s3://bucket/runs --workers 2 --gpus-per-worker 1")
    add_address_argument(submit)
    submit.add_argument("--working-dir", help="upload this folder and run the command in it; its raymed/ "
                                              "replaces the cluster's installed copy (default: nothing uploaded)")
    submit.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                        help="extra pip requirement installed for the job (repeatable), or one requirements.txt")
    submit.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help="environment variable for the job (repeatable); NAME alone passes this shell's value")
    submit.add_argument("--job-id", help="submission ID, new on the cluster (default raymed-COMMAND-DATE-TIME-XXXX)")
    submit.add_argument("--no-wait", action="store_true", help="print the job ID and return instead of following it")
    submit.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                        help="the raymed command to run: train, tune or evaluate with its arguments")
    submit.set_defaults(run=run_submit)

    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster",
                          description="Jobs submitted to a Ray cluster (by `raymed submit` or any Jobs API client).")
    verbs = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    listing = verbs.add_parser("list", help="submitted jobs, oldest first")
    add_address_argument(listing)
    listing.set_defaults(run=run_list)
    status = verbs.add_parser("status", help="a job's status and message")
    status.add_argument("job_id")
    add_address_argument(status)
    status.set_defaults(run=run_status)
    logs = verbs.add_parser("logs", help="a job's logs so far, or --follow until it ends")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
    add_address_argument(logs)
    logs.set_defaults(run=run_logs)
    stop = verbs.add_parser("stop", help="stop a running job and wait until it has stopped")
    stop.add_argument("job_id")
    stop.add_argument("--timeout", type=float, default=60, help="seconds to wait for the job to stop (default 60)")
    add_address_argument(stop)
    stop.set_defaults(run=run_stop)


def quiet_log_stream() -> None:
    """Ray's SDK logs every closed log stream at INFO; the closing status line says it better."""
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)


def write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def first_line(message: str | None) -> str:
    """Ray appends the job's last logs to a failure message; those were shown already."""
    return f": {message.splitlines()[0]}" if message else ""


def outcome(info) -> int:
    """One closing line on stderr; exit status 0 only for SUCCEEDED."""
    ok = str(info.status) == "SUCCEEDED"
    note(f"job {info.submission_id} {info.status}" + ("" if ok else first_line(info.message)))
    return 0 if ok else 1


def check_command(command: list[str]) -> int | None:
    """Parse the command with this raymed's own parser, so a typo fails here, not on the cluster.

    Returns argparse's exit status when it stopped (an error, or --help), else None.
    """
    from raymed.cli import build_parser

    try:
        build_parser().parse_args(command)
    except SystemExit as stop:
        return int(stop.code or 0)
    return None


def run_submit(args: argparse.Namespace) -> int:
    from raymed.cluster.jobs import Cluster, build_runtime_env, entrypoint

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    entrypoint(command)
    stopped = check_command(command)
    if stopped is not None:
        return stopped
    runtime_env = build_runtime_env(args.working_dir, args.pip, args.env)
    cluster = Cluster(args.address)
    job_id = cluster.submit(command, runtime_env, args.job_id)
    if args.no_wait:
        print(job_id)
        return 0
    note(f"submitted job {job_id} to {cluster.address}")
    quiet_log_stream()
    try:
        return outcome(cluster.follow(job_id, write))
    except KeyboardInterrupt:
        where = f" --address {args.address}" if args.address else ""
        note(f"detached; job {job_id} keeps running. Follow it: raymed jobs logs {job_id} --follow{where}; "
             f"stop it: raymed jobs stop {job_id}{where}")
        return 130


def when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def run_list(args: argparse.Namespace) -> int:
    from raymed.cluster.jobs import Cluster

    jobs = Cluster(args.address).list()
    rows = [(j.submission_id, str(j.status), when(j.start_time), j.entrypoint) for j in jobs]
    width = max([len("JOB ID"), *(len(r[0]) for r in rows)])
    print(f"{'JOB ID':<{width}}  {'STATUS':<9}  {'STARTED':<19}  ENTRYPOINT")
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:<9}  {row[2]:<19}  {row[3]}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from raymed.cluster.jobs import Cluster

    info = Cluster(args.address).info(args.job_id)
    print(f"{args.job_id}: {info.status}")
    print(f"  entrypoint: {info.entrypoint}")
    print(f"  started: {when(info.start_time)}  ended: {when(info.end_time)}")
    if info.message:
        print(f"  message{first_line(info.message)}")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    from raymed.cluster.jobs import Cluster

    cluster = Cluster(args.address)
    if args.follow:
        quiet_log_stream()
        return outcome(cluster.follow(args.job_id, write))
    write(cluster.logs(args.job_id))
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from raymed.cluster.jobs import Cluster

    was_running, info = Cluster(args.address).stop(args.job_id, args.timeout)
    if was_running:
        print(f"job {args.job_id} {info.status}")
    else:
        print(f"job {args.job_id} was not running ({info.status})")
    return 0
