"""Phase 1: the multi-magnification encoder, trained on spot patches and their expression.

Patches are read once per section through the runtime's slide reader and kept
in memory as uint8; every epoch draws random sub-crop positions and the
method's augmentations for each spot from a generator seeded by
(seed, epoch, spot), so a resumed run repeats exactly what an uninterrupted
one would have done.

Checkpoints: `last.pt` after every epoch (model, optimiser, schedule, history:
what `--resume` reads) and `checkpoint.pt`, the epoch with the best validation
pooled PCC (the last epoch without validation sections). Both load with
`mmap_train.model.load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmap_deploy import messages
from mmap_deploy.errors import UserError
from mmap_deploy.model.preprocess import ViewSpec, make_views, normalise

from .config import MMAPConfig
from .datasets import training_views
from .distributed import data_parallel
from .history import write_training_log
from .metrics import evaluate
from .model import MMAP, alignment_loss, read_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Phase1Recipe:
    """Training settings of phase 1 (defaults: the method's, for UNI with LoRA)."""

    epochs: int = 50
    batch_size: int = 16
    accumulate: int = 1  # micro-batches per optimiser step
    lr: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.0
    mag_start_epoch: int = 5  # the alignment loss joins after this many epochs (reference)
    augment: bool = True
    seed: int = 42
    max_steps: int = 0  # stop after this many optimiser steps (smoke runs); 0 = no limit
    threads: int = 0  # torch CPU threads; 0 = torch's default
    device: str = "auto"  # "auto": cuda when available
    amp: bool = True  # bfloat16 autocast on GPU (ignored on CPU)
    loader_threads: int = 1  # threads making the next batches' views while one trains; 0 = in line

    def validate(self) -> None:
        """UserError for a `device` torch cannot parse (it would fail only once the data is read)."""
        if self.device == "auto":
            return
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError, TypeError):
            raise UserError(f"device must be auto or a torch device: cpu, cuda, cuda:N, mps, ...; "
                            f"got {self.device!r}") from None


@dataclass
class SpotSet:
    """Spots of one or more sections with their patches in memory."""

    patches: np.ndarray  # (N, P, P, 3) uint8
    targets: np.ndarray  # (N, G) float32
    sections: np.ndarray  # (N,) section name per spot
    spot_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.patches)

    @staticmethod
    def concat(sets: list["SpotSet"]) -> "SpotSet":
        return SpotSet(np.concatenate([s.patches for s in sets]), np.concatenate([s.targets for s in sets]),
                       np.concatenate([s.sections for s in sets]), [i for s in sets for i in s.spot_ids])


def load_spot_set(sections: list, genes: list[str], spec: ViewSpec) -> SpotSet:
    """Read targets, positions (joined by spot id) and patches of every section."""
    from .datasets import join_spots, load_targets, read_section_patches

    sets = []
    with messages.progress(len(sections), "reading patches", unit="section") as bar:
        for sec in sections:
            table = join_spots(sec, load_targets(sec, genes))
            patches = read_section_patches(sec, table.xy, spec)
            sets.append(SpotSet(patches, table.targets, np.array([sec.name] * len(patches)), table.spot_ids))
            bar.update(1)
    return SpotSet.concat(sets)


def _spot_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def batch_views(spots: SpotSet, rows: np.ndarray, spec: ViewSpec, *, epoch: int, seed: int,
                augment: bool) -> torch.Tensor:
    """Normalised views (B, V, 3, S, S) of the spots `rows`: random crops when training."""
    if epoch < 0:  # evaluation: deterministic centre crops
        views = np.stack([make_views(spots.patches[i], spec) for i in rows])
    else:
        views = np.stack([training_views(spots.patches[i], spec, _spot_rng(seed, epoch, int(i)), augment)
                          for i in rows])
    return torch.from_numpy(normalise(views, spec))


def prefetched(make: Callable[[Any], Any], items: list, threads: int) -> Iterator[Any]:
    """`make(item)` for each item in order, computed up to `threads + 1` items ahead in threads.

    The views of the next batches are numpy work that releases the GIL, so it
    overlaps with the model step. Results do not depend on the thread count.
    """
    if threads <= 0:
        for item in items:
            yield make(item)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending = deque(pool.submit(make, item) for item in items[: threads + 1])
        nxt = threads + 1
        while pending:
            result = pending.popleft().result()
            if nxt < len(items):
                pending.append(pool.submit(make, items[nxt]))
                nxt += 1
            yield result


def trainable_parameters(model: MMAP) -> list[torch.nn.Parameter]:
    """LoRA adapters + attention + heads with LoRA; everything when LoRA is off (a backbone trained in full)."""
    if model.config.lora_last_blocks == 0:
        for p in model.parameters():
            p.requires_grad_(True)
    for p in model.fusion.parameters():  # phase 2's head is not trained here
        p.requires_grad_(False)
    return [p for p in model.encoder.parameters() if p.requires_grad]


def _device(recipe: Phase1Recipe, local_rank: int = 0, world: int = 1) -> torch.device:
    """The recipe's device; under torchrun, each process's own GPU (its LOCAL_RANK)."""
    name = recipe.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world > 1:
        name = f"cuda:{local_rank}"
    return torch.device(name)


