"""Leave-one-patient-out cross-validation of phase-2 recipes on a feature cache.

Each patient (the patient a manifest or HEST's metadata gives, else a
section's leading letters: her2st's A2..A6 are patient A) is held out in
turn; every candidate recipe trains the fusion head on the other
patients' sections and is scored on the held-out patient's sections, next to
two references on the same spots: the cached phase-1 `y1`, and a ridge
regression on `f` whose alpha is chosen inside the training folds (an inner
leave-one-patient-out over the training patients, never on the held-out one).

With the sections' spot positions, every model is also scored after the
runtime's neighbour smoothing (`NAME+smooth`, `mmap_deploy.model.neighbours`),
with the radius and weight chosen inside the training folds: on the ridge
probe's inner out-of-fold predictions (the alpha it chose) over the training
patients (`spatial.choose_smoothing`), then applied to the held-out patient's
predictions of every model.

Every model is also scored per gene and over the gene subsets papers report
(`metrics.gene_subsets`: 50 highly variable and 250 highly expressed genes of
the fold's training patients, and all), and against familiarity: a training
summary (`mmap_deploy.model.familiarity`) of the training patients' `f` scores
the held-out spots, and `metrics.familiarity_report` says how each model's
error goes with it.

Counts and features are read once; k-means banks are built once per section
and prototype rule and reused by every fold and candidate.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmap_deploy.errors import UserError
from mmap_deploy.model import familiarity as fam
from mmap_deploy.model.prototypes import PrototypeRule

from .datasets import Targets, patient_of, split_sections
from .features import SectionFeatures
from .metrics import evaluate, familiarity_report, gene_subsets, subset_scores
from .spatial import SectionPositions, choose_smoothing, smooth_sections

log = logging.getLogger(__name__)

METRICS = ("pcc_pooled", "pcc_per_slide", "mse")
RIDGE_ALPHAS = (10.0, 100.0, 1000.0, 3000.0, 10000.0, 30000.0, 100000.0)
# The model that is phase 2's default (Phase2Recipe, the CLI's --l-fixed, --head-average and its neighbour
# smoothing, --smooth-radius-um and --smooth-weight; issue 21 replaced "e10-L32-paper-avg5").
CURRENT_DEFAULT = "e10-L32-paper-avg5+smooth"


@dataclass
class Candidate:
    """A phase-2 recipe to cross-validate: recipe fields, model-config fields, and how the head is kept.

    `early_stop`: hold out the default seeded 20% of the training sections and
    keep the epoch best on them (the recipe's keep="best"); otherwise train on
    every training section and keep the end of training (keep="last").
    `neighbour_um` > 0: each spot's bank ends with the mean `f` of its neighbours
    within that radius (`phase2.NeighbourBankedSpots`), in training and scoring.
    """

    recipe: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    l_fixed: int = 0
    early_stop: bool = False
    neighbour_um: float = 0.0


# What a candidate's recipe starts from: the phase-2 recipe before cross-validation (fixed here, so
# that a candidate means the same whatever Phase2Recipe's defaults become).
BASE_RECIPE = {"epochs": 10, "batch_size": 64, "lr": 1e-4, "min_lr": 1e-6, "weight_decay": 1e-4, "seed": 42,
               "keep": "best", "average_last": 0}

CANDIDATES: dict[str, Candidate] = {
    # the recipe before cross-validation: 10 epochs, early stopping on 20% of the sections, adaptive L
    "early-stop": Candidate(early_stop=True),
    # fixed epochs; each also reports its last epoch without the weight averaging ("NAME:last")
    "e10-L32-avg5": Candidate({"epochs": 10, "keep": "last", "average_last": 5}, l_fixed=32),
    # batches of 256 (4x fewer steps: each step projects every training centroid once)
    "b256-e10-L32-avg5": Candidate({"epochs": 10, "batch_size": 256, "lr": 4e-4, "keep": "last",
                                    "average_last": 5}, l_fixed=32),
    "b256-e20-L32-avg10": Candidate({"epochs": 20, "batch_size": 256, "lr": 4e-4, "keep": "last",
                                     "average_last": 10}, l_fixed=32),
    "e10-L32-drop0.1-wd0.05-avg5": Candidate({"epochs": 10, "keep": "last", "weight_decay": 0.05, "average_last": 5},
                                             {"dropout": 0.1}, l_fixed=32),
    "e10-L32-paper-avg5": Candidate({"epochs": 10, "keep": "last", "average_last": 5}, {"head_average": "paper"},
                                    l_fixed=32),
    # the default recipe whose fusion head also attends to the mean f of the spot's neighbours (issue 21)
    "e10-L32-paper-avg5-nbr300": Candidate({"epochs": 10, "keep": "last", "average_last": 5},
                                           {"head_average": "paper"}, l_fixed=32, neighbour_um=300.0),
}


def patient_folds(names: list[str], patient_of_section: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Sections grouped by patient, patients sorted; UserError with fewer than 2 patients.

    `patient_of_section` names a section's patient where the data gives one
    (a manifest's patient column, HEST's metadata); the others are grouped by
    their name's leading letters (`datasets.patient_of`).
    """
    given = patient_of_section or {}
    folds: dict[str, list[str]] = {}
    for n in sorted(names):
        if n not in given and not re.match(r"[A-Za-z]", n):
            raise UserError(f"section {n!r}: its name does not start with a patient letter (e.g. B1); "
                            "cross-validation groups sections by their leading letters")
        folds.setdefault(given.get(n) or patient_of(n), []).append(n)
    if len(folds) < 2:
        raise UserError(f"cross-validation needs sections of at least 2 patients, got {', '.join(folds) or 'none'}")
    return dict(sorted(folds.items()))


def _stack(feats: dict[str, SectionFeatures], targets: dict[str, Targets], names: list[str]):
    names = [n for n in names if len(feats[n].spot_ids)]
    if not names:
        return None
    f = np.concatenate([feats[n].f for n in names])
    y1 = np.concatenate([feats[n].y1 for n in names])
    t = np.concatenate([targets[n].values[targets[n].rows_for(feats[n].spot_ids, f"section {n}")] for n in names])
    labels = np.concatenate([[n] * len(feats[n].spot_ids) for n in names])
    return f, y1, t, labels


def _inner_ridge_predictions(feats, targets, folds: dict[str, list[str]], alpha: float, xy_of):
    """The ridge probe's out-of-fold predictions over `folds` (the training patients) at `alpha`:
    [(pred, target, labels, xy_um)] per inner fold, what the smoothing is chosen on."""
    out = []
    for patient, held in folds.items():
        tr = _stack(feats, targets, [n for p, ns in folds.items() if p != patient for n in ns])
        te = _stack(feats, targets, held)
        if tr is None or te is None:
            continue
        w, b = ridge_fit(tr[0], tr[2], [alpha])[alpha]
        out.append(((te[0] @ w + b).astype(np.float32), te[2], te[3], xy_of(held)))
    return out


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in (*METRICS, "mae", "n_spots", "n_sections")}


