"""Evaluation metrics, on the target's log scale (never on z-scored predictions).

- `pcc_pooled`: Pearson correlation per gene over all spots pooled, mean over genes.
- `pcc_per_slide`: the same within each section, mean over genes, then mean over sections.
- `mse`, `mae`: over all values.
A gene that is constant (in the predictions or the targets) has no correlation:
it is NaN, left out of the means, and counted.

For comparison with published tables, `subset_scores` gives the per-gene PCC
and the means over the gene subsets papers report (`gene_subsets`: 50 highly
variable, 250 highly expressed, all); `familiarity_report` scores a model on
the most familiar spots (`mmap_deploy.model.familiarity`).
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


# -- gene subsets of published tables, and scores by familiarity -------------------
N_HVG, N_HEG = 50, 250


def gene_subsets(train_target: np.ndarray, genes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Column indices of the gene subsets that papers report, defined on training spots' targets.

    - `hvg50`: the 50 genes of highest variance of the log target (the usual
      "highly variable genes", on the training scale);
    - `heg250`: the 250 genes of highest mean of `10**target - 1`, the counts
      per 10 000 ("highly expressed genes");
    - `all`: every gene.
    Ties go to the earlier column. Subsets larger than the gene list are the whole list.
    """
    t = np.asarray(train_target, dtype=np.float64)
    var = t.var(axis=0)
    mean_counts = (np.power(10.0, t) - 1.0).mean(axis=0)
    order = lambda v: np.argsort(-v, kind="stable")  # noqa: E731
    return {f"hvg{N_HVG}": np.sort(order(var)[:N_HVG]), f"heg{N_HEG}": np.sort(order(mean_counts)[:N_HEG]),
            "all": np.arange(t.shape[1])}


def subset_scores(pred: np.ndarray, target: np.ndarray, sections: np.ndarray | list[str],
                  subsets: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-gene pooled PCC, and per subset the mean over its genes, pooled and per slide (as `evaluate`).

    `pcc_per_gene` is rounded to 5 decimals (NaN, a constant gene, as None for JSON).
    """
    pred, target, sections = np.asarray(pred), np.asarray(target), np.asarray(sections)
    r = pearson_per_gene(pred, target)
    per_slide = [pearson_per_gene(pred[m], target[m]) for s in sorted(set(sections.tolist()))
                 if (m := sections == s).sum() >= 2]
    out = {}
    for name, idx in subsets.items():
        slide = np.array([_mean_or_nan(rs[idx]) for rs in per_slide], dtype=np.float64)
        out[name] = {"pcc_pooled": _mean_or_nan(r[idx]), "pcc_per_slide": _mean_or_nan(slide), "n_genes": int(len(idx))}
    return {"pcc_per_gene": [None if np.isnan(v) else round(float(v), 5) for v in r], "subsets": out}


FAMILIAR_SHARES = (0.5, 0.8)


def familiarity_report(familiarity: np.ndarray, pred: np.ndarray, target: np.ndarray,
                       sections: np.ndarray | list[str], unfamiliar_below: float, slide_share: float) -> dict[str, Any]:
    """How a model's error goes with familiarity on held-out spots.

    - `spearman_error`: Spearman correlation of familiarity with the per-spot
      error (mean over genes of the squared error): negative when familiar
      spots are predicted better;
    - `familiar_50`, `familiar_80`, `all`: `pcc_pooled`, `pcc_per_slide`, `mse`
      over the most familiar 50% / 80% of the spots (ranked, ties by spot
      order) and over all of them;
    - `unfamiliar`: the share of spots below `unfamiliar_below`, and the mean
      per-spot error of those and of the others;
    - `per_section`: each section's share of unfamiliar spots and whether it
      would get the slide line (share >= `slide_share`).
    """
    from scipy.stats import spearmanr

    fam = np.asarray(familiarity, dtype=np.float64)
    pred, target, sections = np.asarray(pred, np.float64), np.asarray(target, np.float64), np.asarray(sections)
    err = ((pred - target) ** 2).mean(axis=1)
    out: dict[str, Any] = {"spearman_error": float(spearmanr(fam, err).statistic) if len(fam) > 2 else float("nan")}
    order = np.argsort(-fam, kind="stable")
    for share in (*FAMILIAR_SHARES, 1.0):
        keep = np.sort(order[: int(np.ceil(share * len(fam)))])
        m = evaluate(pred[keep], target[keep], sections[keep])
        out["all" if share == 1.0 else f"familiar_{round(share * 100)}"] = {
            k: m[k] for k in ("pcc_pooled", "pcc_per_slide", "mse", "n_spots")}
    low = fam < unfamiliar_below
    out["unfamiliar"] = {"share": float(low.mean()), "n": int(low.sum()),
                         "mse_unfamiliar": float(err[low].mean()) if low.any() else float("nan"),
                         "mse_others": float(err[~low].mean()) if (~low).any() else float("nan")}
    out["per_section"] = {str(s): {"n_spots": int((sections == s).sum()),
                                   "share_unfamiliar": float(low[sections == s].mean()),
                                   "slide_line": bool(low[sections == s].mean() >= slide_share)}
                          for s in sorted(set(sections.tolist()))}
    return out
