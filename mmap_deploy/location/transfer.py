"""Whole transfers: outputs uploaded to a bucket in one piece, and remote files copied to local disk.

**Uploads never leave a partial object.** An output is written to local
disk first (`atomic.atomic_path` stages it in the temporary folder,
`$TMPDIR`), then uploaded whole: S3 makes an object visible only when its
PutObject, or the CompleteMultipartUpload of a larger file
(`UPLOAD_CHUNK_BYTES` a part), succeeds, and s3fs aborts a multipart upload
that fails; GCS creates an object only when its (simple or resumable)
upload is finalised. A failed upload therefore leaves no object, and the
one that was there before stays as it was. A run killed during a
multipart upload leaves an incomplete upload that no reader sees (a bucket
lifecycle rule `AbortIncompleteMultipartUpload` removes its parts).

**A folder (`.zarr`) is complete when its markers are there.** A bucket
has no atomic rename of a prefix, so `upload_folder` uploads every file
but the store's root metadata (`zarr.json`, `.zgroup`, `.zattrs`,
`.zmetadata`), then those: a reader (and a rerun's resume check,
`atomic.output_exists`) sees either no store or a whole one. An old store
being replaced loses its markers first; a failed upload removes what it
uploaded.

**Copies for OpenSlide.** OpenSlide reads only local files. A slide in a
format that only it reads (NDPI, SCN, BIF, ...) is copied whole to local
disk when it is at most `FETCH_LIMIT_BYTES` and the temporary folder has
room, and the copy is removed when the slide is closed (`local_copy`).
Formats made of several files (MIRAX `.mrxs` with its folder, Hamamatsu
`.vms`/`.vmu`, DICOM folders) are refused with the fix: the files would
have to be found and fetched one by one, many GB, by a reader that was
never meant to see them remote.
"""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import OutputStorageError, UserError
from .access import NOT_FOUND, IOStats, bucket_exists, call, call_or, fs_path, stat
from .path import RemotePath

UPLOAD_CHUNK_BYTES = 50 << 20  # S3 multipart part size (s3fs's default; at least 5 MiB)
UPLOAD_THREADS = 8  # files of a folder uploaded at once
FETCH_LIMIT_BYTES = 20 * 10**9  # NDPI and SCN scans are 1-10 GB; a bigger file is better copied by hand
MULTI_FILE_FORMATS = {".mrxs": "MIRAX (.mrxs and its folder of .dat files)", ".vms": "Hamamatsu VMS",
                      ".vmu": "Hamamatsu VMU", ".dcm": "DICOM (a folder of .dcm files)"}
# A store's root metadata, uploaded last: without them, no zarr reader takes the folder for a store
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zattrs", ".zmetadata")


def require_writable(loc: RemotePath) -> None:
    """Outputs go to buckets (S3, GCS): an HTTP URL is a UserError with the fix."""
    if not loc.is_bucket:
        raise UserError(f"{loc}: cannot write to an {loc.scheme.upper()} URL; write to s3://, gs:// or a local path")


def check_bucket(loc: RemotePath) -> None:
    """Say at once (OutputStorageError) when `loc`'s bucket does not exist; nothing is created.

    A bucket that these credentials may write to but not look at (403 on
    the bucket itself) passes: the upload will say what is wrong.
    """
    require_writable(loc)
    if bucket_exists(loc) is False:
        raise OutputStorageError(f"{loc}: the bucket {loc.bucket!r} does not exist (or not at this endpoint); "
                                 "check the bucket's name or create the bucket")


def upload_file(local: Path, dest: RemotePath, *, stats: IOStats | None = None) -> None:
    """Upload the local file whole to `dest` (replacing what is there); on failure no object is left.

    Retried as a whole on a transient failure (see access.call); the
    failure after the last try is one line.
    """
    require_writable(dest)
    size = Path(local).stat().st_size

    def put(fs) -> None:
        if dest.scheme == "s3":
            fs.put_file(str(local), fs_path(dest), chunksize=UPLOAD_CHUNK_BYTES)
        else:
            fs.put_file(str(local), fs_path(dest))

    call(dest, "uploading it", put, stats=stats, write=True, count_bytes=lambda _: size)


