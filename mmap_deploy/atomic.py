"""Writing a file so that a reader sees the old file or the new one, never half of one.

Every file the project writes for others to read (outputs, bundle files and
manifests, checkpoints, feature caches, benchmark results) goes through
`atomic_path`: the writer fills a temporary file in the destination's own
folder (a rename is atomic only within one file system), the data is flushed
to disk, and the temporary file is renamed over the destination.

A destination in a bucket (`s3://`, `gs://`: see `mmap_deploy.location`)
is staged in the temporary folder (`$TMPDIR`) and uploaded whole when the
writer is done: a failed or killed run leaves no object, and never a
partial one. A folder (a `.zarr` store) is uploaded with its root metadata
last, so `output_exists` sees it only once it is whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Callable, Iterator, Union

from .errors import UserError
from .location import RemotePath, as_location

# Files are meant to be shared (outputs, bundles); mkstemp makes them private.
FILE_MODE = 0o644


def temp_pattern(path: Path) -> str:
    """The glob of `path`'s temporary files: `.{name}.*.tmp` in its folder."""
    return f".{glob_escape(path.name)}.*.tmp"


@contextmanager
def atomic_path(path: Union[str, Path, RemotePath], *, mode: int = FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error it replaces `path`.

        with atomic_path(out) as tmp:
            adata.write_h5ad(tmp)

    The temporary file exists (empty) when the block starts. On success it is
    fsync'ed, given `mode`, and renamed over `path` (`os.replace`), and the
    folder is fsync'ed so the rename survives a crash. On an exception the
    temporary file is removed and `path` is left as it was. A run killed
    while writing leaves its temporary file (`.{name}.XXXXXXXX.tmp`) behind:
    the next write of the same `path` removes it. The folder must exist.

    For a bucket, the temporary file (named like the output, in a new
    folder under `$TMPDIR`) is uploaded whole instead of renamed, then
    removed (see the module docstring).
    """
    loc = as_location(path)
    if isinstance(loc, RemotePath):
        with _staged(loc) as tmp:
            yield tmp
        return
    path = loc
    for stale in path.parent.glob(temp_pattern(path)):
        stale.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)  # Windows needs write access to flush a file
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); folders cannot be opened for this on Windows."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (e.g. certain network mounts) refuse it: the rename is done anyway
        pass
    finally:
        os.close(fd)


@contextmanager
def _staged(dest: RemotePath) -> Iterator[Path]:
    """A local file to write `dest` into; uploaded whole when the block ends without error."""
    from .location import upload_file

    folder = Path(tempfile.mkdtemp(prefix="mmap-upload-"))
    try:
        tmp = folder / (dest.name or "output")
        tmp.touch()
        yield tmp
        upload_file(tmp, dest)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def atomic_file(path: Union[Path, RemotePath], write: Callable[[Path], None]) -> None:
    """Create `path`'s folder (a UserError when that fails), then write the file through `atomic_path`
    (a bucket's object: staged and uploaded whole). `write(tmp)` fills the temporary file."""
    if not isinstance(path, RemotePath):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{path}: cannot create its folder ({e.strerror or e}); choose another -o") from None
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_folder(path: Union[Path, RemotePath], write: Callable[[Path], None]) -> None:
    """Write a folder through a temporary folder beside `path`, then rename it into place.

    `write(p)` creates the folder `p`. A killed run leaves only its temporary
    folder (`.{name}.*.tmp`), which the next write of the same output removes.
    An existing output (the caller checked `--overwrite`) is first moved into
    the temporary folder and deleted after the new one is in place; a kill
    between those two renames leaves no output, never a mixed one.

    For a bucket, the folder is written under `$TMPDIR` and uploaded with
    its store markers last (`location.upload_folder`); an existing output
    loses its markers first, so a kill leaves no output, never a mixed one.
    """
    loc = as_location(path)
    if isinstance(loc, RemotePath):
        from .location import upload_folder

        folder = Path(tempfile.mkdtemp(prefix="mmap-upload-"))
        try:
            new = folder / (loc.name or "output")
            write(new)
            upload_folder(new, loc)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    path = loc
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create its folder ({e.strerror or e}); choose another -o") from None
    for stale in path.parent.glob(temp_pattern(path)):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        new = tmp / path.name
        write(new)
        if path.exists():
            os.replace(path, tmp / "replaced")
        os.replace(new, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def output_exists(path: Union[str, Path, RemotePath]) -> bool:
    """Whether a whole output is at `path`: what a rerun skips.

    Locally, anything there (outputs appear only by rename). In a bucket, a
    `.zarr` store counts only with its root metadata (see `atomic_folder`):
    objects left by an upload that was killed are not an output.
    """
    loc = as_location(path)
    if isinstance(loc, RemotePath):
        if loc.suffix == ".zarr":
            from .location.transfer import folder_complete

            return folder_complete(loc)
        return loc.is_file()
    return loc.exists()
