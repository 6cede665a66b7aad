"""URLs this tool reads, and how they are shown: without user names, passwords and signatures.

The *display form* of a URL (`redact_url`) replaces user names and
passwords, and the values of signing and token parameters
(`X-Amz-Signature`, `X-Goog-Credential`, `token`, `sig`, ...), by `***`.
Messages, logs and outputs show only that (`redact_text` does it to any
text, e.g. a client's error that quotes the URL it requested); the full URL
is handed to the storage client alone.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# scheme -> the package (of the [cloud] extra) that reads it
SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}
BUCKET_SCHEMES = ("s3", "gs", "gcs")
CLOUD_EXTRA = "pip install 'mmap-deploy[cloud]'"
URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Query parameters whose values are secrets (signed URLs of S3, GCS and Azure, tokens, API keys)
_SECRET_PARAM = re.compile(r"sig|credential|token|secret|password|passwd|pwd|auth|key|session|policy", re.I)
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>)\]]+")
HIDDEN = "***"


def is_url(text: object) -> bool:
    """Whether `text` is a URL of a scheme this module reads (`s3://`, `gs://`, `http(s)://`)."""
    if not isinstance(text, str):
        return False
    m = URL_SCHEME.match(text)
    return bool(m) and m.group(1).lower() in SCHEMES


def redact_url(url: str) -> str:
    """The display form of a URL: no user:password, no values of signing or token parameters, no fragment."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return HIDDEN
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{HIDDEN}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        fields = []
        for field in query.split("&"):
            name, eq, value = field.partition("=")
            fields.append(f"{name}={HIDDEN}" if eq and _SECRET_PARAM.search(name) else field)
        query = "&".join(fields)
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


_secrets: set[str] = set()  # storage option values (keys, tokens) that must never be shown


def add_secret(value: str) -> None:
    """A value (an access key, a token) that `redact_text` hides wherever it appears."""
    if isinstance(value, str) and len(value) >= 4:
        _secrets.add(value)


def redact_text(text: str) -> str:
    """`text` with every URL in its display form and every registered secret hidden.

    For messages built from others' exceptions (an HTTP client puts the
    requested URL, signature and all, into its error text), and for a
    command line recorded in an output's provenance.
    """
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))
    for secret in _secrets:
        text = text.replace(secret, HIDDEN)
    return text