# models whose per-spot familiarity and error the fold keeps (for comparing familiarity methods offline)
SPOT_ERRORS_OF = ("y1", "ridge", CURRENT_DEFAULT)


class _Scoring:
    """One fold's scoring of every model: metrics, per-gene PCC and gene subsets, and familiarity."""

    def __init__(self, train, held_f: np.ndarray, held_ids: list[str], patient_of_section: dict[str, str]):
        self.subsets = gene_subsets(train[2])
        summary = fam.fit_summary(train[0], train[3], [patient_of_section[n] for n in train[3]])
        self.summary = summary
        self.familiarity = {"summary": summary.meta, "spot_ids": list(held_ids),
                            "values": [round(float(v), 6) for v in summary.familiarity(held_f)], "error": {}}

    def __call__(self, model: str, pred: np.ndarray, target: np.ndarray, labels, f: np.ndarray) -> dict[str, Any]:
        m = _summary(evaluate(pred, target, labels))
        m.update(subset_scores(pred, target, labels, self.subsets))
        values = self.summary.familiarity(f)
        m["familiarity"] = familiarity_report(values, pred, target, labels, fam.UNFAMILIAR_BELOW, fam.SLIDE_SHARE)
        if model in SPOT_ERRORS_OF:
            err = ((np.asarray(pred, np.float64) - target) ** 2).mean(axis=1)
            self.familiarity["error"][model] = [round(float(v), 6) for v in err]
        return m

    def record(self) -> dict[str, Any]:
        return {**self.familiarity, "gene_subsets": {k: v.tolist() for k, v in self.subsets.items() if k != "all"}}


