"""The predictions for QuPath: `-o slide.geojson`, one detection per spot with its values as measurements.

Pathologists review slides in QuPath; this file puts each spot there as a
detection at its true size, in the slide's level-0 pixels, in the GeoJSON that
QuPath (0.4 and later) imports with File > Import objects or by drag and drop:

- a FeatureCollection; each Feature's ``geometry`` is the spot's outline: a
  circle for Visium and ST spots (a regular polygon of `CIRCLE_VERTICES`
  vertices with the circle's area, centred on the spot), a square for square
  bins (``--grid NUMum``, Visium HD). Its size is
  ``uns['spatial'][library]['scalefactors']['spot_diameter_fullres']`` (the
  diameter, or the bin's side); which shape, `spot_shape` says;
- ``properties.objectType`` ``"detection"``; ``properties.name`` the spot id;
  the Feature's ``id`` a UUID made from the library and spot id (QuPath keeps
  only UUIDs as object ids, and the same spot gets the same one every time);
- ``properties.measurements``, name -> number: the chosen genes' predicted
  values (`DEFAULT_N_GENES` most variable of the slide by default, the genes
  asked for, or ``"all"``), then the per-spot columns the output has of
  `MEASURED_COLUMNS` (``qc_pass`` as 1 or 0). A value that is not finite is
  left out of its spot's measurements (JSON has no NaN);
- ``properties.classification`` (``{"name": ..., "color": [r, g, b]}``): the
  spot's value of `classify_by` (default: ``tissue_id``, when the output has
  it): numbers and booleans as ``"{column} {value}"``, text as it is.

Numbers are written as the shortest text that reads back as the same float32,
coordinates to 0.01 px. The file is written through a temporary file and
renamed, like every output.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..atomic import atomic_file
from ..errors import UserError
from ..location import Location, as_location
from ..options import spell
from .gene_names import resolve_names

if TYPE_CHECKING:  # pragma: no cover
    import anndata

DEFAULT_N_GENES = 20
ALL_GENES = "all"
CIRCLE_VERTICES = 32
# Per-spot columns written as measurements beside the genes, when the output has them.
MEASURED_COLUMNS = ("mmap_familiarity", "qc_blur", "qc_ink", "qc_background", "qc_pass", "tissue_fraction")
DEFAULT_CLASSIFY_BY = "tissue_id"
MAX_CLASSES = 1000  # a column with more distinct values is a measurement, not a classification
# matplotlib's tab10, as QuPath takes colours: [r, g, b] in 0-255.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
# Feature ids: uuid5 of "{library}/{spot}" in this namespace.
ID_NAMESPACE = uuid.UUID("6f1c2a4e-9a53-5b0e-8d2f-6d6d61702d71")


def spot_shape(adata: "anndata.AnnData", library_id: str | None = None) -> tuple[str, float]:
    """The spots' outline: ("circle", diameter) or ("square", side), in level-0 pixels.

    A `--grid` run says its shape (``uns['mmap']['grid']['shape']``); a Visium
    HD input (``coords_format`` ``visium-hd``, or Space Ranger's
    ``bin_size_um`` among the scale factors) has square bins; every other input
    has round spots. The size is ``spot_diameter_fullres``.
    """
    lib = _library(adata, library_id)
    scalefactors = adata.uns["spatial"][lib]["scalefactors"]
    size = float(scalefactors["spot_diameter_fullres"])
    mmap = adata.uns.get("mmap", {})
    grid = mmap.get("grid")
    if isinstance(grid, dict) and grid.get("shape") in ("circle", "square"):
        return str(grid["shape"]), size
    if mmap.get("coords_format") == "visium-hd" or "bin_size_um" in scalefactors:
        return "square", size
    return "circle", size


def _library(adata: "anndata.AnnData", library_id: str | None) -> str:
    spatial = adata.uns.get("spatial") or {}
    if library_id is not None:
        return library_id
    if not spatial:
        raise ValueError("the AnnData has no uns['spatial'] (not an mmap-predict output)")
    return next(iter(spatial))


def outline(shape: str, size: float, vertices: int = CIRCLE_VERTICES) -> np.ndarray:
    """(k + 1, 2) x, y offsets of a spot's closed outline around its centre (the first vertex repeated).

    A circle of diameter `size` becomes a regular polygon of `vertices`
    vertices with the circle's area (at 32 vertices, its vertices lie 0.32%
    outside the circle and the middles of its edges 0.16% inside); a square of
    side `size` its four corners. Counter-clockwise in x, y (RFC 7946's
    right-hand rule; clockwise as seen on screen, where y points down).
    """
    if shape == "square":
        h = size / 2.0
        ring = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    else:
        n = int(vertices)
        r = (size / 2.0) * math.sqrt(2.0 * math.pi / (n * math.sin(2.0 * math.pi / n)))
        a = 2.0 * math.pi * np.arange(n) / n
        ring = np.column_stack([r * np.cos(a), r * np.sin(a)])
    return np.vstack([ring, ring[:1]])


def default_genes(adata: "anndata.AnnData", n: int = DEFAULT_N_GENES) -> list[str]:
    """The `n` genes whose predictions vary most over the slide's spots, most variable first (ties: model order)."""
    x = np.asarray(adata.X, dtype=np.float64)
    var = x.var(axis=0) if len(x) else np.zeros(x.shape[1])
    order = np.lexsort((np.arange(len(var)), -var))  # descending variance, then the model's order
    names = list(adata.var_names)
    return [names[i] for i in order[:n]]


