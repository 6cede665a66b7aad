"""A HEST-1k sample's own files: spot positions from `st/{id}.h5ad`, its `metadata/{id}.json`.

Apart from `hest.py` (which makes training sections of them) so that the
dataset code can read HEST positions without importing the section builder
(which imports the dataset code).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmap_deploy.errors import UserError
from mmap_deploy.inputs.coords import Spots

X_COLUMN, Y_COLUMN = "pxl_col_in_fullres", "pxl_row_in_fullres"


def _read_obs(path: Path):
    import anndata as ad

    if not path.is_file():
        raise UserError(f"{path}: HEST counts file not found")
    try:
        return ad.read_h5ad(path, backed="r")
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: cannot read this AnnData file ({e}); re-download the sample") from None


def read_h5ad_positions(path: str | Path, all_spots: bool = False) -> Spots:
    """Spot ids and full-resolution pixel centres from a HEST `st/{id}.h5ad` (in-tissue spots unless `all_spots`)."""
    path = Path(path)
    adata = _read_obs(path)
    try:
        obs = adata.obs
        ids = np.asarray([str(s) for s in adata.obs_names])
        if X_COLUMN in obs and Y_COLUMN in obs:
            xy = np.column_stack([np.asarray(obs[X_COLUMN], np.float64), np.asarray(obs[Y_COLUMN], np.float64)])
        elif "spatial" in adata.obsm:
            xy = np.asarray(adata.obsm["spatial"], np.float64)[:, :2]
        else:
            raise UserError(f"{path}: no spot positions: expected obs columns {X_COLUMN}, {Y_COLUMN} "
                            "or obsm['spatial'] (full-resolution pixels)")
        array_xy = None
        if "array_col" in obs and "array_row" in obs:
            array_xy = np.column_stack([np.asarray(obs["array_col"], np.float64),
                                        np.asarray(obs["array_row"], np.float64)])
        keep = np.ones(len(ids), dtype=bool)
        if "in_tissue" in obs and not all_spots:
            keep = np.asarray(obs["in_tissue"]).astype(float) == 1
    finally:
        if getattr(adata, "file", None) is not None:
            adata.file.close()
    bad = np.flatnonzero(~np.isfinite(xy).all(axis=1) & keep)
    if len(bad):
        raise UserError(f"{path}: spot {ids[bad[0]]} has no finite pixel position ({len(bad)} such spots)")
    return Spots(ids=[str(s) for s in ids[keep]], xy=np.ascontiguousarray(xy[keep]), source_format="hest",
                 array_xy=None if array_xy is None else array_xy[keep])


def _metadata(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: HEST metadata not found; download the sample's metadata/ file too") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the HEST metadata ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of sample metadata")
    return data


def h5ad_lattice(path: str | Path):
    """(spots, lattice spec or None) of a HEST sample: Visium's lattice when its metadata says Visium."""
    from mmap_deploy.inputs.geometry import VISIUM

    path = Path(path)
    spots = read_h5ad_positions(path)
    meta_path = path.parent.parent / "metadata" / f"{path.stem}.json"
    tech = str(_metadata(meta_path).get("st_technology", "")) if meta_path.is_file() else ""
    return spots, (VISIUM if tech.strip().lower() == "visium" else None)