def ridge_fit(x: np.ndarray, y: np.ndarray, alphas) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Ridge regressions of y on x with an intercept, one per alpha: {alpha: (weights, intercept)}.

    One eigendecomposition of the centred x'x serves every alpha (what
    sklearn's Ridge solves once per alpha).
    """
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    xc = x - xm
    s, v = np.linalg.eigh(xc.T @ xc)
    proj = v.T @ (xc.T @ (y - ym))
    out = {}
    for a in alphas:
        w = v @ (proj / (s + a)[:, None])
        out[a] = (w, ym - xm @ w)
    return out


def ridge_alpha(feats, targets, folds: dict[str, list[str]], alphas=RIDGE_ALPHAS, select: str = "pcc_per_slide"):
    """The alpha with the best mean `select` over a leave-one-patient-out of `folds` (the training patients)."""
    scores = {a: [] for a in alphas}
    for patient, held in folds.items():
        tr = _stack(feats, targets, [n for p, ns in folds.items() if p != patient for n in ns])
        te = _stack(feats, targets, held)
        if tr is None or te is None:
            continue
        for a, (w, b) in ridge_fit(tr[0], tr[2], alphas).items():
            scores[a].append(evaluate(te[0] @ w + b, te[2], te[3])[select])
    means = {a: float(np.nanmean(s)) if s else float("nan") for a, s in scores.items()}
    best = max(alphas, key=lambda a: means[a] if np.isfinite(means[a]) else -np.inf)
    return best, means


class _Folds:
    """What every fold needs, built once: data, candidates, and k-means banks per section and rule."""

    def __init__(self, genes, feats, targets, candidates, backbone, epochs, max_steps, progress, patient_of=None,
                 positions: dict[str, SectionPositions] | None = None):
        self.genes, self.feats, self.targets, self.candidates = genes, feats, targets, candidates
        self.backbone = backbone
        self.positions = positions
        self.epochs, self.max_steps, self.progress = epochs, max_steps, progress
        self.folds = patient_folds(list(feats), patient_of)
        self.dim = next(iter(feats.values())).f.shape[1]
        self.prepared: dict[int, dict[str, Any]] = {}  # l_fixed -> section -> PreparedSection or None

    def sections(self, l_fixed: int, names: list[str]):
        from .phase2 import prepare

        rule = PrototypeRule(l_fixed=l_fixed)
        cache = self.prepared.setdefault(l_fixed, {})
        for n in names:
            if n not in cache:
                got = prepare(self.feats, self.targets, [n], rule)
                cache[n] = got[0] if got else None
        return [cache[n] for n in names if cache[n] is not None], rule

    def xy_of(self, names: list[str]) -> np.ndarray:
        """Positions (µm) of `_stack`'s rows for `names`: sections with cached spots, in cache order."""
        names = [n for n in names if len(self.feats[n].spot_ids)]
        return np.concatenate([self.positions[n].xy_for(self.feats[n].spot_ids) for n in names])

    def banked(self, secs, max_bank: int, cand: Candidate):
        """The spots of `secs` for a candidate: with its neighbour slot when it has one."""
        from .phase2 import BankedSpots, NeighbourBankedSpots

        if not cand.neighbour_um:
            return BankedSpots(secs, max_bank)
        if self.positions is None:
            raise UserError("a candidate with neighbours needs the sections' spot positions (pass --spots)")
        xy = [self.positions[s.name].xy_for(s.spot_ids) for s in secs]
        return NeighbourBankedSpots(secs, max_bank, xy, cand.neighbour_um)

    def smoothing_on_all_patients(self) -> dict[str, Any]:
        """The smoothing that the fold's rule chooses with every patient of the cache as training patients:
        what a model trained on all of them (the default recipe's) should ship with."""
        from threadpoolctl import threadpool_limits

        t0 = time.perf_counter()
        with threadpool_limits(limits=1, user_api="blas"):
            alpha, _ = ridge_alpha(self.feats, self.targets, self.folds)
            smoothing, scores = choose_smoothing(_inner_ridge_predictions(self.feats, self.targets, self.folds,
                                                                          alpha, self.xy_of))
        return {**smoothing.to_dict(), "ridge_alpha": alpha, "pcc_per_slide": scores,
                "seconds": round(time.perf_counter() - t0, 1)}

    def run(self, patient: str) -> dict[str, Any] | None:
        """Every model of one fold: train on the other patients, score on `patient`."""
        import torch
        from threadpoolctl import threadpool_limits

        from .phase2 import FusionHead, Phase2Recipe, config_for_cache, fit_fusion, predict

        feats, targets, held = self.feats, self.targets, self.folds[patient]
        train_names = [n for p, ns in self.folds.items() if p != patient for n in ns]
        te = _stack(feats, targets, held)
        if te is None:
            log.warning("patient %s: no spots in the cache; fold skipped", patient)
            return None
        fold: dict[str, Any] = {"held_out": held, "n_spots": int(len(te[0]))}
        with threadpool_limits(limits=1, user_api="blas"):
            tr = _stack(feats, targets, train_names)
            patient_of_section = {n: p for p, ns in self.folds.items() for n in ns}
            score = _Scoring(tr, te[0], [s for n in held for s in feats[n].spot_ids], patient_of_section)
            fold["y1"] = score("y1", te[1], te[2], te[3], te[0])
            t0 = time.perf_counter()
            alpha, means = ridge_alpha(feats, targets, {p: ns for p, ns in self.folds.items() if p != patient})
            w, b = ridge_fit(tr[0], tr[2], [alpha])[alpha]
            ridge_pred = te[0] @ w + b
            fold["ridge"] = {**score("ridge", ridge_pred, te[2], te[3], te[0]), "alpha": alpha,
                             "inner_pcc_per_slide": {str(a): v for a, v in means.items()},
                             "seconds": round(time.perf_counter() - t0, 1)}
            smoothing = None
            if self.positions is not None:
                t0 = time.perf_counter()
                inner = {p: ns for p, ns in self.folds.items() if p != patient}
                smoothing, scores = choose_smoothing(_inner_ridge_predictions(feats, targets, inner, alpha,
                                                                              self.xy_of))
                fold["smoothing"] = {**smoothing.to_dict(), "inner_pcc_per_slide": scores,
                                     "seconds": round(time.perf_counter() - t0, 1)}
                te_xy = self.xy_of(held)
                for model, pred in (("y1", te[1]), ("ridge", ridge_pred)):
                    fold[f"{model}+smooth"] = score(f"{model}+smooth", smooth_sections(pred, te[3], te_xy, smoothing),
                                                    te[2], te[3], te[0])
        for name, cand in self.candidates.items():
            t0 = time.perf_counter()
            recipe = Phase2Recipe(**{**BASE_RECIPE, **cand.recipe})
            if self.epochs is not None:
                recipe.epochs = self.epochs
                recipe.average_last = min(recipe.average_last, self.epochs)
            recipe.keep = "best" if cand.early_stop else "last"
            fit_names, val_names = split_sections(train_names) if cand.early_stop else (train_names, [])
            cfg = config_for_cache(self.genes, self.backbone, prototype_rule=PrototypeRule(l_fixed=cand.l_fixed),
                                   **cand.config)
            train_secs, rule = self.sections(cand.l_fixed, fit_names)
            test_data = self.banked(self.sections(cand.l_fixed, held)[0], rule.max_bank, cand)
            # keep="last": the held-out patient is only logged per epoch (the curve), never used to choose
            val_secs = self.sections(cand.l_fixed, val_names)[0]
            if cand.early_stop:
                monitor = self.banked(val_secs, rule.max_bank, cand) if val_secs else None
            else:
                monitor = test_data
            torch.manual_seed(recipe.seed)
            fusion = FusionHead(cfg, self.dim)
            history, _, kept = fit_fusion(cfg, fusion, self.banked(train_secs, rule.max_bank, cand), monitor, recipe,
                                          self.max_steps, self.progress)
            pred = predict(fusion, test_data)
            test_f = test_data.f.numpy()
            m = score(name, pred, test_data.target.numpy(), test_data.names, test_f)
            if smoothing is not None:
                xy = np.concatenate([self.positions[s.name].xy_for(s.spot_ids) for s in test_data.sections])
                fold[f"{name}+smooth"] = score(f"{name}+smooth", smooth_sections(pred, test_data.names, xy, smoothing),
                                               test_data.target.numpy(), test_data.names, test_f)
            m.update({"kept_epoch": kept, "seconds": round(time.perf_counter() - t0, 1)})
            if not cand.early_stop:
                m["curve_pcc_pooled"] = [r.get("val_pcc_pooled") for r in history]
                m["curve_pcc_per_slide"] = [r.get("val_pcc_per_slide") for r in history]
                if recipe.average_last:  # the same run's last epoch, before averaging
                    last = history[-1]
                    fold[f"{name}:last"] = {k: last[f"val_{k}"] for k in (*METRICS, "mae")}
            fold[name] = m
            log.info("patient %s, %s: %s", patient, name, {k: round(m[k], 4) for k in METRICS})
        fold["familiarity"] = score.record()
        return fold


