"""The Serve application builder: `import_path: raymed.serving.app:build` in serve/raymed.yaml.

`build(args)` binds one `ModelServer` deployment per model, named after the model (so a config's
`deployments:` entry for that name sets its replicas, resources and batching), behind the `Gateway`.
Each model's checkpoint is resolved once here, when the application is deployed, so every replica
serves the same weights even if the run goes on writing checkpoints.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray.serve import Application

from raymed.errors import ConfigError

GATEWAY = "Gateway"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ServiceArgs(BaseModel):
    """The application's `args`: which models to serve, where the API key is, and what one request may cost."""

    model_config = ConfigDict(extra="forbid")
    models: dict[str, str] = Field(description="model name (URL path segment) -> run folder or checkpoint URI")
    api_key_env: str | None = Field(None, description="environment variable holding the API key on every node")
    api_key_file: str | None = Field(None, description="file holding the API key on every node (a mounted Secret)")
    max_upload_mb: float = Field(256, gt=0, description="largest accepted upload in MiB")
    max_generate: int = Field(64, ge=1, description="most images one generate request may ask for")
    max_voxels: int = Field(2**26, ge=1, description="most voxels (all channels) in one upload")
    max_slices: int = Field(1024, ge=1, description="most axial slices one volume may have on the model's grid")
    max_float_mb: float = Field(256, gt=0, description="largest float32 copy of an upload or of its grid at the "
                                                       "model's size, in MiB")
    request_timeout_s: float = Field(120, gt=0, description="a request not answered by then gets a 504")

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict[str, str]) -> dict[str, str]:
        if not models:
            raise ValueError("serve at least one model")
        for name in models:
            if not MODEL_NAME.match(name) or name == GATEWAY:
                raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (not {GATEWAY!r})")
        return models

    @model_validator(mode="after")
    def _one_key_source(self) -> ServiceArgs:
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        return self


def parse_args(args: dict) -> ServiceArgs:
    try:
        return ServiceArgs.model_validate(args)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid serve application args: {problems}") from None


def build(args: dict) -> Application:
    """Bind the gateway and one model deployment per entry of `args['models']`, checkpoints pinned."""
    from raymed.engine.checkpoint import resolve
    from raymed.serving.codecs import Limits
    from raymed.serving.gateway import Gateway
    from raymed.serving.model import ModelServer

    settings = parse_args(args)
    limits = Limits(max_voxels=settings.max_voxels, max_slices=settings.max_slices,
                    max_float_bytes=int(settings.max_float_mb * 2**20))
    models = {name: ModelServer.options(name=name).bind(name, resolve(uri), limits)
              for name, uri in settings.models.items()}
    return Gateway.options(name=GATEWAY).bind(models, settings.api_key_env, settings.api_key_file,
                                              settings.max_upload_mb, settings.max_generate,
                                              settings.request_timeout_s)
