"""The base of every settings model: unknown keys and wrong types are errors, never ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Configs reject unknown keys and wrong types instead of silently ignoring them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
