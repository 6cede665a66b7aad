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
from pathlib import Path
from typing import Iterator, Union
from urllib.parse import urlsplit

from ..errors import UserError
from .access import RemoteStat, exists, is_dir, is_file, list_folder, read_bytes, stat
from .naming import SCHEMES, URL_SCHEME, is_url, redact_url
from .ranges import RangeFile, open_range
from .url import RemoteURL

# pathlib collapses '//': Path("s3://b/k") is 's3:/b/k'. A path given as such a Path (an old caller, a
# command-line type that made a Path) is turned back into its URL.
_MANGLED = re.compile(r"^(s3|gs|gcs|https?):/(?!/)", re.I)


class RemotePath(RemoteURL):
    """An object in a bucket or a file on a web server, named by its URL (`url.RemoteURL`), and what reads
    it: the part of `pathlib.Path` the runtime uses; see the module docstring."""

    __slots__ = ()

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
