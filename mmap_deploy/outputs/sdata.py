"""The SpatialData output (`-o out.zarr`): the .h5ad's AnnData, its images and its spots as one store.

Made from the AnnData that `output.build_anndata` assembles, so the `.h5ad`
and the `.zarr` carry the same values. Element names follow the Visium
reader of spatialdata-io, so notebooks written for it work unchanged:

- images `{library}_{key}_image`: every image of `uns['spatial'][library]['images']`
  (`hires`: the thumbnail, or Space Ranger's images), `(c, y, x)` uint8, with a
  scale by `1 / tissue_{key}_scalef` into the `global` coordinate system;
- shapes `{library}`: one circle per spot, centred on `obsm['spatial']`, radius
  `spot_diameter_fullres / 2`, indexed by the spot ids; `global` is the
  full-resolution pixel grid of the slide (identity);
- shapes `{library}_tissue` (`--grid` runs): the tissue outline, one polygon
  per tissue piece (holes kept), in full-resolution pixels, indexed by the
  piece's id (`obs['tissue_id']`);
- tables `table`: the AnnData itself (X, obs, var, obsm, uns, bit for bit), plus
  `obs['region']` (the shapes' name) and `obs['spot_id']` (the spot ids), which
  tie each row to its circle.

`{library}` is the library id with characters SpatialData does not allow in
element names replaced by `_`. `spatialdata` is an optional extra: it pulls in
dask, xarray, zarr, geopandas and ome-zarr, which the `.h5ad` runtime does
without.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import atomic_folder, output_exists
from ..errors import UserError
from ..location import RemotePath, as_location
from ..options import spell

if TYPE_CHECKING:  # pragma: no cover
    import anndata
    import spatialdata

INSTALL_HINT = "pip install 'mmap-deploy[spatialdata]'"
COORDINATE_SYSTEM = "global"
TABLE_NAME = "table"
REGION_KEY = "region"
INSTANCE_KEY = "spot_id"


def require_spatialdata(what: str) -> None:
    """Make sure `spatialdata` imports, else a one-line error naming the extra; `what` asked for it."""
    try:
        import spatialdata  # noqa: F401
    except ImportError as e:
        if e.name == "spatialdata":
            raise UserError(
                f"{what}: writing SpatialData (.zarr) needs the optional spatialdata package: {INSTALL_HINT} "
                "(or write an .h5ad)"
            ) from None
        # installed, but one of its own dependencies is missing or broken
        raise UserError(f"{what}: spatialdata is installed but does not import ({e}); reinstall it: "
                        f"{INSTALL_HINT}") from None


def check_store_path(path: Path, overwrite: bool) -> None:
    """What only a `.zarr` output needs checked: the extra is installed, and `--overwrite` replaces only a store.

    `--overwrite` removes the old output, so a folder that is not a zarr store
    (no `zarr.json`, `.zgroup` or `.zattrs` at its top) is never replaced.
    """
    require_spatialdata(str(path))
    if isinstance(path, RemotePath):  # a bucket prefix is a store once its root metadata is there (atomic_folder)
        return
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: exists and is not a folder (a .zarr output is a folder); "
                            "move it away or choose another -o")
        if overwrite and not any((path / f).is_file() for f in ("zarr.json", ".zgroup", ".zattrs")):
            raise UserError(f"{path}: exists and is not a zarr store; {spell('overwrite')} replaces only a store "
                            "written before: move it away or choose another -o")


def element_name(library_id: str) -> str:
    """`library_id` as a SpatialData element name (letters, digits, `_`, `-`, `.`; no leading `.` or `__`)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", library_id)
    if not name or name.startswith((".", "__")):
        name = "slide_" + name.lstrip("._")
    return name