_WORK: _Folds | None = None  # a worker process's copy (read once in the parent, sent once per worker)


def _start_worker(work: _Folds) -> None:
    import torch

    global _WORK
    torch.set_num_threads(1)
    _WORK = work


def _run_in_worker(patient: str):
    return patient, _WORK.run(patient)


def cross_validate(genes: list[str], feats: dict[str, SectionFeatures], targets: dict[str, Targets],
                   candidates: dict[str, Candidate], *, backbone: str, epochs: int | None = None, max_steps: int = 0,
                   patients: list[str] | None = None, jobs: int = 1, progress: bool = False,
                   on_fold=None, patient_of: dict[str, str] | None = None,
                   positions: dict[str, SectionPositions] | None = None) -> dict[str, Any]:
    """Leave-one-patient-out scores of y1, ridge on f and every candidate; see the module docstring.

    `backbone`: the one that made the features (`features.cache_backbone`).
    `patient_of` maps sections to their patients where the data gives them (see `patient_folds`).
    `positions` (section -> its spots in µm, `spatial.section_positions`) adds the smoothed models.

    `epochs` overrides every candidate's epochs (smoke runs); `patients` runs
    only those folds; `jobs` > 1 runs folds in that many worker processes (one
    torch thread each; each gets a copy of the data once). `on_fold(results)` is called after each fold with the
    results so far (e.g. to write them).
    """
    work = _Folds(genes, feats, targets, candidates, backbone, epochs, max_steps, progress, patient_of, positions)
    todo = patients or list(work.folds)
    unknown = [p for p in todo if p not in work.folds]
    if unknown:
        raise UserError(f"patient(s) {', '.join(unknown)} not in the cache (it has {', '.join(work.folds)})")
    results: dict[str, Any] = {"patients": dict(work.folds), "folds": {},
                               "candidates": {n: {"recipe": c.recipe, "config": c.config, "l_fixed": c.l_fixed,
                                                  "early_stop": c.early_stop, "neighbour_um": c.neighbour_um}
                                              for n, c in candidates.items()}}

    def done(patient, fold):
        if fold is not None:
            results["folds"][patient] = fold
            results["folds"] = {p: results["folds"][p] for p in todo if p in results["folds"]}
        if on_fold is not None:
            on_fold(summarise(results))

    if jobs > 1 and len(todo) > 1:
        import multiprocessing

        # spawned, not forked: autograd's threads do not survive a fork of a process that has used them
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(jobs, len(todo)), initializer=_start_worker, initargs=(work,)) as pool:
            for patient, fold in pool.imap_unordered(_run_in_worker, todo):
                done(patient, fold)
    else:
        for patient in todo:
            done(patient, work.run(patient))
    if positions is not None:
        results["smoothing_all_patients"] = work.smoothing_on_all_patients()
    return summarise(results)


