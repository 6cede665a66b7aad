"""`RemoteURL`: the names of a remote location (an `s3://`, `gs://`, `https://` or `http://` URL), no I/O.

What the storage calls (`access`, `ranges`) take; `path.RemotePath` adds the
part of `pathlib.Path` that reads (`exists`, `open`, ...) on top of it.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from ..errors import UserError
from .naming import BUCKET_SCHEMES, SCHEMES, URL_SCHEME, is_url, redact_url

class RemoteURL:
    """An object in a bucket or a file on a web server, named by its URL: the names, no I/O.

    `str()` is the display form (secrets hidden); `url` the full URL, for
    the storage client only. Pickles as its URL, so it travels to Ray
    workers; credentials are never part of it (each machine has its own:
    environment, profile, instance role or ADC). `path.RemotePath` adds
    what reads it; the storage calls (`access`, `ranges`) need only this.
    """

    __slots__ = ("_url", "scheme", "netloc", "key", "query")

    def __init__(self, url: str):
        m = URL_SCHEME.match(url)
        if not m or m.group(1).lower() not in SCHEMES:
            raise UserError(f"{redact_url(url)}: not a URL this tool reads; use s3://, gs://, https:// or a local path")
        parts = urlsplit(url)
        self.scheme = parts.scheme.lower()
        self.netloc = parts.netloc
        if not self.netloc:
            raise UserError(f"{redact_url(url)}: no {'bucket' if self.scheme in BUCKET_SCHEMES else 'host'} in the URL; "
                            f"write it as {self.scheme}://{'BUCKET' if self.scheme in BUCKET_SCHEMES else 'HOST'}/PATH")
        self.key = parts.path.lstrip("/")
        # a query names an HTTP resource (a signed URL); S3 and GCS keys have none
        self.query = parts.query if self.scheme in ("http", "https") else ""
        self._url = f"{self.scheme}://{self.netloc}/{self.key}" + (f"?{self.query}" if self.query else "")

    # -- names ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The full URL, secrets included: for the storage client, never for a message."""
        return self._url

    @property
    def is_bucket(self) -> bool:
        """An S3 or GCS location (object storage), not an HTTP server."""
        return self.scheme in BUCKET_SCHEMES

    @property
    def bucket(self) -> str:
        """The bucket (S3, GCS) or host (HTTP)."""
        return self.netloc.rsplit("@", 1)[-1]

    def __str__(self) -> str:
        return redact_url(self._url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteURL) and other._url == self._url

    def __hash__(self) -> int:
        return hash(self._url)

    def __reduce__(self) -> tuple:
        return type(self), (self._url,)

    @property
    def _pure(self) -> PurePosixPath:
        return PurePosixPath("/" + self.key)

    @property
    def name(self) -> str:
        return self._pure.name

    @property
    def stem(self) -> str:
        return self._pure.stem

    @property
    def suffix(self) -> str:
        return self._pure.suffix

    @property
    def suffixes(self) -> list[str]:
        return self._pure.suffixes

    @property
    def parts(self) -> tuple[str, ...]:
        """The bucket (or host) and each part of the key."""
        return (self.bucket, *[p for p in self.key.split("/") if p])

    def _with_key(self, key: str) -> RemoteURL:
        # a child or a sibling has no query of its own (a signature is for one object)
        return type(self)(f"{self.scheme}://{self.netloc}/{key}")

    @property
    def parent(self) -> RemoteURL:
        key = self.key.rstrip("/")
        return self._with_key(key.rsplit("/", 1)[0] + "/" if "/" in key else "")

    def __truediv__(self, other: str | os.PathLike) -> RemoteURL:
        other = os.fspath(other).replace("\\", "/")
        if is_url(other):
            return type(self)(other)
        parts = [] if other.startswith("/") else [p for p in self.key.split("/") if p]
        for part in other.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise UserError(f"{self}: {other!r} goes above the {'bucket' if self.is_bucket else 'server'}'s root")
                parts.pop()
            else:
                parts.append(part)
        return self._with_key("/".join(parts) + ("/" if other.endswith("/") and parts else ""))

    def joinpath(self, *others: str) -> RemoteURL:
        out = self
        for o in others:
            out = out / o
        return out

    def with_name(self, name: str) -> RemoteURL:
        return self.parent / name

    def with_suffix(self, suffix: str) -> RemoteURL:
        return self.parent / (self.stem + suffix)

    def absolute(self) -> RemoteURL:
        return self

    def resolve(self) -> RemoteURL:
        return self

    def expanduser(self) -> RemoteURL:
        return self

    def is_absolute(self) -> bool:
        return True
