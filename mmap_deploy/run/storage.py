"""Room for the outputs: check free space before a slide runs, and turn a full disk into one line.

A full disk or a folder that cannot be written is not a bug and not a bad
slide: it is the output folder that needs the user's attention, and every
further slide would fail the same way after computing for nothing. So

- each slide checks the free space of its output folder against the size its
  output will have (`expected_output_bytes`) *before* any pixel is read;
- a write that fails anyway (another job filled the disk meanwhile, a quota
  that `statvfs` does not show) is turned into the same one-line error
  (`output_storage_guard`), and the temporary file is gone (see
  `atomic.atomic_file`);
- a batch, local or on Ray, stops at the first `OutputStorageError` and says
  how many slides remain.

Quotas (EDQUOT) are not visible in the free space `statvfs` reports, so on a
quota'd filesystem only the second line of defence applies.

A bucket (`s3://`, `gs://`) has no free space to check: an output for it is
staged in the temporary folder (`$TMPDIR`) and uploaded whole, so that
folder is the one checked, and a full disk is said of it. The bucket itself
is checked to exist (`make_output_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

from ..errors import OutputStorageError
from ..location import RemotePath, as_location, human_bytes

Folder = Union[str, Path, RemotePath]

# Errors of the output folder rather than of the slide.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
# h5py and anndata re-raise OSErrors with the errno only in the text
# ("... errno = 28, error message = 'No space left on device' ...").
_STORAGE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|Permission denied|"
                           r"Read-only file system|errno = (28|122|13|1|30)\b")
# Everything in an .h5ad that is not X, the embedding or the thumbnail
# (obs names, clusters, coordinates, provenance, HDF5 structure), per spot and fixed.
_PER_SPOT_EXTRA = 96
_FIXED_EXTRA = 1 << 20
SPACE_MARGIN = 1.15  # the estimate is within a few % of real files; leave room for the filesystem's own overhead
PLOT_BYTES = 3 << 20  # a --plot PNG is at most 1000 px a side


def expected_output_bytes(n_spots: int, n_genes: int, embed_dim: int, thumbnail_shape: tuple[int, int],
                          n_plots: int = 0, zarr: bool = False) -> int:
    """At most how many bytes one slide's output takes, with a margin.

    X (spots × genes float32) + the embedding (spots × D float32) + the hires
    thumbnail (uint8 RGB, counted uncompressed: what gzip saves depends on how
    much of it is bare glass; benchmarks/RESULTS.md) + a little per spot and per
    file, and the --plot PNGs. A SpatialData `.zarr` holds the thumbnail twice
    (the image element, and the table's `uns['spatial']`).
    """
    h, w = thumbnail_shape
    thumb = 3 * h * w * (2 if zarr else 1)
    raw = 4 * n_spots * (n_genes + embed_dim) + thumb + _PER_SPOT_EXTRA * n_spots + _FIXED_EXTRA
    return int(raw * SPACE_MARGIN) + n_plots * PLOT_BYTES


# A QuPath detection (polygon, ids, class, QC and tissue measurements) and one more measurement per gene:
# 13.5 MB per 10 000 spots with the default 20 genes, 160 MB with 785 (docs/predict.md).
GEOJSON_SPOT_BYTES = 1100
GEOJSON_GENE_BYTES = 20


def geojson_output_bytes(n_spots: int, n_genes: int) -> int:
    """At most how many bytes a .geojson of `n_spots` detections with `n_genes` gene measurements takes."""
    return int((n_spots * (GEOJSON_SPOT_BYTES + GEOJSON_GENE_BYTES * n_genes) + _FIXED_EXTRA) * SPACE_MARGIN)


def slide_output_bytes(n_spots: int, manifest, width: int, height: int, n_plots: int = 0, zarr: bool = False) -> int:
    """`expected_output_bytes` for a slide of `width` x `height` level-0 pixels and a bundle's manifest."""
    from ..outputs.adata import THUMBNAIL_MAX_SIDE

    scale = min(1.0, THUMBNAIL_MAX_SIDE / max(width, height))
    thumb = (max(1, round(height * scale)), max(1, round(width * scale)))
    return expected_output_bytes(n_spots, len(manifest.genes), manifest.embed_dim, thumb, n_plots, zarr)


def local_folder(folder: Folder) -> Path:
    """Where an output for `folder` is written on this machine: the folder, or for a bucket the staging folder."""
    loc = as_location(folder)
    return Path(tempfile.gettempdir()) if isinstance(loc, RemotePath) else loc


def _said(folder: Folder) -> str:
    loc = as_location(folder)
    return f"{tempfile.gettempdir()} (staging for {loc})" if isinstance(loc, RemotePath) else str(loc)


def free_bytes(folder: Folder) -> int:
    """Bytes an unprivileged writer may still use in `folder` (its nearest existing ancestor; see `local_folder`)."""
    folder = local_folder(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _no_room(folder: Folder, need: int, free: int, what: str) -> OutputStorageError:
    fix = ("free some space there or set TMPDIR to a larger disk" if isinstance(as_location(folder), RemotePath)
           else "free some space or choose another output folder")
    return OutputStorageError(
        f"{_said(folder)}: no room for {what}: it needs about {human_bytes(need)}, {human_bytes(free)} free there; "
        f"{fix}"
    )


def make_output_dir(folder: Folder) -> None:
    """Create a batch's output folder, or say in one line why it cannot be (a bucket: that it does not exist)."""
    loc = as_location(folder)
    if isinstance(loc, RemotePath):
        from ..location import check_bucket

        check_bucket(loc)  # a prefix needs no creating
        return
    try:
        loc.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputStorageError(f"{folder}: cannot create the output folder ({e.strerror or e}); "
                                 "choose another -o") from None


def check_free_space(folder: Folder, need: int, what: str) -> None:
    """Raise OutputStorageError when `folder` (for a bucket: the staging folder) has less than `need` bytes free."""
    free = free_bytes(folder)
    if free < need:
        raise _no_room(folder, need, free, what)


def storage_error(exc: BaseException, folder: Folder, need: int, what: str) -> OutputStorageError | None:
    """The one-line error for an exception that says the folder is full or not writable, else None."""
    if not isinstance(exc, OSError):
        return None
    code = exc.errno
    if code not in _STORAGE_ERRNOS and not _STORAGE_TEXT.search(str(exc)):
        return None
    free = free_bytes(folder)
    text = str(exc)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or re.search(r"Permission denied|Read-only", text):
        reason = exc.strerror or ("read-only file system" if "Read-only" in text else "permission denied")
        return OutputStorageError(
            f"{_said(folder)}: cannot write {what} there ({reason}); it needs about {human_bytes(need)}, "
            f"{human_bytes(free)} free; fix the folder's permissions or choose another output folder"
        )
    return _no_room(folder, need, free, what)


@contextlib.contextmanager
def output_storage_guard(folder: Folder, need: int, what: str) -> Iterator[None]:
    """Turn a full disk, a quota or a permission failure inside the block into OutputStorageError."""
    try:
        yield
    except OutputStorageError:
        raise
    except OSError as e:
        err = storage_error(e, folder, need, what)
        if err is None:
            raise
        raise err from None
