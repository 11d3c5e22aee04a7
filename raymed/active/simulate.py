"""`raymed active simulate`: the labelling loop of Chong et al. on a labelled data set.

The pool is the training split's slices (every label known, revealed only when queried). Each
repeat starts from a random `start` share of the pool, shared by every strategy; a round trains
the segmentation model (`dae` with task=segment: MONAI DynUNet, Dice + cross-entropy) on the
labelled slices as a Ray Train job, scores it by Dice on the test split's slices, and then every
strategy picks its next `step` share of the pool, side by side as Ray tasks.

Everything a round makes is kept under OUT (the slice lists, the runs, `rounds.jsonl`), so a
rerun of the same command continues where it stopped and repeats nothing.
The detector's failure prediction is measured on the test slices too: AUROC of its anomaly score
for "the final model of the first strategy has slice Dice below `fail_dice`" (a slice without
lesion and without predicted lesion counts as Dice 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import ray

from raymed.active.strategies import Strategy, batched, choose, scores
from raymed.console import start_ray
from raymed.data.discovery import discover
from raymed.data.io import exists, join, read_bytes, write_bytes_atomic
from raymed.data.slices import SliceSet, load_slices, write_slice_list
from raymed.data.splits import assign_splits, select
from raymed.engine.checkpoint import load_method
from raymed.engine.trainer import TrainRequest, absolute, train
from raymed.errors import DataError
from raymed.methods.registry import build_config


@dataclass
class Simulation:
    source: str
    out: str
    strategies: list[Strategy]
    detector: str | None = None
    rounds: int = 3
    start: float = 0.1
    step: float = 0.1
    repeats: int = 5
    workers: int = 2
    fail_dice: float = 0.5
    pattern: str | None = None
    base: dict = field(default_factory=dict)  # segmentation config keys (a --config file)
    overrides: dict = field(default_factory=dict)  # dotted keys (--set)


def dice(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-sample Dice of boolean (N, H, W) masks; 1 where both are empty."""
    p, t = predicted.reshape(len(predicted), -1), target.reshape(len(target), -1)
    overlap, size = (p & t).sum(1), p.sum(1) + t.sum(1)
    return np.where(size > 0, 2 * overlap / np.maximum(size, 1), 1.0)


def segment(run: str, slices: SliceSet) -> np.ndarray:
    """A trained segmentation run's lesion masks (N, H, W) for slices, inside the brain mask."""
    method, _ = load_method(run)
    (probabilities,) = batched(lambda x: method.forward(x).softmax(1), slices.image)
    return (probabilities.argmax(1) > 0) & (slices.mask > 0)