def resolve_genes(adata: "anndata.AnnData", genes: list[str] | str | None) -> list[str]:
    """The genes to write: `default_genes` for None, every gene for ``"all"``, else the names given.

    Names match case-insensitively, as `--plot`'s do; a name the model does
    not predict is a UserError naming the nearest genes.
    """
    if genes is None:
        return default_genes(adata)
    if isinstance(genes, str):
        if genes.strip().lower() == ALL_GENES:
            return list(adata.var_names)
        genes = [g.strip() for g in genes.split(",") if g.strip()]
    model = str(adata.uns.get("mmap", {}).get("bundle", "that made this output"))
    return resolve_names(list(genes), list(adata.var_names), model, flag=spell("genes").rstrip("="))


def spot_classes(adata: "anndata.AnnData", column: str | None,
                 ) -> tuple[list[str] | None, dict[str, tuple[int, int, int]]]:
    """Each spot's class name and each class's colour, from obs column `column` (None: no classes).

    Numbers and booleans name their class ``"{column} {value}"``; text is used
    as it is. Classes are coloured from `PALETTE` in the column's order
    (categories as ordered, other values sorted). A missing value has no class.
    """
    if column is None:
        return None, {}
    if column not in adata.obs:
        shown = ", ".join(map(str, adata.obs.columns))
        raise UserError(f"{spell('classify_by', column)}: no such column in this output (it has: {shown})")
    import pandas as pd

    values = adata.obs[column]
    if isinstance(values.dtype, pd.CategoricalDtype):
        levels = [v for v in values.cat.categories if (values == v).any()]
    else:
        levels = sorted(pd.unique(values.dropna()), key=lambda v: (str(type(v)), v))
    if len(levels) > MAX_CLASSES:
        raise UserError(f"{spell('classify_by', column)}: {len(levels)} different values; classify by a column with at most "
                        f"{MAX_CLASSES} (e.g. tissue_id, qc_pass or mmap_cluster); a number per spot is a measurement")
    numeric = not (isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object
                   or pd.api.types.is_string_dtype(values.dtype))

    def name(v) -> str:
        if numeric or isinstance(v, (bool, np.bool_, int, float, np.integer, np.floating)):
            text = str(bool(v)) if isinstance(v, (bool, np.bool_)) else f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)
            return f"{column} {text}"
        return str(v)

    colours = {name(v): PALETTE[i % len(PALETTE)] for i, v in enumerate(levels)}
    out = [None if pd.isna(v) else name(v) for v in values]
    return out, colours


def _numbers(values: np.ndarray) -> np.ndarray:
    """float32 values as their shortest JSON text ('' where not finite)."""
    v = np.asarray(values, dtype=np.float32)
    text = v.astype(str)
    text[~np.isfinite(v)] = ""
    return text


