"""A location that may be local or remote, and `RemotePath`, the part of `pathlib.Path` a URL needs.

`as_location(x)` is the one way to turn what a user gave (a string, a
`pathlib.Path`, a location) into something to open: a `pathlib.Path` for a
local file, unchanged, or a `RemotePath` for an `s3://`, `gs://`,
`https://` or `http://` URL. A URL never passes through `pathlib.Path`
(which would make `https://host/a` the local path `https:/host/a`).

`RemotePath` offers the part of `pathlib.Path` that the runtime uses
(`name`, `stem`, `suffix`, `parent`, `/`, `with_name`, `exists`,
`is_file`, `is_dir`, `iterdir`, `glob`, `read_bytes`, `read_text`, `open`,
`stat`), so code written for local paths reads remote ones too. Its
`str()` is the display form (`naming.redact_url`); `RemotePath.url` is the
full URL, for the storage client only.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path, PurePosixPath
from typing import Iterator, Union
from urllib.parse import urlsplit

from ..errors import UserError
from .access import RemoteStat, exists, is_dir, is_file, list_folder, read_bytes, stat
from .naming import BUCKET_SCHEMES, SCHEMES, URL_SCHEME, is_url, redact_url
from .ranges import RangeFile, open_range

# pathlib collapses '//': Path("s3://b/k") is 's3:/b/k'. A path given as such a Path (an old caller, a
# command-line type that made a Path) is turned back into its URL.
_MANGLED = re.compile(r"^(s3|gs|gcs|https?):/(?!/)", re.I)


class RemotePath:
    """An object in a bucket or a file on a web server, named by its URL; see the module docstring.

    `str()` is the display form (secrets hidden); `url` the full URL, for
    the storage client only. Pickles as its URL, so it travels to Ray
    workers; credentials are never part of it (each machine has its own:
    environment, profile, instance role or ADC).
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
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other._url == self._url

    def __hash__(self) -> int:
        return hash(self._url)

    def __reduce__(self) -> tuple:
        return RemotePath, (self._url,)

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

    def _with_key(self, key: str) -> RemotePath:
        # a child or a sibling has no query of its own (a signature is for one object)
        return RemotePath(f"{self.scheme}://{self.netloc}/{key}")

    @property
    def parent(self) -> RemotePath:
        key = self.key.rstrip("/")
        return self._with_key(key.rsplit("/", 1)[0] + "/" if "/" in key else "")

    def __truediv__(self, other: str | os.PathLike) -> RemotePath:
        other = os.fspath(other).replace("\\", "/")
        if is_url(other):
            return RemotePath(other)
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

    def joinpath(self, *others: str) -> RemotePath:
        out = self
        for o in others:
            out = out / o
        return out

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> RemotePath:
        return self.parent / (self.stem + suffix)

    def absolute(self) -> RemotePath:
        return self

    def resolve(self) -> RemotePath:
        return self

    def expanduser(self) -> RemotePath:
        return self

    def is_absolute(self) -> bool:
        return True

    # -- what is there (see access.py) ---------------------------------------------------------
    def exists(self) -> bool:
        return exists(self)

    def is_file(self) -> bool:
        return is_file(self)

    def is_dir(self) -> bool:
        return is_dir(self)

    def stat(self) -> RemoteStat:
        return stat(self)

    def iterdir(self) -> Iterator[RemotePath]:
        yield from list_folder(self)

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Children whose name matches `pattern` (one level; a folder over HTTP has no listing: nothing)."""
        if "/" in pattern:
            raise ValueError("RemotePath.glob matches names of one folder level only")
        if not self.is_bucket:
            return iter(())
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def read_bytes(self) -> bytes:
        return read_bytes(self)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def open(self, mode: str = "rb") -> RangeFile:
        """A binary file that reads by byte range through a block cache (`RangeFile`); read only."""
        if mode != "rb":
            raise ValueError(f"RemotePath.open: only 'rb' (writes go through mmap_deploy.atomic), got {mode!r}")
        return open_range(self)


Location = Union[Path, RemotePath]


def as_location(value: str | os.PathLike | RemotePath) -> Location:
    """A `pathlib.Path` for a local path, a `RemotePath` for a URL (see the module docstring).

    `file://` URLs are local paths. A URL of another scheme (`az://`,
    `ftp://`, ...) is a UserError naming those this tool reads.
    """
    if isinstance(value, RemotePath):
        return value
    if isinstance(value, Path):
        text = str(value)
        if _MANGLED.match(text):
            return RemotePath(_MANGLED.sub(lambda m: m.group(0) + "/", text, count=1))
        return value
    text = os.fspath(value)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    m = URL_SCHEME.match(text)
    if m:
        scheme = m.group(1).lower()
        if scheme == "file":
            return Path(urlsplit(text).path)
        if scheme not in SCHEMES:
            raise UserError(f"{redact_url(text)}: {scheme}:// is not read by this tool; use s3://, gs://, "
                            "https://, http:// or a local path")
        return RemotePath(text)
    return Path(text)


def is_remote(value: object) -> bool:
    """Whether `value` names a remote location (a `RemotePath`, or a URL string or mangled Path)."""
    if isinstance(value, RemotePath):
        return True
    if isinstance(value, Path):
        return bool(_MANGLED.match(str(value)))
    return is_url(value)


def display(value: object) -> str:
    """How a message names a path or URL: a URL in its display form, a local path as it is."""
    if isinstance(value, RemotePath):
        return str(value)
    if isinstance(value, str) and URL_SCHEME.match(value):
        return redact_url(value)
    return str(value)
