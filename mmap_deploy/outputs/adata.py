"""The output: an AnnData `.h5ad` that scanpy and squidpy plot as it is, and gene maps.

Layout (see docs/architecture.md, "The output"):
- `X` float32 predictions on the training log scale; `var_names` genes;
  `obs_names` spot ids; `obs['mmap_cluster']` the k-means prototype (categorical);
  `obs['mmap_familiarity']` how close each spot is to the training data (with
  a bundle that has a training summary; its slide record in `uns['mmap']['qc']`);
- `obsm['spatial']` (x, y) in full-resolution pixels; `obsm['mmap_embedding']` f;
- `uns['spatial'][library_id]`: `images['hires']` (thumbnail, longest side
  2000 px) and `scalefactors` (`tissue_hires_scalef`, `spot_diameter_fullres`);
- `obs['qc_blur']`, `qc_ink`, `qc_background`, `qc_pass`: each spot's image QC
  (`inputs.spot_qc`), its thresholds in `uns['mmap']['qc']['image']`;
- `uns['mmap']`: provenance. No None anywhere (anndata cannot write it).

`-o out.zarr` writes the same AnnData as SpatialData (`spatialdata_out`),
`-o out.geojson` its spots as QuPath detections (`geojson`). Files are written to a temporary file in the destination directory and
renamed into place, so a killed run never leaves a half-written output.
An output in a bucket (`-o s3://bucket/out.h5ad`, `gs://...`) is written
to a local temporary file and uploaded whole (`mmap_deploy.atomic`), the
same guarantee.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import atomic_file as _atomic_write
from ..errors import UserError
from ..options import spell
from ..location import Location, RemotePath, as_location
from .gene_names import resolve_names

if TYPE_CHECKING:  # pragma: no cover
    import anndata

    from .prediction import SlidePrediction

THUMBNAIL_MAX_SIDE = 2000
IMAGE_COMPRESSION = {"compression": "gzip", "compression_opts": 1}
IMAGE_CHUNK_ROWS = 128
# Plotting size of a spot: half the typical centre-to-centre distance of the
# spots (ST: 200 µm pitch -> 100 µm, the real ST spot; Visium: 100 µm -> 50,
# close to its 55 µm spots), never larger than the patch the model saw.
SPOT_DIAMETER_PITCH_RATIO = 0.5
_PITCH_SAMPLE = 256
PLOT_MAX_SIDE = 1000
COLOUR_BAR_UNIT = "log10(1 + 10⁴ · count / library size)"  # the training target's scale
# -o's suffix decides what is written
OUTPUT_FORMATS = {".h5ad": "AnnData", ".zarr": "SpatialData", ".geojson": "GeoJSON for QuPath"}
# Per-spot columns that --plot maps beside genes, with their colour bar's label.
PLOT_COLUMNS = {
    "qc_blur": "qc_blur: log10(var grey / var Laplacian), higher is blurrier",
    "qc_ink": "qc_ink: share of the patch under pen ink",
    "qc_background": "qc_background: share of the patch that is blank",
    "qc_pass": "qc_pass: 1 passes image QC, 0 fails",
    "tissue_fraction": "tissue_fraction: share of the spot on tissue",
    "mmap_familiarity": "mmap_familiarity: closeness to the training data",
}


def check_output_path(path: str | Path | RemotePath, overwrite: bool) -> Location:
    """Refuse an existing output unless `overwrite`; make sure the folder (or the bucket) can take the file."""
    path = as_location(path)
    if path.suffix not in OUTPUT_FORMATS:
        raise UserError(f"{path}: the output must end in .h5ad (AnnData) or .zarr (SpatialData), or .geojson "
                        f"(QuPath detections), e.g. -o {path.with_suffix('.h5ad').name}")
    if path.suffix == ".zarr":
        from .sdata import check_store_path

        check_store_path(path, overwrite)
    if isinstance(path, RemotePath):
        return _check_remote_output(path, overwrite)
    if path.is_dir() and path.suffix != ".zarr":
        raise UserError(f"{path}: is a directory; give a file name ending in {path.suffix}")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass {spell('overwrite')} to replace it, or choose another output")
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"{path.parent}: is not a directory; choose another -o")
    # Find out now, not after the whole slide has run, whether the file can be
    # written: probe the nearest existing folder with a temporary file.
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a directory")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:  # a batch stops here: every further slide would fail the same way
        from ..errors import OutputStorageError

        raise OutputStorageError(f"{path}: cannot write there ({e.strerror or e}); choose another -o") from None
    return path


def _check_remote_output(path: RemotePath, overwrite: bool) -> RemotePath:
    """`check_output_path` for a bucket: writable there, the bucket exists, no whole output there already."""
    from ..atomic import output_exists
    from ..location import check_bucket

    check_bucket(path)  # an HTTP URL, or a bucket that does not exist: said now, not after the slide has run
    if output_exists(path) and not overwrite:
        raise UserError(f"{path}: already exists; pass {spell('overwrite')} to replace it, or choose another output")
    return path


def spot_diameter_fullres(xy: np.ndarray, patch_side_fullres: float) -> float:
    """A spot's plotting diameter in full-resolution pixels.

    Half the median nearest-neighbour distance between spot centres (measured
    on an evenly spaced sample of at most 256 spots against all spots),
    capped at the patch side; the patch side when there is a single spot.
    """
    xy = np.asarray(xy, dtype=np.float64)
    n = len(xy)
    if n < 2:
        return float(patch_side_fullres)
    sample = xy[np.linspace(0, n - 1, min(n, _PITCH_SAMPLE)).round().astype(np.int64)]
    nearest = np.full(len(sample), np.inf)
    for s in range(0, n, 2048):  # chunks of (256, 2048) distances: 4 MiB at a time
        block = xy[s : s + 2048]
        d = np.square(sample[:, :1] - block[None, :, 0])
        d += np.square(sample[:, 1:] - block[None, :, 1])
        d[d == 0] = np.inf  # the spot itself (and exact duplicates)
        nearest = np.minimum(nearest, d.min(axis=1))
    finite = nearest[np.isfinite(nearest)]
    if len(finite) == 0:
        return float(patch_side_fullres)
    pitch = float(np.sqrt(np.median(finite)))
    return float(min(SPOT_DIAMETER_PITCH_RATIO * pitch, patch_side_fullres))


def check_no_none(obj: Any, where: str = "uns") -> None:
    """Raise ValueError naming the key of any None (anndata cannot write None)."""
    if obj is None:
        raise ValueError(f"{where} is None; anndata cannot write None values")
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_no_none(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_no_none(v, f"{where}[{i}]")


def _str_array(values: list[str]) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object) if values else np.zeros(0, dtype="U1")


def build_anndata(
    pred: "SlidePrediction",
    thumbnail: np.ndarray,
    thumbnail_scale: float,
    *,
    library_id: str,
    slide_mpp: float,
    patch_um: float,
    provenance: dict[str, Any],
    spatial_images: dict[str, np.ndarray] | None = None,
    spatial_scalefactors: dict[str, float] | None = None,
) -> "anndata.AnnData":
    """Assemble the AnnData for one slide's predictions (see the module docstring).

    `spatial_images` / `spatial_scalefactors` (Space Ranger's hires/lowres
    images and scale factors) are added to uns['spatial'], and replace the
    thumbnail when they hold a hires image.
    """
    import anndata as ad
    import pandas as pd

    n = len(pred.spot_ids)
    obs = pd.DataFrame(index=pd.Index(pred.spot_ids, dtype=object, name=None))
    k = pred.n_prototypes
    obs["mmap_cluster"] = pd.Categorical(
        pred.clusters.astype(str), categories=[str(i) for i in range(k)]
    )
    if pred.familiarity is not None:
        obs["mmap_familiarity"] = np.asarray(pred.familiarity.values, dtype=np.float32)
    if pred.qc is not None:  # the spots' image QC (inputs.spot_qc)
        from ..inputs.spot_qc import qc_columns

        for name, column in qc_columns(pred.qc).items():
            obs[name] = column
    var = pd.DataFrame(index=pd.Index(pred.genes, dtype=object))
    adata = ad.AnnData(X=np.ascontiguousarray(pred.prediction, dtype=np.float32), obs=obs, var=var)
    adata.obsm["spatial"] = np.ascontiguousarray(pred.xy, dtype=np.float64).reshape(n, 2)
    adata.obsm["mmap_embedding"] = np.ascontiguousarray(pred.embedding, dtype=np.float32)
    patch_side = patch_um / slide_mpp
    diameter = spot_diameter_fullres(pred.xy, patch_side)
    thumb = np.ascontiguousarray(thumbnail, dtype=np.uint8)
    adata.uns["spatial"] = {
        library_id: {
            "images": {"hires": thumb},
            "scalefactors": {
                "tissue_hires_scalef": float(thumbnail_scale),
                "spot_diameter_fullres": float(diameter),
            },
            "metadata": {"source": "mmap-predict"},
        }
    }
    if spatial_images or spatial_scalefactors:
        lib = adata.uns["spatial"][library_id]
        if spatial_images and "hires" in spatial_images:
            lib["images"] = {}
            lib["scalefactors"] = {}
        lib["images"].update({k: np.ascontiguousarray(v, dtype=np.uint8) for k, v in (spatial_images or {}).items()})
        lib["scalefactors"].update({k: float(v) for k, v in (spatial_scalefactors or {}).items()})
        lib["scalefactors"].setdefault("spot_diameter_fullres", float(diameter))
        lib["metadata"]["source"] = "mmap-predict; " + ("images and " if spatial_images else "") + \
            "scale factors from Space Ranger"
    mmap = dict(provenance)
    mmap.update(
        n_spots=int(n),
        n_dropped=len(pred.dropped),
        dropped_spots=_str_array([d.spot_id for d in pred.dropped]),
        dropped_errors=_str_array([d.error for d in pred.dropped]),
        n_prototypes=int(pred.n_prototypes),
        prediction_floor=0.0,
        n_clipped_below_floor=int(pred.n_clipped),
        bank_size=int(pred.bank_size),
        spot_diameter_rule=(
            f"{SPOT_DIAMETER_PITCH_RATIO} x median nearest-spot distance, at most the patch side "
            f"({patch_side:.1f} px = {patch_um} um)"
        ),
        timings={k2: float(v) for k2, v in pred.timings.items()},
        engines=dict(pred.engines),
    )
    if pred.familiarity is not None:
        mmap["qc"] = {**dict(mmap.get("qc") or {}), "familiarity": pred.familiarity.record()}
    if pred.qc_record:  # beside the geometry checks: how the image QC was scored and judged
        mmap["qc"] = {**dict(mmap.get("qc") or {}), "image": dict(pred.qc_record)}
    check_no_none(mmap, "uns['mmap']")
    adata.uns["mmap"] = mmap
    return adata


def write_h5ad(adata: "anndata.AnnData", path: str | Path | RemotePath, overwrite: bool = False) -> Location:
    """Write `adata` to `path` atomically; refuse an existing file unless `overwrite`.

    The `uns['spatial']` images are stored gzip-compressed (see `write_images_compressed`).
    """
    path = check_output_path(path, overwrite)
    _atomic_write(path, lambda tmp: _write_h5ad(adata, tmp))
    return path


def _write_h5ad(adata: "anndata.AnnData", path: Path) -> None:
    """`adata.write_h5ad`, with the images of `uns['spatial']` written compressed after the rest."""
    spatial = adata.uns.get("spatial", {})
    images = {lib: d["images"] for lib, d in spatial.items() if isinstance(d, dict) and d.get("images")}
    try:
        for lib in images:
            spatial[lib]["images"] = {}  # written as an empty group, filled below
        adata.write_h5ad(path)
    finally:
        for lib, imgs in images.items():
            spatial[lib]["images"] = imgs
    write_images_compressed(path, images)


def write_images_compressed(path: Path, images: dict[str, dict[str, np.ndarray]]) -> None:
    """Write each library's images into `uns/spatial/{library}/images` of the .h5ad at `path`, gzip-compressed.

    The hires image is most of a small output (12 of the demo's 12.5 MB).
    Lossless gzip, which every HDF5 reader decodes (unlike lzf): a whole
    her2st section's output, thumbnail with its white background, 11.7 ->
    4.5 MB; the demo's tissue-filled crop 12.5 -> 10.6 MB. Level 1: level 4
    saves 9% more on the section for 30% more time (the write is on the
    critical path of every slide). Chunks of 128 whole rows.
    """
    import h5py

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    with h5py.File(path, "a") as f:
        for lib, imgs in images.items():
            group = f["uns"]["spatial"][lib]["images"]
            for key, img in imgs.items():
                img = np.asarray(img)
                chunks = (min(IMAGE_CHUNK_ROWS, img.shape[0]), *img.shape[1:]) if img.ndim >= 2 and img.size else None
                write_elem(group, key, img, dataset_kwargs=dict(IMAGE_COMPRESSION, chunks=chunks))


def write_output(adata: "anndata.AnnData", path: str | Path | RemotePath, overwrite: bool = False, *,
                 genes: list[str] | str | None = None, classify_by: str | None = "tissue_id") -> Location:
    """Write `adata` as `.h5ad`, as SpatialData for a `.zarr` path (`sdata`), or as QuPath detections
    for a `.geojson` path (`geojson.write_geojson`, which alone takes `genes` and `classify_by`); local or
    in a bucket (uploaded whole)."""
    suffix = as_location(path).suffix
    if suffix == ".zarr":
        from .sdata import write_spatialdata

        return write_spatialdata(adata, path, overwrite)
    if suffix == ".geojson":
        from .geojson import write_geojson

        return write_geojson(adata, path, genes=genes, classify_by=classify_by, overwrite=overwrite)
    return write_h5ad(adata, path, overwrite)


def plot_paths(out: Location, genes: list[str]) -> list[Location]:
    """Where `--plot` writes each gene's map: next to the output, `{stem}.{gene}.png`."""
    return [out.with_name(f"{out.stem}.{re.sub(r'[^A-Za-z0-9._-]+', '_', g)}.png") for g in genes]


def check_plot_genes(genes: list[str], bundle_genes: list[str], bundle_root: Path) -> list[str]:
    """Before any work: every --plot name is a gene the bundle predicts or a per-spot column
    (`PLOT_COLUMNS`: image QC, tissue fraction, familiarity), and matplotlib imports.

    Names match case-insensitively (`erbb2` is `ERBB2`); returns them as the
    bundle spells them. A miss names the bundle's nearest genes.
    """
    resolved = resolve_names(genes, bundle_genes, bundle_root, flag="--plot", columns=tuple(PLOT_COLUMNS))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'mmap-deploy[plot]'") from None
    return resolved


def gene_map_title(adata: "anndata.AnnData", gene: str) -> str:
    """A gene map's title: the gene, and that the model is a demo when it is one."""
    demo = " · DEMO model, not biology" if adata.uns.get("mmap", {}).get("bundle_demo") else ""
    return f"{gene} (predicted){demo}"


def write_gene_plots(adata: "anndata.AnnData", genes: list[str], out: Location, library_id: str) -> list[Location]:
    """One PNG per gene: its predicted value per spot over the hires thumbnail (headless).

    A name of `PLOT_COLUMNS` maps that obs column instead (image QC, tissue
    fraction, familiarity); one the output lacks (familiarity, from a bundle
    without a training summary) is skipped with a warning.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    from .overview import draw_outline

    lib = adata.uns["spatial"][library_id]
    img = lib["images"]["hires"]
    sf = lib["scalefactors"]
    scale = float(sf["tissue_hires_scalef"])
    xy = np.asarray(adata.obsm["spatial"]) * scale
    h, w = img.shape[:2]
    # The map is at most PLOT_MAX_SIDE px on its longest side (a 2000 px PNG
    # takes seconds to encode); `px` = figure pixels per thumbnail pixel.
    px = min(1.0, PLOT_MAX_SIDE / max(h, w))
    dpi = 100
    # 1 figure pixel = 72/dpi points, so spots are drawn at their real size
    marker_pt = float(sf["spot_diameter_fullres"]) * scale * px * 72.0 / dpi
    written = []
    for gene, png in zip(genes, plot_paths(out, genes)):
        if gene in adata.var_names:
            values, title, unit = np.asarray(adata[:, gene].X).ravel(), gene_map_title(adata, gene), COLOUR_BAR_UNIT
        elif gene in adata.obs:
            values, title, unit = np.asarray(adata.obs[gene], dtype=np.float32), gene, PLOT_COLUMNS.get(gene, gene)
        else:
            from ..messages import warn

            warn(f"--plot {gene}: this output has no such column; no map written")
            continue
        fig = Figure(figsize=(w * px / dpi / 0.85, h * px / dpi / 0.92), dpi=dpi)
        ax = fig.add_axes((0.0, 0.0, 0.85, 0.92))
        ax.imshow(img, interpolation="antialiased")
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=marker_pt**2, cmap="viridis", linewidths=0)
        draw_outline(ax, adata, scale)  # the tissue outline of a --grid run, if any
        ax.set_axis_off()
        ax.set_title(title)
        cax = fig.add_axes((0.88, 0.1, 0.025, 0.75))
        fig.colorbar(sc, cax=cax).set_label(unit)
        _atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
        written.append(png)
    return written


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
