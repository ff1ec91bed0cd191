"""Errors a user can cause and fix: the CLI prints them as one message, never a traceback."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "FingerprintMismatchError",
    "InputDataError",
    "LeaseHeldError",
    "StorageError",
    "UserError",
]


class UserError(Exception):
    """A mistake in configuration, input data or invocation that the user can fix."""


class ConfigError(UserError):
    """An invalid configuration value; the message names the key and what is allowed."""


class InputDataError(UserError):
    """Input data that cannot be processed; the message names the file and the place in it."""


class FingerprintMismatchError(UserError):
    """An output exists that was made with a different configuration."""


class StorageError(UserError):
    """Object storage (or a local disk) refused or failed an operation after bounded retries;
    the message names the URL and what to set or check."""


class LeaseHeldError(UserError):
    """Another fusion-etl run holds the stage's output folder."""
