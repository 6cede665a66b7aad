"""Phase 2: prototype banks from a frozen phase-1 feature cache, and the masked fusion head.

Per section: k-means on the section's `f` with the runtime's numpy k-means and
K rule (`mmap_deploy.model.prototypes`), each spot's top-L centroids by cosine as its
bank, padded to the rule's longest bank and masked. The fusion head is trained
on the training sections; validation is by section, and the checkpoint with the
best validation score is kept.

The training spots' embeddings are summarised for the runtime's familiarity
(`mmap_deploy.model.familiarity`): `OUT/familiarity.npz`, recorded with its
sha256 in the checkpoint, which `mmap-export` puts into the bundle.

Trained from a cache alone (e.g. the published features), a checkpoint holds
only the fusion weights and `encoder_trained: False`: its encoder is not
meaningful. Trained on top of a phase-1 checkpoint (`init`), it holds the whole
model with that encoder (`encoder_trained: True`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmap_deploy import messages
from mmap_deploy.atomic import atomic_path
from mmap_deploy.errors import UserError
from mmap_deploy.model.familiarity import SUMMARY_NAME, fit_summary, write_summary
from mmap_deploy.model.prototypes import PrototypeRule, slide_prototypes

from .backbones import check_choice
from .config import MMAPConfig
from .datasets import Targets, patient_of
from .features import SectionFeatures
from .history import write_training_log
from .metrics import by_group, evaluate
from .model import MMAP, FusionHead, alignment_loss, load_checkpoint, plain, read_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

# Validation metrics that can pick the kept checkpoint (keep="best"): higher is better.
SELECT_METRICS = ("pcc_pooled", "pcc_per_slide")
KEEP = ("best", "last")


@dataclass
class Phase2Recipe:
    """The default phase-2 training recipe.

    Chosen by leave-one-patient-out cross-validation (`mmap-train cv`, see
    benchmarks/RESULTS_training.md: candidate `e10-L32-paper-avg5`), with the
    bank length L = 32 (the CLI's `--l-fixed` default) and the paper's head
    averaging (the CLI's `--head-average` default): a fixed 10 epochs of 64
    spots a step, and the head kept as the mean of its weights after each of
    the last 5 epochs.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    seed: int = 42
    select: str = "pcc_pooled"  # validation metric that picks the kept checkpoint (keep="best"): SELECT_METRICS
    keep: str = "last"  # "best": the epoch best on validation; "last": the end of training (validation only logged)
    average_last: int = 5  # >0: the kept head averages the weights of the last N epochs (at most all; keep="last")
    threads: int = 0  # torch CPU threads; 0 = torch's default

    def validate(self) -> None:
        check_choice("keep", self.keep, KEEP)
        check_choice("select", self.select, SELECT_METRICS)
        if self.average_last < 0:
            raise UserError(f"average_last must be 0 (no averaging) or more, got {self.average_last}")
        if self.average_last and self.keep != "last":
            raise UserError("weight averaging (average_last) keeps the end of training: use keep='last'")


@dataclass
class PreparedSection:
    """One section ready for the fusion head: features, targets and its prototype bank."""

    name: str
    spot_ids: list[str]
    f: np.ndarray  # (n, D)
    y1: np.ndarray  # (n, G)
    target: np.ndarray  # (n, G)
    centroids: np.ndarray  # (K, D)
    bank_idx: np.ndarray  # (n, L) indices into centroids
    k: int
    l: int


def prepare_section(feats: SectionFeatures, targets: Targets, rule: PrototypeRule) -> PreparedSection | None:
    """K-means and banks on all the section's cached spots; keep the spots that have targets.

    Returns None (and logs why) for a section without spots.
    """
    if len(feats.spot_ids) == 0:
        log.warning("section %s: no spots in the feature cache; left out", feats.section)
        return None
    # the runtime's prototype step (and seed): banks at training time are the banks at run time
    protos = slide_prototypes(feats.f, rule)
    idx = protos.bank_indices(feats.f)
    index = {s: i for i, s in enumerate(targets.spot_ids)}
    keep = np.array([s in index for s in feats.spot_ids])
    if not keep.any():
        log.warning("section %s: none of its cached spots has counts; left out", feats.section)
        return None
    if not keep.all():
        log.info("section %s: %d cached spots have no counts; they shape the prototypes but are not scored",
                 feats.section, int((~keep).sum()))
    rows = np.array([index[s] for s, k_ in zip(feats.spot_ids, keep) if k_], dtype=np.int64)
    return PreparedSection(feats.section, [s for s, k_ in zip(feats.spot_ids, keep) if k_],
                           feats.f[keep], feats.y1[keep], targets.values[rows], protos.centroids, idx[keep],
                           protos.k, protos.l)


class BankedSpots:
    """Spots of several sections as tensors; banks gathered per batch from all sections' centroids."""

    def __init__(self, sections: list[PreparedSection], pad_to: int):
        self.sections = sections
        self.names = np.concatenate([[s.name] * len(s.f) for s in sections])
        self.f = torch.from_numpy(np.concatenate([s.f for s in sections]))
        self.y1 = torch.from_numpy(np.concatenate([s.y1 for s in sections]))
        self.target = torch.from_numpy(np.concatenate([s.target for s in sections]))
        dim = self.f.shape[1]
        # row 0 is the zero padding entry; section centroids follow
        cents = [np.zeros((1, dim), np.float32)] + [s.centroids for s in sections]
        self.centroids = torch.from_numpy(np.concatenate(cents))
        idx = np.zeros((len(self.f), pad_to), dtype=np.int64)
        mask = np.zeros((len(self.f), pad_to), dtype=bool)
        row, base = 0, 1
        for s in sections:
            n = len(s.f)
            idx[row:row + n, :s.l] = s.bank_idx + base
            mask[row:row + n, :s.l] = True
            row += n
            base += len(s.centroids)
        self.bank_idx = torch.from_numpy(idx)
        self.mask = torch.from_numpy(mask)

    def __len__(self) -> int:
        return len(self.f)

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.f[rows], self.centroids[self.bank_idx[rows]], self.mask[rows], self.y1[rows], self.target[rows])


class NeighbourBankedSpots(BankedSpots):
    """BankedSpots whose banks end with one more slot: the mean `f` of the spot's neighbours within
    `radius_um` (masked for a spot without any), so the fusion head attends over its neighbourhood
    as over one more prototype. `xy_um`: each section's spot positions, in the section's spot order.
    """

    def __init__(self, sections: list[PreparedSection], pad_to: int, xy_um: list[np.ndarray], radius_um: float):
        from mmap_deploy.model.neighbours import Neighbours

        super().__init__(sections, pad_to)
        means, has = [], []
        for s, xy in zip(sections, xy_um):
            nb = Neighbours(xy, radius_um)
            ok = nb.counts > 0
            m = np.zeros_like(s.f)
            m[ok] = (nb.sums(s.f)[ok] / nb.counts[ok, None]).astype(np.float32)
            means.append(m)
            has.append(ok)
        base = len(self.centroids)
        self.centroids = torch.cat([self.centroids, torch.from_numpy(np.concatenate(means))])
        slot = torch.arange(base, base + len(self.f), dtype=torch.int64)[:, None]
        self.bank_idx = torch.cat([self.bank_idx, slot], dim=1)
        self.mask = torch.cat([self.mask, torch.from_numpy(np.concatenate(has))[:, None]], dim=1)


def prepare(feats: dict[str, SectionFeatures], targets: dict[str, Targets], names: list[str],
            rule: PrototypeRule) -> list[PreparedSection]:
    out = []
    for n in names:
        p = prepare_section(feats[n], targets[n], rule)
        if p is not None:
            out.append(p)
    return out


def config_for_cache(genes: list[str], backbone: str, base: MMAPConfig | None = None, **overrides: Any) -> MMAPConfig:
    """A model config for a feature cache made with `backbone` (`features.cache_backbone`) and the target `genes`.

    `base`: the config of the phase-1 model phase 2 starts from (`--init`),
    whose other settings are kept; `train_phase2` then checks that the cache
    and genes agree with it.
    """
    if base is None:
        cfg = MMAPConfig(genes=list(genes), backbone=backbone, **overrides)
    else:
        cfg = replace(base, genes=list(genes), backbone=backbone, **overrides)
    cfg.validate()
    return cfg


# What phase 2 cannot change in the phase-1 model it starts from (`init`).
ENCODER_FIELDS = ("backbone", "genes", "view_spec", "shared_encoder", "query_view")


def _encoder_differences(cfg: MMAPConfig, init: MMAPConfig) -> list[str]:
    out = []
    for k in ENCODER_FIELDS:
        new, old = getattr(cfg, k), getattr(init, k)
        if new == old:
            continue
        if k == "genes":
            first = next((i for i, (a, b) in enumerate(zip(new, old)) if a != b), min(len(new), len(old)))
            out.append(f"genes ({len(new)} here, {len(old)} in the checkpoint; first difference at gene {first + 1})")
        elif k == "backbone":
            out.append(f"backbone ({new} here, the feature cache's; {old} in the checkpoint)")
        else:
            out.append(f"{k} ({new} here, {old} in the checkpoint)")
    return out


@torch.no_grad()
def predict(fusion: FusionHead, data: BankedSpots, batch_size: int = 256) -> np.ndarray:
    fusion.eval()
    out = []
    for i in range(0, len(data), batch_size):
        rows = torch.arange(i, min(i + batch_size, len(data)))
        # the training fast path: keys/values once per centroid, not once per (spot, bank slot)
        out.append(fusion.forward_shared(data.f[rows], data.centroids, data.bank_idx[rows], data.mask[rows],
                                         data.y1[rows])[0].numpy())
    return np.concatenate(out) if out else np.zeros((0, data.y1.shape[1]), np.float32)


def fit_fusion(cfg: MMAPConfig, fusion: FusionHead, train_data: BankedSpots, val_data: BankedSpots | None,
               recipe: Phase2Recipe, max_steps: int = 0, progress: bool = True
               ) -> tuple[list[dict[str, Any]], dict[str, Any] | None, int]:
    """Train `fusion` in place on `train_data`; leave it holding the kept weights.

    keep="best": the epoch with the best validation score (the last epoch
    without validation). keep="last": the last epoch, or with `average_last`
    the mean of the weights after each of the last N epochs (torch's
    `AveragedModel`, equal weights: one head, one graph); validation is then
    only logged, never used to choose.
    Returns (history, validation metrics of the kept weights or None, kept epoch).
    """
    from torch.optim.swa_utils import AveragedModel

    recipe.validate()
    opt = torch.optim.AdamW(fusion.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(train_data) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch if not max_steps else min(max_steps, recipe.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total), eta_min=recipe.min_lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    history: list[dict[str, Any]] = []
    best_score, best_state, best_metrics, best_epoch, step = -math.inf, None, None, 0, 0
    # the default average is the equal mean of every update: one update after each of the last N epochs
    averaged = AveragedModel(fusion) if recipe.keep == "last" and recipe.average_last else None
    first_averaged = recipe.epochs - min(recipe.average_last, recipe.epochs)  # epochs before the averaged ones
    t0 = time.perf_counter()
    bar = messages.progress(total, "phase 2", progress, unit="step")
    for epoch in range(recipe.epochs):
        fusion.train()
        perm = torch.randperm(len(train_data), generator=gen)
        losses = []
        for i in range(0, len(perm), recipe.batch_size):
            rows = perm[i:i + recipe.batch_size]
            f, y1, t = train_data.f[rows], train_data.y1[rows], train_data.target[rows]
            y, h = fusion.forward_shared(f, train_data.centroids, train_data.bank_idx[rows], train_data.mask[rows], y1)
            mse = torch.mean((y - t) ** 2)
            loss = mse + cfg.mag_weight * alignment_loss(cfg, f, h) if cfg.mag_weight > 0 else mse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if max_steps and step >= max_steps:
                break
        last = bool(max_steps and step >= max_steps) or epoch + 1 == recipe.epochs
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
                               "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2)}
        m = None
        if val_data is not None:
            m = evaluate(predict(fusion, val_data), val_data.target.numpy(), val_data.names)
            row.update({f"val_{k}": m[k] for k in ("pcc_pooled", "pcc_per_slide", "mse", "mae")})
        history.append(row)
        if recipe.keep == "last":
            if averaged is not None and epoch >= first_averaged:
                averaged.update_parameters(fusion)
            if last:
                best_metrics, best_epoch = m, epoch + 1
                row["kept"] = True
        else:
            score = m[recipe.select] if m is not None else float(epoch)
            if not np.isfinite(score):  # e.g. every gene constant on validation: never "best", never kept
                score = -np.inf
            if best_state is None or score > best_score:
                best_score, best_metrics, best_epoch = score, m, epoch + 1
                best_state = {k: v.detach().clone() for k, v in fusion.state_dict().items()}
                row["kept"] = True
        if last:
            break
    bar.close()
    if recipe.keep == "best":
        fusion.load_state_dict(best_state)
    elif averaged is not None and averaged.n_averaged > 0:  # max_steps may end training before the last N epochs
        fusion.load_state_dict(averaged.module.state_dict())
        history[-1]["averaged_epochs"] = int(averaged.n_averaged)
        if val_data is not None:
            best_metrics = evaluate(predict(fusion, val_data), val_data.target.numpy(), val_data.names)
            history[-1].update({f"val_averaged_{k}": best_metrics[k]
                                for k in ("pcc_pooled", "pcc_per_slide", "mse", "mae")})
    return history, best_metrics, best_epoch


def write_familiarity(out_dir: str | Path, sections: list[PreparedSection],
                      patients: dict[str, str] | None = None) -> dict[str, Any]:
    """Summarise the training spots' `f` for familiarity into `out_dir/familiarity.npz`; returns the
    checkpoint's record of it (file name, sha256, what it is). `patients`: section -> patient where the
    data names one, else the section's leading letters (the calibration holds out whole patients)."""
    from mmap_deploy.model.bundle import sha256_file

    from .datasets import patient_of

    given = patients or {}
    names = np.concatenate([[s.name] * len(s.f) for s in sections])
    summary = fit_summary(np.concatenate([s.f for s in sections]), names,
                          np.array([given.get(n) or patient_of(n) for n in names]))
    path = write_summary(Path(out_dir) / SUMMARY_NAME, summary)
    keep = ("method", "n_centroids", "n_train_spots", "calibration_held_out", "calibration_units")
    return {"file": SUMMARY_NAME, "sha256": sha256_file(path), **{k: summary.meta[k] for k in keep}}


def train_phase2(cfg: MMAPConfig, feats: dict[str, SectionFeatures], targets: dict[str, Targets],
                 train_names: list[str], val_names: list[str], out_dir: str | Path,
                 recipe: Phase2Recipe | None = None, init: MMAP | None = None,
                 max_steps: int = 0, progress: bool = True, extra: dict[str, Any] | None = None,
                 patients: dict[str, str] | None = None) -> dict[str, Any]:
    """Train the fusion head; write `out_dir/checkpoint.pt` (the kept weights, see `fit_fusion`) and logs.

    `init`: a phase-1 model whose encoder the checkpoint keeps; None trains from
    the cache alone. Without validation sections the last epoch is kept.
    The training spots' familiarity summary goes to `out_dir/familiarity.npz`
    (`write_familiarity`; `patients` as there), recorded in the checkpoint.
    Returns a summary with the history and the validation metrics of the kept weights.
    """
    recipe = recipe or Phase2Recipe()
    recipe.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.threads > 0:
        torch.set_num_threads(recipe.threads)
    rule = cfg.prototype_rule
    train = prepare(feats, targets, train_names, rule)
    val = prepare(feats, targets, val_names, rule)
    if not train:
        raise UserError("no training section has spots with both features and counts")
    dim = train[0].f.shape[1]
    if dim != cfg.embed_dim:
        raise UserError(f"cached features are {dim}-wide but the model's {cfg.backbone} backbone gives "
                        f"{cfg.embed_dim}; use a cache made by this phase-1 model")
    if train[0].y1.shape[1] != cfg.n_genes or train[0].target.shape[1] != cfg.n_genes:
        raise UserError(f"cached y1 has {train[0].y1.shape[1]} genes but the gene list has {cfg.n_genes}")
    train_data = BankedSpots(train, rule.max_bank)
    val_data = BankedSpots(val, rule.max_bank) if val else None

    torch.manual_seed(recipe.seed)
    if init is not None:
        model = init
        changed = _encoder_differences(cfg, init.config)
        if changed:
            raise UserError(f"the phase-1 model (--init) does not match: {'; '.join(changed)}; use the feature "
                            "cache made with that checkpoint and the gene list it was trained with")
        # the checkpoint must describe the head trained here (head averaging, K/L rule)
        model.config = cfg
        model.fusion = FusionHead(cfg, dim)  # fresh head with the recipe's seed
        fusion = model.fusion
    else:
        model = None
        fusion = FusionHead(cfg, dim)
    history, best_metrics, best_epoch = fit_fusion(cfg, fusion, train_data, val_data, recipe, max_steps, progress)
    meta = {
        "phase": 2,
        "epoch": best_epoch,
        "encoder_trained": init is not None,
        "training_data": {"train_sections": [s.name for s in train], "val_sections": [s.name for s in val],
                          "n_train_spots": len(train_data), "n_val_spots": len(val_data) if val_data else 0},
        "metrics": {k: v for k, v in (best_metrics or {}).items() if k != "per_section"},
        "recipe": asdict(recipe),
        "familiarity": write_familiarity(out_dir, train, patients),
        **(extra or {}),
    }
    ckpt_path = out_dir / "checkpoint.pt"
    if model is not None:
        save_checkpoint(ckpt_path, model, **meta)
    else:
        save_fusion_checkpoint(ckpt_path, cfg, fusion, **meta)
    write_training_log(out_dir, history)
    return {"checkpoint": str(ckpt_path), "history": history, "best": best_metrics, "meta": meta}


def save_fusion_checkpoint(path: str | Path, cfg: MMAPConfig, fusion: FusionHead, **extra: Any) -> None:
    """A checkpoint holding only the fusion weights (`encoder_trained: False`), loadable by load_checkpoint."""
    path = Path(path)
    state = {f"fusion.{k}": v for k, v in fusion.state_dict().items()}
    extra = plain({**extra, "encoder_trained": False})
    with atomic_path(path) as tmp:
        torch.save({"config": cfg.to_dict(), "state_dict": state, **extra}, tmp)


def load_fusion(path: str | Path) -> tuple[MMAPConfig, FusionHead, dict[str, Any]]:
    """Only the fusion head of a checkpoint (no backbone is built): what evaluation on a cache needs."""
    ckpt = read_checkpoint(path)
    cfg = MMAPConfig.from_dict(ckpt["config"])
    fusion = FusionHead(cfg, cfg.embed_dim)
    state = {k[len("fusion."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("fusion.")}
    fusion.load_state_dict(state)
    return cfg, fusion.eval(), ckpt


@torch.no_grad()
def predict_section(cfg: MMAPConfig, fusion: FusionHead, feats: SectionFeatures) -> np.ndarray:
    """Predictions for one cached section, banks built exactly as at run time (no padding)."""
    bank, mask = slide_prototypes(feats.f, cfg.prototype_rule).banks(feats.f)
    fusion.eval()
    y, _ = fusion(torch.from_numpy(feats.f), torch.from_numpy(bank), torch.from_numpy(mask),
                  torch.from_numpy(feats.y1))
    return y.numpy()


def evaluate_checkpoint(checkpoint: str | Path, feats: dict[str, SectionFeatures],
                        targets: dict[str, Targets], patients: dict[str, str] | None = None,
                        positions: dict[str, Any] | None = None, smoothing: bool = True,
                        subsets: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Predict every cached section (k-means per section, as at run time) and score against the targets.

    Besides the pooled metrics: `per_section` and `per_patient` (sections
    grouped by `patients`, section -> patient, else by their name's leading
    letters, see `datasets.patient_of`). The checkpoint's neighbour smoothing
    (`MMAPConfig.neighbour_smoothing`) is applied per section, as at run time,
    over the section's cached spots, when `smoothing` and `positions` (section ->
    `spatial.SectionPositions`) are given; `neighbour_smoothing` records what ran.

    Also: the per-gene PCC and the means over the gene `subsets` (`metrics.gene_subsets`), the same for the
    cached `y1` (the phase-1 or published prediction) under `y1`, and, when the checkpoint records a
    training summary (beside it), how the error goes with familiarity (`familiarity`).
    """
    cfg, fusion, ckpt = load_fusion(checkpoint)
    smooth = cfg.neighbour_smoothing if smoothing and positions is not None else None
    if smooth is not None and not smooth.active:
        smooth = None
    preds, tgts, labels, fs, y1s = [], [], [], [], []
    for name, sf in feats.items():
        if len(sf.spot_ids) == 0:
            continue
        if sf.f.shape[1] != cfg.embed_dim or sf.y1.shape[1] != cfg.n_genes:
            raise UserError(f"section {name}: cached f/y1 are {sf.f.shape[1]}/{sf.y1.shape[1]} wide, the checkpoint "
                            f"expects {cfg.embed_dim}/{cfg.n_genes}")
        rows = targets[name].rows_for(sf.spot_ids, f"section {name}")
        pred = predict_section(cfg, fusion, sf)
        if smooth is not None:
            from mmap_deploy.model.neighbours import smooth_predictions

            pred = smooth_predictions(pred, positions[name].xy_for(sf.spot_ids), smooth)
        preds.append(pred)
        tgts.append(targets[name].values[rows])
        labels += [name] * len(sf.spot_ids)
        fs.append(sf.f)
        y1s.append(sf.y1)
    if not preds:
        raise UserError("no section with spots to evaluate")
    pred, target = np.concatenate(preds), np.concatenate(tgts)
    m = evaluate(pred, target, labels)
    given = patients or {}
    m["per_patient"] = by_group(pred, target, labels, lambda s: given.get(s) or patient_of(s))
    m["neighbour_smoothing"] = smooth.to_dict() if smooth is not None else None
    _add_comparisons(m, checkpoint, ckpt, pred, target, np.concatenate(y1s), np.concatenate(fs), labels, subsets)
    return m


def _add_comparisons(m, checkpoint, ckpt, pred, target, y1, f, labels, subsets) -> None:
    """`evaluate_checkpoint`'s per-gene and gene-subset scores, y1's, and the familiarity report."""
    from mmap_deploy.model import familiarity as fam

    from .metrics import familiarity_report, subset_scores

    if subsets is not None:
        m.update(subset_scores(pred, target, labels, subsets))
        y = evaluate(y1, target, labels)
        m["y1"] = {**{k: y[k] for k in ("pcc_pooled", "pcc_per_slide", "mse", "mae")},
                   **subset_scores(y1, target, labels, subsets)}
    record = ckpt.get("familiarity")
    path = Path(checkpoint).parent / str(record["file"]) if record else None
    if path is not None and path.is_file():
        values = fam.read_summary(path, f.shape[1]).familiarity(f)
        m["familiarity"] = familiarity_report(values, pred, target, labels, fam.UNFAMILIAR_BELOW, fam.SLIDE_SHARE)


def load_init(checkpoint: str | Path) -> MMAP:
    """A phase-1 checkpoint as the starting model of phase 2."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = load_checkpoint(checkpoint)
    return model
