"""Load test of the raymed endpoint with malformed inputs and a replica killed midway.

32 concurrent HTTP clients (on 127.0.0.1) send, for a bounded time, a mix of good 3D volumes,
good 2D slices and every malformed input the endpoint must refuse, to one model served by 2
replicas; halfway through, one replica is killed. Printed: status counts; 5xx other than the 503
of the killed replica's in-flight requests (must be 0); the status of each malformed input (must
be 4xx); each replica's peak memory (RSS, sampled); p50/p99 of the good requests against the
same work done in-process (decode → preprocess → forward, one request after another).

The model is an untrained `ae` at --size (speed and memory do not depend on the weights).
Usage: python benchmarks/serve_chaos.py [--duration 30] [--clients 32] [--size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import tempfile
import threading
import time
from collections import Counter

import numpy as np
import psutil
import ray
import requests
import torch

from serve_load import brain_like, in_process, npy, untrained_checkpoint  # the sibling benchmark

from raymed.data.io import encode_nifti
from raymed.engine import checkpoint as ckpt
from raymed.serving.service import deploy, service_config

MODEL = "bench"
DASHBOARD: list[str] = []  # this run's Ray dashboard, once started


def nifti_with_sform(array: np.ndarray, srow) -> bytes:
    """A gzipped NIfTI whose affine (sform; qform off) is the 3 rows `srow`."""
    raw = bytearray(gzip.decompress(encode_nifti(array, np.eye(4))))
    raw[252:256] = struct.pack("<hh", 0, 1)
    raw[280:328] = np.asarray(srow, "<f4").tobytes()
    return gzip.compress(bytes(raw))


def malformed(volume: np.ndarray) -> dict[str, bytes]:
    """Every kind of bad upload, by name; each must get a 4xx."""
    body = encode_nifti(volume, np.eye(4))
    nan, inf = volume[:, :, 0].copy(), volume[:, :, 0].copy()
    nan[2, 2], inf[3, 3] = np.nan, np.inf
    header = encode_nifti(np.ones((8, 8, 8), np.float32), np.eye(4), compress=False)[:348]
    huge = header.replace(struct.pack("<8h", 3, 8, 8, 8, 1, 1, 1, 1), struct.pack("<8h", 3, 4096, 4096, 4096, 1, 1, 1, 1))
    return {
        "empty": b"",
        "garbage": os.urandom(4096),
        "truncated NIfTI": body[: len(body) // 2],
        "NaN slice": npy(nan[None]),
        "Inf slice": npy(inf[None]),
        "all-zero volume": encode_nifti(np.zeros_like(volume), np.eye(4)),
        "complex slice": npy(np.ones((1, 32, 32), np.complex64)),
        "gzip bomb (NIfTI header, 64 MiB of zeros)": gzip.compress(huge + b"\0" * 2**26),
        "8x8x32000 volume": encode_nifti(np.ones((8, 8, 32000), np.float32), np.eye(4)),
        "all-zero affine": nifti_with_sform(volume, np.zeros(12)),
        "NaN affine": nifti_with_sform(volume, [np.nan] + [0.0] * 11),
        "5D NIfTI": encode_nifti(np.ones((8, 8, 8, 1, 2), np.float32), np.eye(4)),
        "wrong channels": npy(np.ones((3, 32, 32), np.float32)),
    }


def replica_pids() -> dict[str, int]:
    """PID of each live replica, from Ray's State API (this Ray's dashboard: others may run here)."""
    from ray.util.state import list_actors

    return {a.name: a.pid for a in list_actors(address=DASHBOARD[0], filters=[("state", "=", "ALIVE")], limit=1000)
            if a.name and a.name.startswith(f"SERVE_REPLICA::raymed#{MODEL}#")}


class MemoryWatch(threading.Thread):
    """Samples each replica's RSS every 0.2 s; keeps the peak per replica."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                pids = replica_pids()
            except Exception:  # the State API is briefly unavailable while a replica restarts
                pids = {}
            for name, pid in pids.items():
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak.get(name, 0), rss)
            self.stop.wait(0.2)


