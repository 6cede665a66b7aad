"""HEST-1k as training data: `--hest-dir DIR [--ids ID,ID,...]`.

A HEST-1k download holds, per sample ID (HEST's own layout, Jaume et al.,
"HEST-1k", NeurIPS 2024 Datasets and Benchmarks; github.com/mahmoodlab/HEST):

- ``wsis/{id}.tif``: the H&E slide, a pyramidal TIFF;
- ``st/{id}.h5ad``: the counts (obs = spots, var = genes) with each spot's
  full-resolution pixel position in obs ``pxl_col_in_fullres`` /
  ``pxl_row_in_fullres`` (else ``obsm['spatial']``, x then y) and, for
  Visium, its ``array_row`` / ``array_col`` and ``in_tissue``;
- ``metadata/{id}.json``: ``pixel_size_um_estimated`` (HEST's measured µm
  per pixel; ``pixel_size_um_embedded`` is the fallback), ``st_technology``
  and ``patient``.

Resolution: the metadata's, checked against the slide's own (more than 10%
apart is an error) and, for Visium samples, against the spot lattice, as
`mmap-predict` checks it. Patients: the metadata's ``patient``, else the
sample ID (each sample its own patient).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mmap_deploy.errors import UserError
from mmap_deploy.inputs.coords import Spots

from .datasets import Section, resolve_section_mpp

MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
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


def _patient(meta: dict, sid: str) -> str:
    """The metadata's patient, qualified by its dataset (patient names repeat across studies); else the ID."""
    patient = meta.get("patient")
    if patient is None or (isinstance(patient, float) and math.isnan(patient)) or not str(patient).strip():
        return sid
    study = meta.get("dataset_title")
    return f"{study}: {patient}" if isinstance(study, str) and study.strip() else str(patient)


def hest_ids(root: Path) -> list[str]:
    """Every sample ID with a `st/{id}.h5ad` under `root`, sorted."""
    if not (root / "st").is_dir():
        raise UserError(f"{root}: no st/ folder here; pass --hest-dir pointing at the HEST-1k download "
                        "(the folder holding wsis/, st/ and metadata/)")
    return sorted(p.stem for p in (root / "st").glob("*.h5ad"))


def hest_sections(root: str | Path, ids: list[str] | None = None, with_images: bool = True) -> list[Section]:
    """The HEST samples under `root` (all, or `ids`), as Sections.

    `with_images` (phase 1, the feature cache): each needs its slide, and its
    resolution is read from the metadata and checked; without, only counts
    and positions are needed (phase 2, evaluation).
    """
    root = Path(root)
    found = hest_ids(root)
    if ids:
        unknown = [i for i in ids if i not in found]
        if unknown:
            raise UserError(f"{root / 'st'}: no {', '.join(f'{i}.h5ad' for i in unknown)}; "
                            f"available: {', '.join(found[:20])}{' ...' if len(found) > 20 else ''}")
        found = [i for i in found if i in set(ids)]
    if not found:
        raise UserError(f"{root / 'st'}: no .h5ad samples found")
    out = []
    for sid in found:
        st = root / "st" / f"{sid}.h5ad"
        meta_path = root / "metadata" / f"{sid}.json"
        meta = _metadata(meta_path) if (with_images or meta_path.is_file()) else {}
        sec = Section(sid, counts=st, coords=st, positions="h5ad", patient=_patient(meta, sid))
        if with_images:
            slide = root / "wsis" / f"{sid}.tif"
            if not slide.is_file():
                raise UserError(f"{slide}: slide not found; download the sample's wsis/ file, or leave {sid} "
                                "out of --ids")
            sec.slide = slide
            key = next((k for k in MPP_KEYS if isinstance(meta.get(k), (int, float)) and meta[k] > 0), None)
            if key is None:
                raise UserError(f"{meta_path}: no pixel size ({' or '.join(MPP_KEYS)}); HEST's metadata "
                                f"gives it for every sample: re-download {meta_path.name}")
            sec.mpp = float(meta[key])
            sec.mpp = resolve_section_mpp(sec, mpp_source=f"{meta_path} {key}",
                                          fix=f"correct {meta_path.name}, or leave {sid} out of --ids")
        out.append(sec)
    return out
