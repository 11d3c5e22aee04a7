"""Checkpoints: every module, optimizer, scheduler and scaler state plus where training stood.

Saved with `torch.save` and loaded with `torch.load(weights_only=True)`, so a checkpoint from
an untrusted place cannot run code. A run folder's `result.json` names its best checkpoint.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from raymed.data.io import exists, filesystem, join, read_bytes
from raymed.errors import DataError
from raymed.methods.base import Method
from raymed.methods.registry import build_config, method_class

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def save(folder: str | Path, method: Method, optimizers: dict, scaler, position: dict, metrics: dict,
         schedulers: dict | None = None, early: dict | None = None) -> None:
    """Write `state.pt` and a readable `meta.json` into a local folder (Ray persists it).

    `position` is where training goes on from (phase, epoch, step); optimizers, schedulers and
    the early-stopping record belong to that phase, so a checkpoint at a phase boundary holds none.
    """
    folder = Path(folder)
    state = {
        "method": method.name,
        "in_channels": method.in_channels,
        "config": method.config.model_dump(mode="json"),
        "nets": {name: net.state_dict() for name, net in method.nets.items()},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "schedulers": {name: sched.state_dict() for name, sched in (schedulers or {}).items()},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "early": early or {},
        "position": position,
    }
    torch.save(state, folder / STATE_FILE)
    meta = {k: state[k] for k in ("method", "in_channels", "config", "position")}
    meta["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def load_state(uri: str) -> dict:
    """Read `state.pt` from a checkpoint folder (local or s3://) without unpickling code."""
    data = read_bytes(join(uri, STATE_FILE))
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"{join(uri, STATE_FILE)}: not a readable raymed checkpoint ({err})") from None


def method_from_state(state: dict) -> Method:
    """Rebuild the method with its config and load every module's weights."""
    config = build_config(state["method"], state["config"])
    method = method_class(state["method"])(config, state["in_channels"])
    for name, weights in state["nets"].items():
        method.nets[name].load_state_dict(weights)
    method.nets.eval()
    return method


def resolve(uri: str) -> str:
    """A checkpoint folder from a checkpoint URI or a run folder (its best checkpoint)."""
    uri = str(uri).rstrip("/")
    if exists(join(uri, STATE_FILE)):
        return uri
    if exists(join(uri, "result.json")):
        best = json.loads(read_bytes(join(uri, "result.json"))).get("best_checkpoint")
        if best:
            return best
    latest = latest_checkpoint(uri)
    if latest:
        return latest
    raise DataError(f"{uri}: no raymed checkpoint here (expected {STATE_FILE} or a run folder)")


def latest_checkpoint(run: str) -> str | None:
    """The newest `checkpoint_*` folder of a run folder, by name (names sort by step)."""
    fs, path = filesystem(run)
    if not fs.exists(path):
        return None
    folders = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                     if p.rsplit("/", 1)[-1].startswith("checkpoint_"))
    return join(run, folders[-1]) if folders else None


def load_method(uri: str) -> tuple[Method, dict]:
    """(method ready for inference, checkpoint state) from a checkpoint or run URI."""
    folder = resolve(uri)
    state = load_state(folder)
    state["uri"] = folder
    return method_from_state(state), state


def init_from(method: Method, uri: str, strict: bool) -> str:
    """Load another run's weights into `method` (`train.init_from`); returns a one-line summary.

    strict: every module and tensor must match. Otherwise tensors whose module, name and shape
    match are loaded and the rest stay as built (e.g. a new segmentation head).
    """
    folder = resolve(uri)
    source = load_state(folder)["nets"]
    if strict:
        missing = sorted(set(method.nets) - set(source))
        if missing:
            raise DataError(f"init_from {folder}: no weights for module(s) {', '.join(missing)} "
                            "(set train.init_strict=false to keep them fresh)")
        for name, net in method.nets.items():
            try:
                net.load_state_dict(source[name])
            except RuntimeError as err:
                raise DataError(f"init_from {folder}: module {name} does not match ({str(err).splitlines()[0]}; "
                                "set train.init_strict=false to load only matching tensors)") from None
        return f"init_from {folder}: all {len(method.nets)} module(s) loaded"
    loaded, fresh = 0, []
    for name, net in method.nets.items():
        own = net.state_dict()
        theirs = source.get(name, {})
        match = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
        fresh += [f"{name}.{k}" for k in own if k not in match]
        own.update(match)
        net.load_state_dict(own)
        loaded += len(match)
    if not loaded:
        raise DataError(f"init_from {folder}: no tensor matches this method's modules by name and shape")
    kept = f"; fresh: {', '.join(fresh[:6])}{' …' if len(fresh) > 6 else ''}" if fresh else ""
    return f"init_from {folder}: {loaded} tensor(s) loaded{kept}"