def load(url: str, good: list[tuple[str, bytes]], bad: dict[str, bytes], clients: int, duration: float,
         kill_at: float) -> dict:
    """`clients` threads for `duration` s; every 4th request of a client is malformed."""
    records, lock = [], threading.Lock()
    deadline = time.monotonic() + duration
    bad_items = list(bad.items())

    def client(index: int) -> None:
        with requests.Session() as session:
            i = 0
            while time.monotonic() < deadline:
                kind, body = bad_items[(index + i) % len(bad_items)] if i % 4 == 3 else good[(index + i) % len(good)]
                began = time.perf_counter()
                try:
                    response = session.post(f"{url}/v1/models/{MODEL}/detect", data=body, timeout=120)
                    status = response.status_code
                    error = response.json().get("error") if status >= 400 else None
                except (requests.RequestException, ValueError) as err:
                    status, error = 0, type(err).__name__
                with lock:
                    records.append((kind, i % 4 == 3, status, error, time.perf_counter() - began))
                i += 1

    def kill_one() -> str:
        time.sleep(kill_at)
        victim = sorted(replica_pids())[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        return victim

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    victim = kill_one()
    for thread in threads:
        thread.join()
    return {"records": records, "victim": victim}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30, help="seconds of load (default 30)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="in-plane size of the model (default 64)")
    parser.add_argument("--volume", default="96,96,48", help="good volume shape X,Y,Z (default 96,96,48)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    shape = tuple(int(s) for s in args.volume.split(","))
    rng = np.random.default_rng(0)
    volume = brain_like(shape, 1, rng)[..., 0]
    good = [("volume", encode_nifti(volume, np.eye(4)))]
    good += [("slice", npy(volume[:, :, z][None])) for z in range(shape[2] // 4, 3 * shape[2] // 4, 4)]
    bad = malformed(volume)
    with tempfile.TemporaryDirectory() as tmp:
        uri = untrained_checkpoint(tmp, args.size, 1)
        method, _ = ckpt.load_method(uri)
        baseline = {kind: in_process(method, [b for k, b in good if k == kind], 20 if kind == "slice" else 4, 1)
                    for kind in ("slice", "volume")}
        DASHBOARD.append(f"http://{ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False).dashboard_url}")
        watch = MemoryWatch()
        try:
            url = deploy(service_config({MODEL: uri}, host="127.0.0.1", port=args.port, min_replicas=2,
                                        max_replicas=2, cpus_per_replica=1, max_upload_mb=16))
            watch.start()
            run = load(url, good, bad, args.clients, args.duration, args.duration / 2)
        finally:
            watch.stop.set()
            from ray import serve

            serve.shutdown()
            ray.shutdown()

    records = run["records"]
    statuses = Counter(status for *_, status, _, _ in records)
    lost = sum(1 for _, _, status, error, _ in records if status == 503 and error in ("replica_lost", "model_unavailable"))
    other_5xx = sum(1 for _, _, status, error, _ in records if (status >= 500 or status == 0)
                    and not (status == 503 and error in ("replica_lost", "model_unavailable")))
    by_bad = {name: sorted(Counter(s for k, is_bad, s, _, _ in records if is_bad and k == name).items())
              for name in bad}
    summary = {"requests": len(records), "statuses": dict(sorted(statuses.items())),
               "503_killed_replica": lost, "other_5xx_or_no_answer": other_5xx,
               "malformed": by_bad, "victim": run["victim"],
               "replica_peak_rss_mb": {k.rsplit("#", 1)[-1]: round(v / 2**20) for k, v in watch.peak.items()},
               "good": {}}
    for kind in ("slice", "volume"):
        ms = np.array([t for k, is_bad, s, _, t in records if not is_bad and k == kind and s == 200]) * 1000
        base = baseline[kind]
        summary["good"][kind] = {"ok": len(ms), "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
                                 "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
                                 "in_process_p50_ms": base["p50_ms"], "in_process_p99_ms": base["p99_ms"]}

    print(f"{len(records)} requests from {args.clients} clients in {args.duration:g} s; replica {run['victim']} "
          f"killed at {args.duration / 2:g} s")
    print(f"statuses: {summary['statuses']}")
    print(f"503 for the killed replica's requests: {lost}; other 5xx or no answer: {other_5xx}")
    print("malformed inputs (status: count):")
    for name, counts in by_bad.items():
        flag = "ok" if counts and all(400 <= s < 500 for s, _ in counts) else "NOT 4xx"
        print(f"  {name:<44} {dict(counts)} {flag}")
    print(f"replica peak RSS (MiB): {summary['replica_peak_rss_mb']}")
    print(f"{'good requests':<14} {'ok':>6} {'p50 ms':>8} {'p99 ms':>8} {'in-proc p50':>12} {'in-proc p99':>12}")
    for kind, g in summary["good"].items():
        p50 = f"{g['p50_ms']:.1f}" if g["p50_ms"] is not None else "-"
        p99 = f"{g['p99_ms']:.1f}" if g["p99_ms"] is not None else "-"
        print(f"{kind:<14} {g['ok']:>6} {p50:>8} {p99:>8} {g['in_process_p50_ms']:>12.1f} {g['in_process_p99_ms']:>12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
