"""Search spaces: `tune_spaces/METHOD.yaml` maps dotted config keys to distributions.

    lr:               {loguniform: [1.0e-5, 1.0e-3]}   # log-uniform between the bounds
    kl_weight:        {uniform: [0.1, 2.0]}            # uniform between the bounds
    latent_size:      {int: [32, 256]}                 # integer, both bounds included
    kernel_size:      {choice: [3, 5]}                 # one of the values
    loss:             {grid: [l1, l2]}                 # every value is run at least once

Every key must be a key of the method's `Config`, and every bound and value must be valid for
it, so a typo or an impossible range fails when the space is loaded instead of in every trial.
"""

from __future__ import annotations

import itertools
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from ray import tune

from raymed.errors import ConfigError
from raymed.methods.registry import build_config, config_keys, load_yaml, method_class

KINDS = ("uniform", "loguniform", "int", "choice", "grid")
RANGES = ("uniform", "loguniform", "int")

# Registered methods whose Config has nothing worth sweeping (no space file is expected).
TUNING_FREE = frozenset({"threshold"})

Scalar = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Param:
    """One tuned key: `values` is (low, high) for ranges, the options for choice/grid."""

    key: str
    kind: str
    values: tuple

    def domain(self):
        """The Tune domain (grid values become a categorical for the searcher)."""
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "int":
            return tune.randint(self.values[0], self.values[1] + 1)
        return tune.choice(list(self.values))

    def to_yaml(self) -> dict:
        return {self.kind: list(self.values)}


def field_type(config_cls: type[BaseModel], key: str):
    """The annotation of a dotted key, e.g. `train.batch_size` → int."""
    cls, parts = config_cls, key.split(".")
    for part in parts[:-1]:
        cls = cls.model_fields[part].annotation
    return cls.model_fields[parts[-1]].annotation


def _number(value: Any) -> Any:
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _parse_param(method: str, key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: {key}: expected one of {{{', '.join(KINDS)}: …}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"{where}: {key}: unknown distribution {kind!r} (known: {', '.join(KINDS)})")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {key}: {kind} needs a non-empty list, got {values!r}")
    if kind in RANGES:
        if kind != "int":  # YAML 1.1 reads 1e-5 (no dot) as text
            values = [_number(v) for v in values]
        number = int if kind == "int" else (int, float)
        if len(values) != 2 or not all(isinstance(v, number) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}: {key}: {kind} needs [low, high] as {'integers' if kind == 'int' else 'numbers'}, "
                              f"got {values!r}")
        low, high = values
        if not low < high:
            raise ConfigError(f"{where}: {key}: {kind} needs low < high, got {values!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: {key}: loguniform needs low > 0, got {low!r}")
        annotation = field_type(method_class(method).Config, key)
        integer = annotation is int or (int in typing.get_args(annotation) and float not in typing.get_args(annotation))
        if kind != "int" and integer:
            raise ConfigError(f"{where}: {key} is an integer: use {{int: [low, high]}}")
    else:
        bad = [v for v in values if not isinstance(v, Scalar)]
        if bad:
            raise ConfigError(f"{where}: {key}: {kind} values must be numbers, strings, booleans or null, got {bad[0]!r}")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: {key}: {kind} values repeat: {values!r}")
    for value in values:
        try:
            build_config(method, {}, {key: value})
        except ConfigError as err:
            raise ConfigError(f"{where}: {key}: value {value!r} is not valid ({err})") from None
    return Param(key, kind, tuple(values))


def parse_space(method: str, tree: Any, where: str = "search space") -> dict[str, Param]:
    """Validate a space (a mapping of dotted keys) against `method`'s Config."""
    if method in TUNING_FREE:
        raise ConfigError(f"method {method} has nothing to tune")
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{where}: expected a mapping of config keys to distributions")
    known = config_keys(method_class(method).Config)
    unknown = sorted(str(k) for k in tree if k not in known)
    if unknown:
        raise ConfigError(f"{where}: {', '.join(unknown)}: not a key of the {method} config "
                          f"(known: {', '.join(sorted(known))})")
    return {key: _parse_param(method, key, spec, where) for key, spec in tree.items()}


def load_space(path: str, method: str) -> dict[str, Param]:
    return parse_space(method, load_yaml(path), where=path)


def param_space(space: dict[str, Param]) -> dict:
    """Tune's `param_space`: dotted key → domain."""
    return {key: p.domain() for key, p in space.items()}


def grid_points(space: dict[str, Param]) -> list[dict]:
    """Every combination of the grid keys (none when no key is a grid)."""
    grid = [p for p in space.values() if p.kind == "grid"]
    if not grid:
        return []
    return [dict(zip([p.key for p in grid], combo)) for combo in itertools.product(*[p.values for p in grid])]


def corner_values(space: dict[str, Param]) -> list[dict]:
    """Each key at each of its bounds/options, the others unset (to find the longest trial)."""
    return [{p.key: v} for p in space.values() for v in p.values]
