"""Keep credentials out of everything fusion-etl writes or prints.

Credentials never enter the config, but they live in this process's environment and in the
AWS config files, and a library message (an exception, a warning, a log line) could quote
one. `scrub` replaces every credential value known to this process with `***`; the console,
the log file and the CLI's error line pass through it.
"""

from __future__ import annotations

import configparser
import os
from functools import lru_cache
from pathlib import Path

__all__ = ["known_secrets", "scrub"]

# Environment variables whose values are secrets (the key id is not: it names the key).
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_BEARER_TOKEN_BEDROCK",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
)
# Keys in ~/.aws/credentials and ~/.aws/config whose values are secrets.
_SECRET_KEYS = ("aws_secret_access_key", "aws_session_token", "aws_security_token")
# Shorter values are not scrubbed: replacing "1" everywhere would garble text for nothing.
_MIN_LENGTH = 6


def _file_secrets(path: str) -> set[str]:
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return set()
    return {
        parser.get(section, key)
        for section in parser.sections()
        for key in _SECRET_KEYS
        if parser.has_option(section, key)
    }


@lru_cache(maxsize=8)
def _cached(env: tuple[tuple[str, str], ...], files: tuple[tuple[str, int], ...]) -> frozenset[str]:
    found = {value for _, value in env}
    for path, _mtime in files:
        found |= _file_secrets(path)
    return frozenset(s.strip() for s in found if len(s.strip()) >= _MIN_LENGTH)


def known_secrets() -> frozenset[str]:
    """Credential values from the environment and the AWS shared config/credentials files."""
    env = tuple((k, os.environ[k]) for k in _SECRET_ENV if os.environ.get(k))
    home = Path.home() / ".aws"
    files = (
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or str(home / "credentials"),
        os.environ.get("AWS_CONFIG_FILE") or str(home / "config"),
    )
    # The files' modification times are part of the key: an edited file is read again.
    stamped = tuple((f, os.stat(f).st_mtime_ns) for f in files if os.path.isfile(f))
    return _cached(env, stamped)


def scrub(text: str) -> str:
    """`text` with every known credential value replaced by `***`."""
    for secret in known_secrets():
        if secret in text:
            text = text.replace(secret, "***")
    return text
