"""Method names → classes, and building a validated config from files and --set overrides."""

from __future__ import annotations

import importlib
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raymed.errors import ConfigError
from raymed.methods.base import Method, MethodConfig

# name → module that defines it; imported lazily so `raymed --help` stays fast.
METHODS = {
    "ae": "raymed.methods.ae:AutoEncoderMethod",
    "vae": "raymed.methods.vae:VariationalAutoEncoderMethod",
    "gmvae": "raymed.methods.gmvae:GaussianMixtureVAE",
    "fanogan": "raymed.methods.fanogan:FAnoGAN",
    "threshold": "raymed.methods.threshold:IntensityThreshold",
    "dae": "raymed.methods.dae:DenoisingAutoEncoder",
    "pas": "raymed.methods.pas:PseudoAnomalySynthesis",
    "cycle": "raymed.methods.cycle:CycleTranslation",
    "dcgan": "raymed.methods.gan:DCGAN",
    "lsgan": "raymed.methods.gan:LSGAN",
    "wgangp": "raymed.methods.gan:WGANGP",
    "acgan": "raymed.methods.gan:ACGAN",
    "stylegan_ad": "raymed.methods.stylegan_ad:StyleGANAD",
}


def method_class(name: str) -> type[Method]:
    """A registered method by short name, or any `package.module:Class` importable on the
    driver and the workers (a method kept outside raymed)."""
    target = METHODS.get(name) or (name if ":" in name else None)
    if target is None:
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))}, or module:Class)")
    module, cls = target.split(":", 1)
    try:
        found = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"method {name!r} cannot be imported ({err})") from None
    if not (isinstance(found, type) and issubclass(found, Method)):
        raise ConfigError(f"method {name!r} is not a raymed Method class")
    return found


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists: 1e-4, true, [32, 64], null."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_yaml(path: str) -> dict:
    from raymed.data.io import read_bytes

    try:
        loaded = yaml.safe_load(read_bytes(path)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return loaded


def merged(defaults: dict, given: dict) -> dict:
    """`given` on top of `defaults`, section by section: setting one key of a section (e.g.
    `postprocess.median`) keeps the method's defaults for the others."""
    out = dict(defaults)
    for key, value in given.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_config(name: str, base: dict | None = None, overrides: dict[str, Any] | None = None) -> MethodConfig:
    """Validate a config for method `name`; errors name the offending key."""
    cls = method_class(name)
    tree = merged(cls.Config().model_dump(mode="json"), base or {})
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    return validated(cls.Config, tree, f"invalid {name} config")


def validated(model: type[BaseModel], tree: dict, what: str, prefix: str = ""):
    """`model` from a tree of keys; a ConfigError naming every offending (dotted) key."""
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = prefix + (".".join(str(p) for p in e["loc"]) or "config")
            why = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"{where}: {why}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" else ""))
        raise ConfigError(f"{what}: " + "; ".join(problems)) from None


def config_keys(config_cls: type[MethodConfig], prefix: str = "") -> set[str]:
    """Every dotted key a Config accepts (used to check tune spaces)."""
    keys = set()
    for fname, finfo in config_cls.model_fields.items():
        ann = finfo.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= config_keys(ann, f"{prefix}{fname}.")
        else:
            keys.add(prefix + fname)
    return keys