@torch.no_grad()
def predict_spots(model: MMAP, spots: SpotSet, spec: ViewSpec, batch_size: int = 64,
                  device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(f, y1) for every spot from centre crops."""
    device = device or next(model.parameters()).device
    model.eval()
    fs, ys = [], []
    for i in range(0, len(spots), batch_size):
        x = batch_views(spots, np.arange(i, min(i + batch_size, len(spots))), spec, epoch=-1, seed=0, augment=False)
        f, y1, _ = model.encoder(x.to(device))
        fs.append(f.float().cpu().numpy())
        ys.append(y1.float().cpu().numpy())
    return np.concatenate(fs), np.concatenate(ys)


def train_phase1(cfg: MMAPConfig, train: SpotSet, val: SpotSet | None, out_dir: str | Path,
                 recipe: Phase1Recipe | None = None, *, backbone_weights: str | None = None,
                 resume: bool = False, progress: bool = True, extra: dict[str, Any] | None = None,
                 stop_after_epoch: int = 0) -> dict[str, Any]:
    """Train the phase-1 encoder; write checkpoints and the per-epoch log into `out_dir`.

    `resume=True` continues from `out_dir/last.pt` (same data and recipe).
    `stop_after_epoch` ends the run after that epoch as an interruption would
    (the schedule still spans `recipe.epochs`; `resume` picks it up).
    Returns {"checkpoint", "history", "best"}.
    """
    from threadpoolctl import threadpool_limits

    # views are many small numpy matmuls: BLAS threads only fight torch's for the cores
    recipe = recipe or Phase1Recipe()
    recipe.validate()
    dp = data_parallel(recipe.device)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            return _train_phase1(cfg, train, val, out_dir, recipe, dp, backbone_weights=backbone_weights,
                                 resume=resume, progress=progress, extra=extra, stop_after_epoch=stop_after_epoch)
    finally:
        dp.close()


@dataclass
class _Run:
    """What a phase-1 run carries from one epoch to the next."""

    model: MMAP
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    global_batch: int  # spots per micro-batch over all processes
    total: int  # optimiser steps the schedule spans
    encoder: torch.nn.Module | None = None  # model.encoder, under DDP when distributed
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    step: int = 0
    best: float = -math.inf


def _train_phase1(cfg, train, val, out_dir, recipe, dp, *, backbone_weights, resume, progress, extra,
                  stop_after_epoch):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.threads > 0:
        torch.set_num_threads(recipe.threads)
    if len(train) == 0:
        raise UserError("no training spots (check the sections and their counts)")
    run = _start(cfg, train, recipe, dp, backbone_weights)
    last_path, best_path = out_dir / "last.pt", out_dir / "checkpoint.pt"
    if resume:
        _resume(run, last_path)
    run.encoder = dp.wrap(run.model.encoder, run.device)  # after loading: DDP starts from rank 0's weights
    meta = _meta(train, val, recipe, dp, run.global_batch, extra)
    bar = messages.progress(run.total, "phase 1", progress and dp.main, unit="step", initial=run.step)
    t0 = time.perf_counter()
    for epoch in range(run.start_epoch, recipe.epochs):
        if (recipe.max_steps and run.step >= recipe.max_steps) or (stop_after_epoch and epoch >= stop_after_epoch):
            break
        losses, mag_on = _train_epoch(run, cfg, train, recipe, dp, epoch, bar)
        row: dict[str, Any] = {"epoch": epoch + 1, "step": run.step, "train_loss": float(np.mean(losses)),
                               "lr": run.opt.param_groups[0]["lr"], "mag_loss_on": mag_on,
                               "seconds": round(time.perf_counter() - t0, 1)}
        if not dp.main:  # rank 0 validates and writes; the others go on to the next epoch
            run.history.append(row)
            continue
        _end_epoch(run, cfg, train, val, epoch, row, out_dir, meta)
    bar.close()
    if dp.main and not best_path.is_file():  # stopped before the first epoch ended (max_steps)
        save_checkpoint(best_path, run.model, epoch=0, encoder_trained=True, **meta)
    return {"checkpoint": str(best_path), "history": run.history, "best": run.best}


def _start(cfg: MMAPConfig, train: SpotSet, recipe: Phase1Recipe, dp, backbone_weights: str | None) -> _Run:
    """The model (seeded), its optimiser and the cosine schedule over the whole run."""
    device = _device(recipe, dp.local_rank, dp.world)
    torch.manual_seed(recipe.seed)
    model = MMAP(cfg, backbone_weights or cfg.backbone_weights or None).to(device)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=recipe.lr, weight_decay=recipe.weight_decay)
    # under torchrun a micro-batch is batch_size spots per process: batch_size * world in all
    global_batch = recipe.batch_size * dp.world
    steps_per_epoch = math.ceil(len(train) / (global_batch * recipe.accumulate))
    total = recipe.epochs * steps_per_epoch
    if recipe.max_steps:
        total = min(total, recipe.max_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total), eta_min=recipe.min_lr)
    return _Run(model, opt, sched, device, global_batch, total)


def _resume(run: _Run, last_path: Path) -> None:
    """Model, optimiser, schedule, torch's RNG and history as `last_path` left them."""
    if not last_path.is_file():
        raise UserError(f"{last_path}: nothing to resume; run without --resume first")
    state = read_checkpoint(last_path, map_location=run.device)
    run.model.load_state_dict(state["state_dict"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    run.history, run.start_epoch, run.step = state["history"], state["epoch"], state["step"]
    run.best = state.get("best_score", -math.inf)


def _meta(train: SpotSet, val: SpotSet | None, recipe: Phase1Recipe, dp, global_batch: int,
          extra: dict[str, Any] | None) -> dict[str, Any]:
    """What every checkpoint of the run records besides the weights."""
    meta = {"phase": 1, "recipe": asdict(recipe),
            "training_data": {"train_sections": sorted(set(train.sections.tolist())),
                              "val_sections": sorted(set(val.sections.tolist())) if val is not None else [],
                              "n_train_spots": len(train), "n_val_spots": len(val) if val is not None else 0},
            **(extra or {})}
    if dp.world > 1:
        meta["data_parallel"] = {"processes": dp.world, "global_batch": global_batch}
    return meta


def _train_epoch(run: _Run, cfg: MMAPConfig, train: SpotSet, recipe: Phase1Recipe, dp, epoch: int,
                 bar) -> tuple[list[float], bool]:
    """One epoch's optimiser steps (until `max_steps`); returns each step's loss and whether L_mag was on."""
    use_amp = recipe.amp and run.device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    run.model.train()
    order = np.random.default_rng([recipe.seed, epoch]).permutation(len(train))
    micro = [order[i:i + run.global_batch] for i in range(0, len(order), run.global_batch)]
    # a process whose share of a (last, short) batch is empty still steps with DDP: one spot, weight 0
    mine = [dp.share(rows) if len(dp.share(rows)) else rows[:1] for rows in micro]
    views = prefetched(lambda rows: batch_views(train, rows, cfg.view_spec, epoch=epoch, seed=recipe.seed,
                                                augment=recipe.augment), mine, recipe.loader_threads)
    losses, mag_on = [], epoch >= recipe.mag_start_epoch and cfg.mag_weight > 0
    for j in range(0, len(micro), recipe.accumulate):
        group = micro[j:j + recipe.accumulate]
        run.opt.zero_grad(set_to_none=True)
        n_group = sum(len(g) for g in group)
        total_loss = 0.0
        for k, rows in enumerate(group):
            x = next(views).to(run.device)
            own = len(dp.share(rows))
            t = torch.from_numpy(train.targets[mine[j + k]]).to(run.device)
            # DDP averages over processes: weighting by share * world makes the step the global batch's
            # (the contrastive term's negatives are the process's own share of the batch)
            with dp.no_sync(run.encoder, sync=k == len(group) - 1):
                with autocast():
                    f, y1, cls = run.encoder(x)
                    loss = torch.mean((y1.float() - t) ** 2)
                    if mag_on:
                        loss = loss + cfg.mag_weight * alignment_loss(cfg, f.float(), cls[:, cfg.ref_view].float())
                (loss * (own * dp.world / n_group)).backward()
            total_loss += loss.item() * own / n_group
        total_loss = dp.sum(total_loss, run.device)
        run.opt.step()
        run.sched.step()
        run.step += 1
        losses.append(total_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss:.4f}")
        if recipe.max_steps and run.step >= recipe.max_steps:
            break
    return losses, mag_on


def _end_epoch(run: _Run, cfg: MMAPConfig, train: SpotSet, val: SpotSet | None, epoch: int, row: dict[str, Any],
               out_dir: Path, meta: dict[str, Any]) -> None:
    """Rank 0 after an epoch: validate, keep the best checkpoint, write `last.pt` and the log."""
    score = float(epoch)
    if val is not None and len(val):
        _, y1v = predict_spots(run.model, val, cfg.view_spec, device=run.device)
        m = evaluate(y1v, val.targets, val.sections)
        row.update({f"val_{k}": m[k] for k in ("pcc_pooled", "pcc_per_slide", "mse", "mae")})
        b = val.targets - train.targets.mean(axis=0, keepdims=True)  # the training mean as a baseline
        row.update({"val_train_mean_mse": float((b ** 2).mean()), "val_train_mean_mae": float(np.abs(b).mean())})
        score = m["pcc_pooled"] if np.isfinite(m["pcc_pooled"]) else -math.inf
    run.history.append(row)
    if score > run.best:
        run.best = score
        row["kept"] = True
        save_checkpoint(out_dir / "checkpoint.pt", run.model, epoch=epoch + 1, encoder_trained=True,
                        metrics={k: v for k, v in row.items() if k.startswith("val_")}, **meta)
    save_checkpoint(out_dir / "last.pt", run.model, epoch=epoch + 1, step=run.step, history=run.history,
                    best_score=run.best, optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(),
                    torch_rng=torch.get_rng_state(), encoder_trained=True, **meta)
    write_training_log(out_dir, run.history)