def summarise(results: dict[str, Any], min_wins: int | None = None,
              default: str | None = CURRENT_DEFAULT) -> dict[str, Any]:
    """Mean ± sd (ddof 1) over folds per model, per-slide wins over ridge, and the chosen candidate.

    The choice: the candidate with the best mean per-slide PCC among those
    beating ridge per slide in at least `min_wins` folds (default: 6 of 8,
    i.e. three quarters of the folds, rounded up); if none does, the best mean
    anyway, flagged `meets_rule: False`. `replaces_default`: the choice meets
    the rule and beats the current `default` (when it ran) in mean per-slide PCC.
    """
    folds = results["folds"]
    cand_names = [c for name in results["candidates"] for c in (name, f"{name}:last", f"{name}+smooth")
                  if any(c in f for f in folds.values())]
    models = [m for m in ("y1", "y1+smooth", "ridge", "ridge+smooth") if any(m in f for f in folds.values())]
    models += cand_names
    n = len(folds)
    need = min_wins if min_wins is not None else int(np.ceil(0.75 * n))
    summary: dict[str, Any] = {}
    for model in models:
        rows = [f[model] for f in folds.values() if model in f]
        if not rows:
            continue
        s: dict[str, Any] = {"n_folds": len(rows)}
        for k in METRICS:
            v = np.array([r[k] for r in rows], dtype=np.float64)
            s[k] = {"mean": float(np.nanmean(v)), "sd": float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0}
        s["wins_per_slide_vs_ridge"] = int(sum(f[model]["pcc_per_slide"] > f["ridge"]["pcc_per_slide"]
                                               for f in folds.values() if model in f))
        s["wins_per_slide_vs_y1"] = int(sum(f[model]["pcc_per_slide"] > f["y1"]["pcc_per_slide"]
                                            for f in folds.values() if model in f))
        if all("ridge+smooth" in f for f in folds.values() if model in f):  # the smoothed probe: a stronger reference
            s["wins_per_slide_vs_ridge+smooth"] = int(sum(
                f[model]["pcc_per_slide"] > f["ridge+smooth"]["pcc_per_slide"] for f in folds.values() if model in f))
        s.update(_subset_and_familiarity_means(rows))
        summary[model] = s
    cands = [c for c in cand_names if c in summary]
    chosen, meets = None, False
    if cands:
        ok = [c for c in cands if summary[c]["wins_per_slide_vs_ridge"] >= need]
        pool = ok or cands
        chosen = max(pool, key=lambda c: summary[c]["pcc_per_slide"]["mean"])
        meets = bool(ok)
    current = default if default in summary else None
    replaces = bool(meets and chosen != current and (
        current is None or summary[chosen]["pcc_per_slide"]["mean"] > summary[current]["pcc_per_slide"]["mean"]))
    out = {**results, "summary": summary, "choice": {"candidate": chosen, "meets_rule": meets,
                                                      "min_wins_per_slide_vs_ridge": need, "n_folds": n,
                                                      "ranked_by": "mean pcc_per_slide",
                                                      "current_default": current, "replaces_default": replaces}}
    if current is not None and "familiarity" in summary[current]:
        f = summary[current]["familiarity"]
        # the product rule's part on held-out patients (RESULTS_training.md, "Familiarity"): most folds
        out["familiarity_rule_folds"] = {"model": current, "folds_familiar_50_above_all": f["folds_familiar_50_above_all"],
                                         "n_folds": f["n_folds"], "needed": f["n_folds"] // 2 + 1,
                                         "met": f["folds_familiar_50_above_all"] >= f["n_folds"] // 2 + 1}
    return out


def _mean_sd(values) -> dict[str, float]:
    v = np.array(values, dtype=np.float64)
    return {"mean": float(np.nanmean(v)), "sd": float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0}


def _subset_and_familiarity_means(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd over folds of a model's gene-subset PCCs and of its familiarity report's numbers."""
    out: dict[str, Any] = {}
    subs = [r["subsets"] for r in rows if "subsets" in r]
    if subs:
        out["subsets"] = {name: {k: _mean_sd([x[name][k] for x in subs]) for k in ("pcc_pooled", "pcc_per_slide")}
                          for name in subs[0]}
    fams = [r["familiarity"] for r in rows if "familiarity" in r]
    if fams:
        out["familiarity"] = {
            "n_folds": len(fams), "spearman_error": _mean_sd([x["spearman_error"] for x in fams]),
            **{f"{k}_pcc_pooled": _mean_sd([x[k]["pcc_pooled"] for x in fams]) for k in ("familiar_50", "familiar_80", "all")},
            **{f"folds_{k}_above_all": int(sum(x[k]["pcc_pooled"] > x["all"]["pcc_pooled"] for x in fams))
               for k in ("familiar_50", "familiar_80")},
            **{f"folds_{k}_above_all_per_slide": int(sum(x[k]["pcc_per_slide"] > x["all"]["pcc_per_slide"]
                                                         for x in fams)) for k in ("familiar_50", "familiar_80")},
            "share_unfamiliar": _mean_sd([x["unfamiliar"]["share"] for x in fams]),
        }
    return out


def table(results: dict[str, Any]) -> str:
    """Markdown tables: mean ± sd per model, then each metric per fold."""
    s, folds = results["summary"], results["folds"]
    smoothed = any("wins_per_slide_vs_ridge+smooth" in v for v in s.values())
    lines = ["| model | pcc_pooled | pcc_per_slide | mse | per-slide wins vs ridge |"
             + (" vs ridge+smooth |" if smoothed else ""), "|---|---|---|---|---|" + ("---|" if smoothed else "")]
    for model, v in s.items():
        cells = [f"{v[k]['mean']:.4f} ± {v[k]['sd']:.4f}" for k in METRICS]
        extra = f" {v.get('wins_per_slide_vs_ridge+smooth', '–')}/{v['n_folds']} |" if smoothed else ""
        lines.append(f"| {model} | {' | '.join(cells)} | {v['wins_per_slide_vs_ridge']}/{v['n_folds']} |{extra}")
    for metric in METRICS:
        lines += ["", f"| {metric}, held-out patient | " + " | ".join(folds) + " |", "|---|" + "---|" * len(folds)]
        for model in s:
            cells = [f"{f[model][metric]:.4f}" if model in f else "–" for f in folds.values()]
            lines.append(f"| {model} | {' | '.join(cells)} |")
    if any("smoothing" in f for f in folds.values()):
        cells = [f"{f['smoothing']['radius_um']:g} µm, {f['smoothing']['weight']:g}" if "smoothing" in f else "–"
                 for f in folds.values()]
        lines += ["", "| chosen smoothing, held-out patient | " + " | ".join(folds) + " |",
                  "|---|" + "---|" * len(folds), f"| radius, weight | {' | '.join(cells)} |"]
    return "\n".join(lines)


def subset_table(results: dict[str, Any], models=("y1", "ridge", CURRENT_DEFAULT)) -> str:
    """Markdown: mean ± sd over folds of pooled and per-slide PCC on each gene subset, for `models`."""
    s = results["summary"]
    models = [m for m in models if m in s and "subsets" in s[m]]
    if not models:
        return ""
    names = list(s[models[0]]["subsets"])
    head = " | ".join(f"{n} {k}" for n in names for k in ("pooled", "per slide"))
    lines = [f"| model | {head} |", "|---|" + "---|" * (2 * len(names))]
    for m in models:
        cells = [f"{s[m]['subsets'][n][k]['mean']:.4f} ± {s[m]['subsets'][n][k]['sd']:.4f}"
                 for n in names for k in ("pcc_pooled", "pcc_per_slide")]
        lines.append(f"| {m} | {' | '.join(cells)} |")
    return "\n".join(lines)


def familiarity_table(results: dict[str, Any], model: str = CURRENT_DEFAULT) -> str:
    """Markdown, per held-out patient: Spearman of familiarity with the per-spot error, pooled PCC on the most
    familiar 50% / 80% and all spots, the share of unfamiliar spots and their mean error against the others'."""
    folds = {p: f[model]["familiarity"] for p, f in results["folds"].items() if "familiarity" in f.get(model, {})}
    if not folds:
        return ""
    lines = [f"| {model}, held-out patient | spots | Spearman(familiarity, error) | PCC familiar 50% | "
             "PCC familiar 80% | PCC all | unfamiliar share | error unfamiliar / others | sections with the line |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p, x in folds.items():
        u = x["unfamiliar"]
        warned = [s for s, v in x["per_section"].items() if v["slide_line"]]
        lines.append(f"| {p} | {x['all']['n_spots']} | {x['spearman_error']:.3f} | "
                     f"{x['familiar_50']['pcc_pooled']:.4f} | {x['familiar_80']['pcc_pooled']:.4f} | "
                     f"{x['all']['pcc_pooled']:.4f} | {u['share']:.3f} | {u['mse_unfamiliar']:.4f} / "
                     f"{u['mse_others']:.4f} | {', '.join(warned) or '–'} ({len(warned)}/{len(x['per_section'])}) |")
    return "\n".join(lines)