def remove(loc: RemotePath) -> None:
    """Delete the object; nothing there is not a failure."""
    call_or(loc, "deleting it", lambda fs: fs.rm_file(fs_path(loc)), {NOT_FOUND: None}, write=True)


def remove_folder(loc: RemotePath, markers: tuple[str, ...] = ZARR_MARKERS) -> None:
    """Delete a folder's objects, its markers first (so that it stops being an output before its parts go)."""
    for name in markers:
        remove(loc / name)
    if loc.exists():
        call(loc, "deleting it", lambda fs: fs.rm(fs_path(loc).rstrip("/"), recursive=True), write=True)


def upload_folder(local: Path, dest: RemotePath, *, markers: tuple[str, ...] = ZARR_MARKERS) -> None:
    """Upload the local folder to `dest`, its top-level `markers` last; an old `dest` is removed first.

    On a failure what was uploaded is removed (best effort: a killed run
    leaves objects without markers, which no reader takes for a store and
    the next write removes).
    """
    require_writable(dest)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    names = [p.relative_to(local).as_posix() for p in files]
    last = [n for n in names if n in markers]
    first = [n for n in names if n not in markers]
    remove_folder(dest, markers)
    try:
        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="mmap-upload") as pool:
            list(pool.map(lambda n: upload_file(Path(local) / n, dest / n), first))
        for n in last:
            upload_file(Path(local) / n, dest / n)
    except BaseException:
        try:
            remove_folder(dest, markers)
        except UserError:
            pass  # the upload's own error says what went wrong
        raise


def folder_complete(loc: RemotePath, markers: tuple[str, ...] = ZARR_MARKERS) -> bool:
    """Whether a folder uploaded by `upload_folder` is there whole (one of its markers is)."""
    return any((loc / name).is_file() for name in markers)


def human_bytes(n: float) -> str:
    """A size for a message: `512 bytes`, `3.4 MB`, `1.2 GB` (powers of 1000)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


@contextmanager
def local_copy(loc: RemotePath, *, max_bytes: int = FETCH_LIMIT_BYTES, reader: str = "OpenSlide",
               stats: IOStats | None = None) -> Iterator[Path]:
    """Copy `loc` whole into a temporary folder for a reader of local files only; removed after the block.

    Refused with the fix (one line): a format made of several files
    (`MULTI_FILE_FORMATS`), a file over `max_bytes`, a temporary folder
    without room for it. The copy keeps `loc`'s file name (readers go by
    its extension).
    """
    fix = f"copy it to local disk (e.g. {'aws s3 cp' if loc.scheme == 's3' else 'gcloud storage cp' if loc.is_bucket else 'curl -O'}) and pass the local path"
    what = MULTI_FILE_FORMATS.get(loc.suffix.lower())
    if what is not None:
        raise UserError(f"{loc}: {what} slides are several files, which {reader} reads only from local disk; "
                        f"copy the slide's files (all of them) to a local folder and pass the local path")
    size = stat(loc).st_size
    if size > max_bytes:
        raise UserError(f"{loc}: {human_bytes(size)}, more than the {human_bytes(max_bytes)} this tool copies "
                        f"to local disk for {reader}, which cannot read remote files; {fix}")
    folder = Path(tempfile.mkdtemp(prefix="mmap-remote-"))
    try:
        free = shutil.disk_usage(folder).free
        if free < size:
            raise UserError(f"{loc}: {reader} reads only local files, and the temporary folder {folder.parent} has "
                            f"{human_bytes(free)} free for its {human_bytes(size)}; set TMPDIR to a larger disk, "
                            f"or {fix}")
        path = folder / (loc.name or "slide")
        call(loc, "copying it to local disk", lambda fs: fs.get_file(fs_path(loc), str(path)), stats=stats,
             count_bytes=lambda _: size)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)
