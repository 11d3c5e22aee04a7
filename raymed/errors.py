"""Errors a user can act on: each names the file, field or value that was wrong."""


class RaymedError(Exception):
    """Base class; the CLI prints these as one line instead of a traceback."""


class DataError(RaymedError):
    """A volume, image, manifest or dataset that cannot be used as it is."""


class ConfigError(RaymedError):
    """An unknown method, an unknown config key or a value of the wrong type."""
