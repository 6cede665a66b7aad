"""What a `--grid` run adds to the AnnData: the grid's obs columns, its record, the tissue and its outline.

- `obs`: `array_row`, `array_col` (the lattice's indices, Visium's convention
  for `--grid visium`), `in_tissue` (1: every grid spot is on tissue),
  `tissue_fraction` (share of the spot's area that is tissue) and `tissue_id`
  (the tissue piece, 1..n);
- `uns['spatial'][library]['scalefactors']['spot_diameter_fullres']`: the
  grid's spot (or bin) size in full-resolution pixels, so `sc.pl.spatial`
  draws spots at their true size;
- `uns['mmap']['grid']`, `uns['mmap']['tissue']`: the grid (kind, pitch, spot
  size, origin, count) and the tissue (method, parameters, threshold, area,
  pieces, time);
- `uns['mmap']['tissue_outline']`: the outline in level-0 pixels, as flat
  arrays (h5ad stores no ragged lists): `xy` (n, 2) the vertices of every ring
  one after another, `ring_start` (r + 1) where each ring starts, `ring_piece`
  (r) its piece and `ring_hole` (r) whether it is a hole.

A run at given spots (COORDS) adds `obs['tissue_fraction']` too
(`annotate_spot_tissue`): the share of each spot's disc (`spot_diameter_fullres`)
that the detected tissue covers, so background spots go with
`adata[adata.obs.tissue_fraction >= 0.5]`; `uns['mmap']['spot_tissue']` says
how (footprint, diameter, the tissue's record).

The grid may have more spots than the output: a spot whose patch could not be
read is dropped (and listed in `uns['mmap']['dropped_spots']`); the columns
follow the output's rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import anndata

    from ..inputs.grid import Grid
    from ..inputs.tissue import Tissue


def outline_arrays(tissue: "Tissue") -> dict[str, np.ndarray]:
    """The tissue's rings as the flat arrays of `uns['mmap']['tissue_outline']`."""
    rings = tissue.polygons()
    sizes = np.array([len(r.xy) for r in rings], dtype=np.int64)
    return {
        "xy": np.concatenate([r.xy for r in rings]).astype(np.float64) if rings else np.zeros((0, 2)),
        "ring_start": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "ring_piece": np.array([r.piece for r in rings], dtype=np.int32),
        "ring_hole": np.array([r.hole for r in rings], dtype=bool),
    }


def annotate_grid(adata: "anndata.AnnData", grid: "Grid", tissue: "Tissue", library_id: str) -> None:
    """Add the grid's columns, scale factor and records, and the tissue outline, to `adata` (in place)."""
    import pandas as pd

    rows = pd.Index(np.asarray(grid.ids, dtype=object)).get_indexer(adata.obs_names)
    if (rows < 0).any():  # the output's spots are the grid's (less dropped ones): anything else is a bug
        raise AssertionError(f"{int((rows < 0).sum())} output spots are not on the grid")
    adata.obs["array_row"] = grid.array_row[rows].astype(np.int64)
    adata.obs["array_col"] = grid.array_col[rows].astype(np.int64)
    adata.obs["in_tissue"] = np.ones(len(rows), dtype=np.int64)
    adata.obs["tissue_fraction"] = grid.tissue_fraction[rows].astype(np.float32)
    adata.obs["tissue_id"] = grid.tissue_id[rows].astype(np.int32)
    adata.uns["spatial"][library_id]["scalefactors"]["spot_diameter_fullres"] = float(grid.spot_diameter_px)
    mmap = adata.uns["mmap"]
    mmap["grid"] = grid.record()
    mmap["tissue"] = tissue.record()
    mmap["tissue_outline"] = outline_arrays(tissue)
    mmap["spot_diameter_rule"] = f"the grid's spot size: {grid.spec.spot_um:g} um"


def annotate_spot_tissue(adata: "anndata.AnnData", tissue: "Tissue | None", library_id: str, note: str = "") -> None:
    """`obs['tissue_fraction']` for a run at given spots: the share of each spot's disc that is tissue.

    `tissue` None (detection failed: `note` says why): the column is NaN. No tissue found: 0.
    """
    from ..inputs.grid import spot_tissue_fraction

    diameter = float(adata.uns["spatial"][library_id]["scalefactors"]["spot_diameter_fullres"])
    record = {"footprint": "disc of spot_diameter_fullres", "spot_diameter_fullres": diameter}
    if tissue is None:
        adata.obs["tissue_fraction"] = np.full(adata.n_obs, np.nan, dtype=np.float32)
    else:
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        adata.obs["tissue_fraction"] = spot_tissue_fraction(tissue.mask, tissue.scale_x, tissue.scale_y, xy, diameter)
        record["tissue"] = tissue.record()
    if note:
        record["note"] = note
    adata.uns["mmap"]["spot_tissue"] = record
