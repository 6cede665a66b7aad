"""Evaluation metrics, on the target's log scale (never on z-scored predictions).

- `pcc_pooled`: Pearson correlation per gene over all spots pooled, mean over genes.
- `pcc_per_slide`: the same within each section, mean over genes, then mean over sections.
- `mse`, `mae`: over all values.
A gene that is constant (in the predictions or the targets) has no correlation:
it is NaN, left out of the means, and counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def pearson_per_gene(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r of each column of `pred` with the same column of `target`; NaN where either is constant."""
    pred, target = np.asarray(pred), np.asarray(target)
    p = pred.astype(np.float64)
    t = target.astype(np.float64)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"pred and target must be (spots, genes) of one shape, got {p.shape} and {t.shape}")
    p = p - p.mean(axis=0)
    t = t - t.mean(axis=0)
    pp = np.sqrt((p * p).sum(axis=0))
    tt = np.sqrt((t * t).sum(axis=0))
    num = (p * t).sum(axis=0)
    # exactly constant columns, as scipy.stats.pearsonr treats them (NaN)
    const = (np.ptp(np.asarray(pred), axis=0) == 0) | (np.ptp(np.asarray(target), axis=0) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / (pp * tt)
    r = np.clip(r, -1.0, 1.0)
    r[const] = np.nan
    return r


def _mean_or_nan(r: np.ndarray) -> float:
    ok = ~np.isnan(r)
    return float(r[ok].mean()) if ok.any() else float("nan")


def evaluate(pred: np.ndarray, target: np.ndarray, sections: np.ndarray | list[str]) -> dict[str, Any]:
    """All metrics for predictions of spots labelled by section (see the module docstring)."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    sections = np.asarray(sections)
    if len(sections) != len(pred):
        raise ValueError("one section label per spot is needed")
    r = pearson_per_gene(pred, target)
    per_section: dict[str, dict[str, Any]] = {}
    for s in sorted(set(sections.tolist())):
        m = sections == s
        rs = pearson_per_gene(pred[m], target[m]) if m.sum() >= 2 else np.full(pred.shape[1], np.nan)
        per_section[str(s)] = {
            "n_spots": int(m.sum()),
            "pcc": _mean_or_nan(rs),
            "n_constant_genes": int(np.isnan(rs).sum()),
            "mse": float(((pred[m] - target[m]) ** 2).mean()),
            "mae": float(np.abs(pred[m] - target[m]).mean()),
        }
    slide_pccs = np.array([v["pcc"] for v in per_section.values()], dtype=np.float64)
    err = pred - target
    return {
        "pcc_pooled": _mean_or_nan(r),
        "pcc_per_slide": _mean_or_nan(slide_pccs),
        "mse": float((err ** 2).mean()),
        "mae": float(np.abs(err).mean()),
        "n_spots": int(len(pred)),
        "n_genes": int(pred.shape[1]),
        "n_sections": len(per_section),
        "n_constant_genes_pooled": int(np.isnan(r).sum()),
        "n_constant_genes_per_slide": int(sum(v["n_constant_genes"] for v in per_section.values())),
        "per_section": per_section,
    }


def by_group(pred: np.ndarray, target: np.ndarray, sections: np.ndarray | list[str],
             group_of) -> dict[str, dict[str, Any]]:
    """The metrics of `evaluate` for each group of sections (e.g. a patient's), `group_of(section)` naming it.

    Per group: `pcc_pooled` over the group's spots, `pcc_per_slide` over its
    sections, `mse`, `mae`, and the spot and section counts.
    """
    sections = np.asarray(sections)
    groups = np.array([group_of(str(s)) for s in sections])
    out = {}
    for g in sorted(set(groups.tolist())):
        m = groups == g
        e = evaluate(pred[m], target[m], sections[m]) if m.sum() >= 2 else None
        out[str(g)] = {
            "n_spots": int(m.sum()),
            "n_sections": len(set(sections[m].tolist())),
            "sections": sorted(set(sections[m].tolist())),
            "pcc_pooled": e["pcc_pooled"] if e else float("nan"),
            "pcc_per_slide": e["pcc_per_slide"] if e else float("nan"),
            "mse": float(((np.asarray(pred[m], np.float64) - target[m]) ** 2).mean()),
            "mae": float(np.abs(np.asarray(pred[m], np.float64) - target[m]).mean()),
        }
    return out
