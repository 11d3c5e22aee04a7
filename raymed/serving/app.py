"""The Serve application builder: `import_path: raymed.serving.app:build` in serve/raymed.yaml.

`build(args)` binds one `ModelServer` deployment per model, named after the model (so a config's
`deployments:` entry for that name sets its replicas, resources and batching), behind the `Gateway`.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray.serve import Application

from raymed.errors import ConfigError

GATEWAY = "Gateway"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ServiceArgs(BaseModel):
    """The application's `args`: which models to serve and the gateway's limits."""

    model_config = ConfigDict(extra="forbid")
    models: dict[str, str] = Field(description="model name (URL path segment) -> run folder or checkpoint URI")
    api_key_env: str | None = Field(None, description="environment variable holding the API key; null: no key")
    max_upload_mb: float = Field(256, gt=0, description="largest accepted upload (and decompressed NIfTI) in MiB")
    max_generate: int = Field(64, ge=1, description="most images one generate request may ask for")

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict[str, str]) -> dict[str, str]:
        if not models:
            raise ValueError("serve at least one model")
        for name in models:
            if not MODEL_NAME.match(name) or name == GATEWAY:
                raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (not {GATEWAY!r})")
        return models


def parse_args(args: dict) -> ServiceArgs:
    try:
        return ServiceArgs.model_validate(args)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid serve application args: {problems}") from None


def build(args: dict) -> Application:
    """Bind the gateway and one model deployment per entry of `args['models']`."""
    from raymed.serving.deployments import Gateway, ModelServer

    settings = parse_args(args)
    decoded_mb = 8 * settings.max_upload_mb  # room for gzip-compressed NIfTI
    models = {name: ModelServer.options(name=name).bind(name, uri, decoded_mb)
              for name, uri in settings.models.items()}
    return Gateway.options(name=GATEWAY).bind(models, settings.api_key_env, settings.max_upload_mb,
                                              settings.max_generate)