def to_spatialdata(adata: "anndata.AnnData") -> "spatialdata.SpatialData":
    """The SpatialData of one slide's AnnData (see the module docstring); `adata` is not changed."""
    import anndata as ad
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    libraries = list(adata.uns["spatial"])
    if len(libraries) != 1:
        raise ValueError(f"uns['spatial'] holds {len(libraries)} libraries ({libraries}); one slide has one")
    library_id = libraries[0]
    lib = adata.uns["spatial"][library_id]
    scalefactors = lib["scalefactors"]
    name = element_name(str(library_id))

    images = {}
    for key, image in lib["images"].items():
        scale = float(scalefactors[f"tissue_{key}_scalef"])  # full-res px -> image px, as scanpy reads it
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        images[f"{name}_{key}_image"] = Image2DModel.parse(
            np.moveaxis(image, -1, 0), dims=("c", "y", "x"),
            c_coords=["r", "g", "b", "a"][: image.shape[-1]] if image.shape[-1] in (3, 4) else None,
            transformations={COORDINATE_SYSTEM: Scale([1.0 / scale, 1.0 / scale], axes=("y", "x"))},
        )

    spot_ids = adata.obs_names.to_numpy(dtype=object)
    radius = float(scalefactors["spot_diameter_fullres"]) / 2.0
    circles = ShapesModel.parse(
        np.asarray(adata.obsm["spatial"], dtype=np.float64), geometry=0,
        radius=np.full(adata.n_obs, radius), index=pd.Index(spot_ids, dtype=object),
        transformations={COORDINATE_SYSTEM: Identity()},
    )

    taken = [k for k in (REGION_KEY, INSTANCE_KEY) if k in adata.obs]
    if taken:  # the table would differ from the .h5ad in these columns
        raise ValueError(f"obs already has column(s) {taken}, which the SpatialData table needs for itself")
    # A new AnnData over the same arrays (X of 300k Visium HD bins is ~1 GB: not copied);
    # obs and the top of uns are copied, as the table gets columns and keys of its own.
    table = ad.AnnData(X=adata.X, obs=adata.obs.copy(), var=adata.var, uns=dict(adata.uns),
                       obsm=dict(adata.obsm), varm=dict(adata.varm), layers=dict(adata.layers),
                       obsp=dict(adata.obsp), varp=dict(adata.varp))
    table.obs[REGION_KEY] = pd.Categorical([name] * adata.n_obs, categories=[name])
    table.obs[INSTANCE_KEY] = spot_ids
    table = TableModel.parse(table, region=name, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    shapes = {name: circles}
    tissue = _tissue_shapes(adata)
    if tissue is not None:
        shapes[f"{name}_tissue"] = tissue
    return SpatialData(images=images, shapes=shapes, tables={TABLE_NAME: table})


def _tissue_shapes(adata: "anndata.AnnData"):
    """The tissue outline of `uns['mmap']['tissue_outline']` as polygons, one per piece; None without one."""
    outline = adata.uns.get("mmap", {}).get("tissue_outline")
    if not outline or len(outline["ring_piece"]) == 0:
        return None
    import geopandas as gpd
    from shapely import make_valid
    from shapely.geometry import MultiPolygon, Polygon
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    xy = np.asarray(outline["xy"], dtype=np.float64)
    start = np.asarray(outline["ring_start"], dtype=np.int64)
    pieces: dict[int, tuple[list, list]] = {}
    for i, (piece, hole) in enumerate(zip(np.asarray(outline["ring_piece"]), np.asarray(outline["ring_hole"]))):
        outer, holes = pieces.setdefault(int(piece), ([], []))
        (holes if hole else outer).append(xy[start[i]:start[i + 1]])
    geoms = []
    for outer, holes in pieces.values():
        polys = [Polygon(ring, [h for h in holes if Polygon(ring).contains(Polygon(h).representative_point())])
                 for ring in outer]
        geom = polys[0] if len(polys) == 1 else MultiPolygon(polys)
        # an outline traced along pixel edges may pass through one corner twice (two lobes touching
        # at a corner): a valid geometry of the same area for GIS tools
        geoms.append(geom if geom.is_valid else make_valid(geom))
    gdf = gpd.GeoDataFrame({"tissue_id": list(pieces)}, geometry=geoms, index=_piece_index(list(pieces)))
    return ShapesModel.parse(gdf, transformations={COORDINATE_SYSTEM: Identity()})


def _piece_index(ids: list[int]):
    import pandas as pd

    return pd.Index([str(i) for i in ids], dtype=object)


def write_spatialdata(adata: "anndata.AnnData", path: str | Path | RemotePath, overwrite: bool = False) -> Path:
    """Write `adata` as a SpatialData store at `path` atomically; refuse an existing one unless `overwrite`."""
    # (mmap-predict has run output.check_output_path already; a direct call gets the store's own checks)
    path = as_location(path)  # a local folder, or a bucket prefix (uploaded whole: see atomic_folder)
    check_store_path(path, overwrite)
    if output_exists(path) and not overwrite:
        raise UserError(f"{path}: already exists; pass {spell('overwrite')} to replace it, or choose another output")
    sdata = to_spatialdata(adata)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            # zarr announces a future default on every array it writes; nothing for the user to do
            warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
            sdata.write(tmp, update_sdata_path=False)

    atomic_folder(path, write)
    return path