@ray.remote(num_cpus=1)
def pick(strategy: Strategy, image: np.ndarray, mask: np.ndarray, segmenter_run: str, detector_run: str | None,
         labelled: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """One strategy's next query, as a Ray task."""
    segmenter, _ = load_method(segmenter_run)
    detector = load_method(detector_run)[0] if detector_run and strategy.score == "anomaly" else None
    values, embeddings = scores(strategy, image, mask, segmenter, detector, seed)
    return choose(strategy, values, embeddings, labelled, budget, seed)


def progress(line: str) -> None:
    print(line, flush=True)


def simulate(sim: Simulation) -> dict:
    start_ray()
    out = absolute(sim.out)
    cases = assign_splits(discover(sim.source, sim.pattern))
    config = build_config("dae", sim.base, {"task": "segment", "labelled_subjects": None, **sim.overrides})
    pool = load_slices(select(cases, "train"), config.data, min_brain=config.data.min_brain, skip_bad=config.data.skip_bad)
    test = load_slices(select(cases, "test"), config.data, min_brain=config.data.min_brain, skip_bad=config.data.skip_bad)
    if not pool.lesion.any() or not len(test):
        raise DataError(f"{sim.source}: active learning needs labelled lesions in the train split and a test split")
    start, step = max(1, round(sim.start * len(pool))), max(1, round(sim.step * len(pool)))
    progress(f"active learning: pool of {len(pool)} slices ({pool.lesion.mean():.0%} with lesion), {len(test)} test "
        f"slices; {start} to start, {step} per round, {sim.rounds} rounds, {sim.repeats} repeats")
    log_uri = join(out, "rounds.jsonl")
    done = {(r["repeat"], r["strategy"], r["round"]): r for r in read_rounds(log_uri)}
    image_ref, mask_ref = ray.put(pool.image), ray.put(pool.mask)

    def train_round(repeat: int, name: str, round_: int, labelled: np.ndarray) -> dict:
        key = (repeat, name, round_)
        if key in done:
            return done[key]
        tag = f"rep{repeat}-{name.replace(':', '-')}-r{round_}"
        slice_list = join(out, "slices", f"{tag}.csv")
        write_slice_list(slice_list, [pool.keys[i] for i in sorted(labelled)])
        run_config = config.model_copy(update={"labelled_slices": slice_list})
        result = train(TrainRequest(method="dae", source=sim.source, pattern=sim.pattern, config=run_config,
                                    name=tag, storage=join(out, "runs"), workers=sim.workers))
        if result.error is not None:
            raise result.error
        run = join(out, "runs", tag)
        predicted = segment(run, test)
        row = {"repeat": repeat, "strategy": name, "round": round_, "labelled": len(labelled),
               "fraction": len(labelled) / len(pool), "dice": global_dice(predicted, test.label > 0),
               "run": run, "indices": sorted(int(i) for i in labelled)}
        append_round(log_uri, row)
        done[key] = row
        return row

    for repeat in range(sim.repeats):
        seed = 1000 * repeat
        initial = np.sort(np.random.default_rng(seed).choice(len(pool), start, replace=False))
        first = train_round(repeat, "initial", 0, initial)
        state = {s.name: (initial, first["run"]) for s in sim.strategies}
        progress(f"repeat {repeat + 1}/{sim.repeats}: round 0, {len(initial)} slices, test Dice {first['dice']:.3f}")
        for round_ in range(1, sim.rounds + 1):
            pending = {s.name: done[(repeat, s.name, round_)] for s in sim.strategies if (repeat, s.name, round_) in done}
            futures = {s.name: pick.remote(s, image_ref, mask_ref, state[s.name][1], sim.detector, state[s.name][0],
                                           step, seed + round_)
                       for s in sim.strategies if s.name not in pending}
            for name, future in futures.items():
                labelled = np.union1d(state[name][0], ray.get(future))
                pending[name] = train_round(repeat, name, round_, labelled)
            for name, row in pending.items():
                state[name] = (np.array(row["indices"]), row["run"])
            progress(f"repeat {repeat + 1}/{sim.repeats}: round {round_}, "
                + ", ".join(f"{n} {pending[n]['dice']:.3f}" for n in state))
    rows = list(done.values())
    summary = {"pool": len(pool), "test_slices": len(test), "rounds": rows_by_strategy(rows, sim)}
    if sim.detector:
        summary["failure_prediction"] = failure_prediction(sim, rows, test)
    write_bytes_atomic(join(out, "summary.json"), json.dumps(summary, indent=2).encode())
    write_bytes_atomic(join(out, "report.md"), report(summary).encode())
    write_bytes_atomic(join(out, "dice_per_round.png"), plot(summary))
    return summary


def global_dice(predicted: np.ndarray, target: np.ndarray) -> float:
    return float(2 * (predicted & target).sum() / max(predicted.sum() + target.sum(), 1))


def read_rounds(uri: str) -> list[dict]:
    return [json.loads(line) for line in read_bytes(uri).decode().splitlines() if line] if exists(uri) else []


def append_round(uri: str, row: dict) -> None:
    rows = read_rounds(uri) + [row]
    write_bytes_atomic(uri, "".join(json.dumps(r) + "\n" for r in rows).encode())


def rows_by_strategy(rows: list[dict], sim: Simulation) -> dict:
    """strategy → per round: labelled fraction, mean and SD of test Dice over repeats."""
    table = {}
    for s in sim.strategies:
        per_round = []
        for round_ in range(sim.rounds + 1):
            name = "initial" if round_ == 0 else s.name
            values = [r["dice"] for r in rows if r["strategy"] == name and r["round"] == round_]
            fraction = next(r["fraction"] for r in rows if r["strategy"] == name and r["round"] == round_)
            per_round.append({"round": round_, "fraction": fraction, "dice": float(np.mean(values)),
                              "sd": float(np.std(values)), "repeats": len(values)})
        table[s.name] = per_round
    return table


def failure_prediction(sim: Simulation, rows: list[dict], test: SliceSet) -> dict:
    """AUROC of the detector's anomaly score for the segmentation model failing on a test slice."""
    from sklearn.metrics import roc_auc_score

    final = max((r for r in rows if r["strategy"] == sim.strategies[0].name and r["repeat"] == 0),
                key=lambda r: r["round"])
    failed = dice(segment(final["run"], test), test.label > 0) < sim.fail_dice
    detector, _ = load_method(sim.detector)
    (score,) = batched(lambda x: detector.anomaly_map(x)[1], test.image)
    auroc = float(roc_auc_score(failed, score)) if 0 < failed.sum() < len(failed) else None
    return {"model": final["run"], "fail_dice": sim.fail_dice, "slices": len(failed),
            "failures": int(failed.sum()), "auroc": auroc}


def report(summary: dict) -> str:
    lines = ["# Active learning: test Dice per round", "",
             f"Pool: {summary['pool']} training slices; Dice over {summary['test_slices']} test slices "
             "(mean ± SD over repeats).", ""]
    strategies = list(summary["rounds"])
    first = summary["rounds"][strategies[0]]
    lines += ["| strategy | " + " | ".join(f"{r['fraction']:.0%}" for r in first) + " |",
              "| --- |" + " --- |" * len(first)]
    for name, per_round in summary["rounds"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['dice']:.3f} ± {r['sd']:.3f}" for r in per_round) + " |")
    fp = summary.get("failure_prediction")
    if fp:
        auroc = "undefined (one class only)" if fp["auroc"] is None else f"{fp['auroc']:.3f}"
        lines += ["", f"Failure prediction: AUROC {auroc} of the anomaly score for slice Dice < {fp['fail_dice']} "
                      f"({fp['failures']} of {fp['slices']} test slices fail)."]
    return "\n".join(lines) + "\n"


def plot(summary: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, per_round in summary["rounds"].items():
        x = [100 * r["fraction"] for r in per_round]
        y, sd = np.array([r["dice"] for r in per_round]), np.array([r["sd"] for r in per_round])
        ax.plot(x, y, marker="o", label=name)
        ax.fill_between(x, y - sd, y + sd, alpha=0.15)
    ax.set(xlabel="labelled share of the pool (%)", ylabel="test Dice", title="segmentation Dice per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
