"""Errors a user can act on: each says what is wrong and where (file, tensor, server, expert)."""


class CoelError(Exception):
    """Base of every error the `coel` command reports without a traceback."""


class CheckpointError(CoelError):
    """A checkpoint file is missing, truncated, or does not match its config."""


class ConfigError(CoelError):
    """A config, topology, scenario or plan file is malformed."""


class InfeasibleError(CoelError):
    """A budget or placement cannot be met; the message carries the numbers."""
