"""metrics.json (for machines), report.md (for people) and the side-by-side table of `raymed compare`."""

from __future__ import annotations

import json
import math

from raymed.data.io import exists, join, read_bytes, write_bytes_atomic
from raymed.errors import DataError

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"

# (header, path into one method's result, format)
COLUMNS = [
    ("AUROC", ("pixel", "auroc"), ".3f"),
    ("AUPRC", ("pixel", "auprc"), ".3f"),
    ("[DICE]", ("pixel", "dice_best"), ".3f"),
    ("Dice@val", ("segmentation", "dice"), ".3f"),
    ("precision", ("segmentation", "precision"), ".3f"),
    ("recall", ("segmentation", "recall"), ".3f"),
    ("slice AUROC", ("detection", "slice", "auroc"), ".3f"),
    ("slice AP", ("detection", "slice", "ap"), ".3f"),
    ("flag rate", ("detection", "slice", "flag_rate"), ".2f"),
]


def clean(value):
    """JSON-safe copy: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def lookup(result: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def headline(result: dict) -> str:
    """One line of the numbers people quote."""
    seg = result.get("segmentation") or {}
    return (f"{result['method']:<10} AUROC {fmt(lookup(result, ('pixel', 'auroc')))}  "
            f"AUPRC {fmt(lookup(result, ('pixel', 'auprc')))}  [DICE] {fmt(lookup(result, ('pixel', 'dice_best')))}  "
            f"Dice@val-threshold {fmt(seg.get('dice'))}")


def write_metrics(out: str, metrics: dict) -> str:
    uri = join(out, METRICS_FILE)
    write_bytes_atomic(uri, json.dumps(clean(metrics), indent=2).encode())
    return uri


def render_markdown(metrics: dict) -> str:
    """The human summary: what was evaluated, the headline tables, figures and how to read them."""
    results = metrics["results"]
    data = metrics["data"]
    primary = results[metrics["primary"]]
    voxels, lesion = primary["pixel"]["positives"] + primary["pixel"]["negatives"], primary["pixel"]["positives"]
    checkpoint = f" (checkpoint `{metrics['checkpoint']}`)" if metrics.get("checkpoint") else ""
    against = " against the `threshold` reference" if len(results) > 1 else ""
    lines = [f"# Evaluation of `{metrics['primary']}`{against}",
             "",
             f"- model: `{metrics['target']}`{checkpoint}",
             f"- data: `{data['source']}`, {data['split']} split: {data['volumes']} volumes "
             f"({data['lesion_volumes']} with lesions), {voxels:,} brain voxels of which {lesion:,} lesion",
             f"- post-processing: {', '.join(primary['postprocess']) or 'none'}",
             f"- image score: {describe_image_score(metrics['settings']['image_score'])}; a volume scores the "
             "maximum of its brain slices",
             ]
    for name, result in results.items():
        chosen = result["thresholds"]
        lines.append(f"- thresholds of `{name}`: {chosen['origin']} — pixel {fmt(chosen.get('pixel'), '.4g')}, "
                     f"image {fmt(chosen.get('image'), '.4g')}")
    lines += [f"- note: {note}" for note in metrics.get("notes", [])]
    lines += ["", "## Pixel level (test voxels inside the brain mask)", "",
              markdown_table(["method", "AUROC", "AUPRC", "[DICE] (upper bound)", "Dice @ val threshold",
                              "precision", "recall"],
                             [[f"`{name}`", fmt(lookup(r, ("pixel", "auroc"))), fmt(lookup(r, ("pixel", "auprc"))),
                               fmt(lookup(r, ("pixel", "dice_best"))),
                               _mean_std(r, "dice"), _mean_std(r, "precision"), _mean_std(r, "recall")]
                              for name, r in results.items()]),
              "",
              "[DICE] sweeps the threshold over the test labels themselves, so it is an upper bound on "
              "any threshold fixed beforehand. Dice, precision and recall at the validation threshold are "
              "means ± standard deviation over the test volumes that contain lesions (the honest numbers).",
              "",
              "## Detection (slices and volumes)", "",
              markdown_table(["method", "slice AUROC", "slice AP", "slice flag rate", "volume AUROC", "volume AP",
                              "volume flag rate"],
                             [[f"`{name}`"] + [fmt(lookup(r, ("detection", level, key)), spec)
                                               for level in ("slice", "volume")
                                               for key, spec in (("auroc", ".3f"), ("ap", ".3f"), ("flag_rate", ".2f"))]
                              for name, r in results.items()]),
              ""]
    fidelity = {name: r["reconstruction"] for name, r in results.items() if r.get("reconstruction")}
    if fidelity:
        lines += ["## Reconstruction of healthy test slices (inside the brain)", "",
                  markdown_table(["method", "slices", "MAE", "PSNR (dB)", "SSIM"],
                                 [[f"`{name}`", str(f["slices"]), fmt(f["mae"], ".4f"), fmt(f["psnr"], ".2f"),
                                   fmt(f["ssim"], ".3f")] for name, f in fidelity.items()]), ""]
    classes = {name: r["classes"] for name, r in results.items() if r.get("classes")}
    if classes:
        values = sorted({value for c in classes.values() for value in c["per_class"]}, key=int)
        lines += ["## Lesion classes (argmax of the segmenter)", "",
                  markdown_table(["method", "mean Dice over classes", *[f"Dice class {v}" for v in values]],
                                 [[f"`{name}`", fmt(c["dice"]), *[fmt(c["per_class"].get(v)) for v in values]]
                                  for name, c in classes.items()]),
                  "", "Per test patient with a lesion the mean over the classes its label has, then the mean "
                      "over patients (Holzschuh et al.); a class's column is its mean over the patients that have it.",
                  ""]
    lines += ["## Figures", ""]
    for name, caption in metrics["files"]["figures"].items():
        lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    lines += [f"## Per volume (`{metrics['primary']}`)", "",
              markdown_table(["subject", "lesion voxels", "Dice", "precision", "recall", "volume score"],
                             [[v["subject"], f"{v['lesion_voxels']:,}", fmt(v.get("dice")), fmt(v.get("precision")),
                               fmt(v.get("recall")), fmt(v["volume_score"], ".4g")] for v in primary["volumes"]]),
              "",
              "## How these numbers were made", "",
              f"- Pixel metrics are streamed through a {metrics['settings']['bins']:,}-bin score histogram (no sort of "
              f"all voxels); the AUROC differs from the exact value by at most "
              f"{max(r['pixel']['auroc_error_bound'] or 0 for r in results.values()):.1e} here.",
              "- Thresholds binarise `map >= threshold`; anomaly maps as NIfTI on the input grid are in "
              f"`{metrics['files']['maps'] or 'not written'}`.",
              ""]
    return "\n".join(lines)


def describe_image_score(spec: dict) -> str:
    if spec["reduction"] == "method":
        return "the detector's own slice score (as `raymed serve` returns it)"
    if spec["reduction"] == "topk":
        return f"mean of the top {spec['fraction']:.1%} brain voxels of a slice's map"
    return "maximum of a slice's map inside the brain"


def _mean_std(result: dict, key: str) -> str:
    seg = result.get("segmentation")
    if not seg or seg.get(key) is None or not math.isfinite(seg[key]):
        return "—"
    return f"{seg[key]:.3f} ± {seg[f'{key}_std']:.3f}"


def find_metrics(path: str, split: str = "test") -> str:
    """metrics.json of an evaluation folder, a run folder (RUN/evaluation/SPLIT, else its generator
    evaluation RUN/evaluation/generator) or the file itself."""
    path = str(path).rstrip("/")
    candidates = [path] if path.endswith(".json") else [join(path, METRICS_FILE),
                                                           join(path, "evaluation", split, METRICS_FILE),
                                                           join(path, "evaluation", "generator", METRICS_FILE)]
    for uri in candidates:
        if exists(uri):
            return uri
    raise DataError(f"{path}: no {METRICS_FILE} (run `raymed evaluate` or `raymed evaluate-generator` first; "
                    f"looked at {', '.join(candidates)})")


def compare_rows(paths: list[str], split: str = "test") -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table: one row per method of each detector evaluation,
    or one per generator evaluation (the GAN evaluation framework's columns)."""
    from raymed.evaluation.generation import GENERATOR_COLUMNS

    evaluations = []
    for path in paths:
        uri = find_metrics(path, split)
        try:
            metrics = json.loads(read_bytes(uri))
        except json.JSONDecodeError:
            metrics = None
        if not isinstance(metrics, dict) or not ("results" in metrics or "generator" in metrics):
            raise DataError(f"{uri}: not a raymed evaluation (metrics.json without results)")
        evaluations.append((path, metrics))
    generators = {"generator" in m for _, m in evaluations}
    if len(generators) > 1:
        raise DataError("compare detector evaluations or generator evaluations, not both in one table")
    if generators == {True}:
        headers = ["evaluation", "method"] + [name for name, _, _ in GENERATOR_COLUMNS]
        return headers, [[path, m["generator"]["method"]] + [fmt(lookup(m, p), spec) for _, p, spec in GENERATOR_COLUMNS]
                         for path, m in evaluations]
    headers = ["evaluation", "method"] + [name for name, _, _ in COLUMNS] + ["thresholds"]
    rows = []
    for path, metrics in evaluations:
        for name, result in metrics["results"].items():
            rows.append([path, name] + [fmt(lookup(result, p), spec) for _, p, spec in COLUMNS]
                        + [lookup(result, ("thresholds", "origin")) or "—"])
    return headers, rows


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
