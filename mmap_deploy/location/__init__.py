"""Where inputs and outputs are: local paths, or `s3://`, `gs://`, `https://` / `http://` URLs.

The project's one way to name, open and write something that may be local
or remote. A local path stays a `pathlib.Path` and is read as before; a URL
becomes a `RemotePath` (never a `pathlib.Path`), read by byte range through
fsspec (the `[cloud]` extra), its secrets hidden wherever it is shown.

- naming (`path`, `naming`): `as_location`, `RemotePath`, `is_remote`,
  `display`, `redact_url`, `redact_text`;
- reading (`access`, `ranges`): `open_input` (a binary file: local, or
  remote by range with a block cache), `RangeFile`, `IOStats`, `io_totals`,
  `set_storage_options`, the retry policy and the one-line failures;
- whole transfers (`transfer`): `upload_file`, `upload_folder`,
  `local_copy` (for readers of local files only, such as OpenSlide),
  `check_bucket`;
- conditional objects (`objects`): what claims on a bucket are made of.

Outputs are written through `mmap_deploy.atomic` (`atomic_path`,
`atomic_folder`, `output_exists`), which stage them locally and upload
them whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from .access import RETRY, IOStats, RetryPolicy, io_totals, reset_clients, set_storage_options
from .naming import CLOUD_EXTRA, is_url, redact_text, redact_url
from .path import Location, RemotePath, as_location, display, is_remote
from .ranges import RangeFile
from .transfer import FETCH_LIMIT_BYTES, check_bucket, human_bytes, local_copy, upload_file, upload_folder

__all__ = [
    "CLOUD_EXTRA", "FETCH_LIMIT_BYTES", "RETRY", "IOStats", "Location", "RangeFile", "RemotePath", "RetryPolicy",
    "as_location", "check_bucket", "display", "human_bytes", "io_totals", "is_remote", "is_url", "local_copy",
    "open_input", "read_input", "redact_text", "redact_url", "reset_clients", "set_storage_options", "upload_file",
    "upload_folder",
]


def open_input(value: str | os.PathLike | RemotePath) -> BinaryIO:
    """A binary file to read `value` from: `open(path, 'rb')` for a local path, a `RangeFile` for a URL.

    What a reader that takes a file object (tifffile, PIL, pyarrow, json)
    is given. A missing local file raises FileNotFoundError as `open` does;
    a remote failure is one UserError line.
    """
    loc = as_location(value)
    if isinstance(loc, Path):
        return open(loc, "rb")
    return loc.open("rb")


def read_input(value: str | os.PathLike | RemotePath) -> bytes:
    """The whole of a small input (a tissue mask, a GeoJSON file, a table), local or remote.

    One GET for a URL (retried; failures in one line). A missing local file
    raises FileNotFoundError and an unreadable one OSError, as `Path.read_bytes`
    does, for the caller to say in its own words.
    """
    return as_location(value).read_bytes()
