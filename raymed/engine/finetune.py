"""Fine-tuning a pre-trained detector as a segmenter on a few labelled subjects (Holzschuh et
al., MIDL 2023): the run's own config with `task=segment`, k labelled subjects, and its weights
loaded by name and shape (`train.init_from`, non-strict), so only the new head starts fresh.
`--from-scratch` is the same config without the weights: the paper's baseline. `--classes` makes
it the multi-class variant."""

from __future__ import annotations

import yaml

from raymed.data.io import join, read_bytes
from raymed.engine.checkpoint import resolve
from raymed.errors import ConfigError
from raymed.methods.base import MethodConfig
from raymed.methods.registry import build_config, method_class


def parse_labelled(text: str) -> int | None:
    """`--labelled K` or `all` (every labelled subject of the split)."""
    if text == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise ConfigError(f"--labelled {text!r}: expected a number of subjects ≥ 1 or 'all'")
    return k


def finetune_config(run: str, labelled: int | None, scratch: bool = False, overrides: dict | None = None,
                    classes: list[int] | None = None) -> tuple[str, MethodConfig]:
    """(method, config) of the segmenter fine-tuned from `run` (a run or checkpoint folder);
    `classes`: the label values to segment apart (None: the whole lesion)."""
    saved = yaml.safe_load(read_bytes(join(str(run).rstrip("/"), "config.yaml")))
    method = saved["method"]
    fields = method_class(method).Config.model_fields
    if "task" not in fields or "labelled_subjects" not in fields:
        raise ConfigError(f"{method} has no segmentation task to fine-tune (its config has no task/labelled_subjects)")
    tree = saved["config"]
    tree.update(task="segment", labelled_subjects=labelled, classes=classes)
    tree["train"].update(init_from=None if scratch else resolve(run), init_strict=False)
    return method, build_config(method, tree, overrides)
