"""Secrets never reach a file the pipeline writes.

Credentials arrive three ways, and each is removed before anything is written down (the
saved config, manifests, the quarantine file, the exported model's metadata, tracker
parameters):

- under a secret-looking key of ``cluster.runtime_env`` (``HF_TOKEN``, ``WANDB_API_KEY``,
  ``AWS_SECRET_ACCESS_KEY`` ...): the value is replaced (``redact_runtime_env``);
- inside a value: the user-info of a URI (``s3://KEY:SECRET@bucket``,
  ``https://user:pass@host``, a token in a pip index URL) and secret-looking query
  parameters (``?token=...``, ``X-Amz-Signature=...``);
- through the environment: the value of any environment variable whose name looks secret
  is replaced wherever it appears in a written string.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"
SECRET_WORDS = ("token", "key", "secret", "password", "passwd", "credential", "auth", "signature")
# scheme://user[:password]@  (the user-info of a URI). A password may hold "/" and "@"
# (AWS secret keys hold "/"): after "user:" it runs to the last "@" before whitespace. A
# user-info without ":" (a token alone) holds neither, so "git+https://host/repo@v1" stays.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s?#:]*:\S*|[^/@\s?#]+)@")
# ?name=value or &name=value where the name looks secret (sig, token, X-Amz-Signature ...)
_QUERY = re.compile(r"(?P<name>[?&][^=&\s#]*(?:token|key|secret|password|sig|signature|credential|auth)"
                    r"[^=&\s#]*=)(?P<value>[^&\s#]+)", re.IGNORECASE)
# Environment values shorter than this are not treated as secrets (true, 1, disabled ...).
MIN_ENV_SECRET = 12


def secret_name(name: str) -> bool:
    return any(w in name.lower() for w in SECRET_WORDS)


def env_secret_values(environ: dict | None = None) -> list[str]:
    """Values of secret-named environment variables, longest first."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if secret_name(k) and len(v) >= MIN_ENV_SECRET and not v.isspace()}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, env_values: list[str] | None = None) -> str:
    """A string with URI credentials, secret query parameters and environment secrets
    replaced by ``<redacted>``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _QUERY.sub(lambda m: f"{m['name']}{REDACTED}", text)
    for value in env_secret_values() if env_values is None else env_values:
        text = text.replace(value, REDACTED)
    return text


def redact_values(obj: Any, env_values: list[str] | None = None) -> Any:
    """Every string in a JSON-like tree through ``redact_text`` (keys too)."""
    env_values = env_secret_values() if env_values is None else env_values
    if isinstance(obj, str):
        return redact_text(obj, env_values)
    if isinstance(obj, dict):
        return {redact_values(k, env_values): redact_values(v, env_values) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_values(v, env_values) for v in obj)
    return obj


def redact_runtime_env(raw: Any) -> Any:
    """Values under secret-looking keys replaced (for ``cluster.runtime_env``, whose env_vars
    hold credentials by name; elsewhere in the config "key" and "token" are ordinary words:
    ``prompt_key``, ``max_tokens_per_row``)."""
    if isinstance(raw, dict):
        return {k: (REDACTED if isinstance(k, str) and secret_name(k) and isinstance(v, (str, int, float))
                    and not isinstance(v, bool) else redact_runtime_env(v))
                for k, v in raw.items()}
    if isinstance(raw, list):
        return [redact_runtime_env(v) for v in raw]
    return raw
