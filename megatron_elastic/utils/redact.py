"""Credentials out of text: user info and token-like query values of URIs (``https://user:pw@host``
-> ``https://***@host``, ``?token=abc`` -> ``?token=***``). Used wherever a tracking URI could be
printed, logged to MLflow or written to a run directory."""

from __future__ import annotations

import re

SECRET_WORDS = "token|key|secret|password|passwd|pwd|sig|signature|credential|auth"
"""Query keys containing one of these words hold secrets."""
_USERINFO = re.compile(r"(?<=//)[^/@\s'\"]+@")
_SECRET_QUERY = re.compile(rf"([?&;][^=&#\s'\"]*(?:{SECRET_WORDS})[^=&#\s'\"]*=)[^&#\s'\"]+", re.IGNORECASE)
REDACTED = "***"


def redact(text: str) -> str:
    """Hide credentials in any text holding URIs."""
    return _SECRET_QUERY.sub(rf"\1{REDACTED}", _USERINFO.sub(f"{REDACTED}@", str(text)))


def is_redacted(uri: str) -> bool:
    """True for a URI whose credentials were replaced by :func:`redact` (it cannot authenticate)."""
    return redact(uri) == uri and (f"//{REDACTED}@" in uri or f"={REDACTED}" in uri)