def _measurements(adata: "anndata.AnnData", genes: list[str]) -> tuple[list[str], np.ndarray]:
    """Measurement names and an (N, M) array of their values as text."""
    names = list(genes)
    columns = []
    if genes:
        idx = adata.var_names.get_indexer(genes)
        x = adata.X[:, idx]
        columns.append(_numbers(np.asarray(x.toarray() if hasattr(x, "toarray") else x)))
    for col in MEASURED_COLUMNS:
        if col in adata.obs:
            names.append(col)
            columns.append(_numbers(np.asarray(adata.obs[col], dtype=np.float32))[:, None])
    values = np.concatenate(columns, axis=1) if columns else np.zeros((adata.n_obs, 0), dtype=str)
    return names, values


def _features(adata: "anndata.AnnData", genes: list[str], classes: list[str] | None,
              colours: dict[str, tuple[int, int, int]], ring: np.ndarray, library: str) -> Iterator[str]:
    names, values = _measurements(adata, genes)
    keys = [json.dumps(n, ensure_ascii=False) for n in names]
    class_json = {c: json.dumps({"name": c, "color": list(colours[c])}, ensure_ascii=False) for c in colours}
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    for i, spot in enumerate(map(str, adata.obs_names)):
        pts = np.round(xy[i] + ring, 2)
        coords = ",".join(f"[{x:.2f},{y:.2f}]" for x, y in pts)
        measured = ",".join(f"{k}:{v}" for k, v in zip(keys, values[i]) if v)
        cls = f',"classification":{class_json[classes[i]]}' if classes is not None and classes[i] is not None else ""
        fid = uuid.uuid5(ID_NAMESPACE, f"{library}/{spot}")
        yield (f'{{"type":"Feature","id":"{fid}","geometry":{{"type":"Polygon","coordinates":[[{coords}]]}},'
               f'"properties":{{"objectType":"detection","name":{json.dumps(spot, ensure_ascii=False)}{cls},'
               f'"measurements":{{{measured}}}}}}}')


def write_geojson(adata: "anndata.AnnData", path: str | Location, *, genes: list[str] | str | None = None,
                  classify_by: str | None = DEFAULT_CLASSIFY_BY, overwrite: bool = False,
                  library_id: str | None = None) -> Location:
    """Write the spots as QuPath detections with their predictions as measurements (module docstring).

    Parameters
    ----------
    adata : anndata.AnnData
        An output of ``mmap-predict`` / `mmap_deploy.predict`.
    path : str, Path or RemotePath
        The ``.geojson`` file (in a bucket: uploaded whole); refused if it exists, unless `overwrite`.
    genes : list of str, str or None
        None: the `DEFAULT_N_GENES` most variable predicted genes of the slide;
        ``"all"``: every gene; else gene names (a list, or one comma-separated
        string), matched case-insensitively.
    classify_by : str or None
        The obs column that names each detection's class (default
        ``tissue_id``: used when the output has it; another name must exist).
        None: no classification.
    overwrite : bool
        Replace an existing file.
    library_id : str or None
        The library of ``uns['spatial']`` whose spot size is used (default: the first).

    Returns
    -------
    Path
        The file written.
    """
    # (mmap-predict has run adata.check_output_path already; a direct call gets these checks)
    path = as_location(path)
    if path.suffix != ".geojson":
        raise UserError(f"{path}: a GeoJSON output must end in .geojson")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name ending in .geojson")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass {spell('overwrite')} to replace it, or choose another output")
    chosen = resolve_genes(adata, genes)
    if classify_by == DEFAULT_CLASSIFY_BY and classify_by not in adata.obs:
        classify_by = None  # the default is used only where the run made the column (--grid)
    classes, colours = spot_classes(adata, classify_by)
    library = _library(adata, library_id)
    shape, size = spot_shape(adata, library)
    ring = outline(shape, size)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write('{"type":"FeatureCollection","features":[')
            for i, feature in enumerate(_features(adata, chosen, classes, colours, ring, library)):
                fh.write(("," if i else "") + "\n" + feature)
            fh.write("\n]}\n")

    atomic_file(path, write)
    return path
