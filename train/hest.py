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

import math
from pathlib import Path

from mmap_deploy.errors import UserError

from .datasets import Section, resolve_section_mpp
from .hest_files import _metadata

MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
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
