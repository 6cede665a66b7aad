"""A batch of slides: the plan, one slide's turn, the finish; and the local loop over them.

`plan_batch` turns the manifest's rows into jobs: the --shard filter, each
slide's output path (`{id}.h5ad` or `{id}.zarr` in the output folder), the
slides already done (`BatchPlan.skip_existing`). `predict_row` is what
happens to a row once it is someone's turn: claim it (see `claims`),
predict and write it (`predict.predict_to_file`), and classify the result as
an outcome. It never raises for a slide: a bad slide is `failed` (the others
go on), a full or unwritable output folder is `stop` (the batch stops: every
further slide would fail the same way), a bug is `failed` with its
traceback. `BatchPlan.finish` says the summary and gives the exit code.

The jobs run here one after the other (`run_batch`), or on Ray workers
(`batch_ray.run_batch_ray`): the same plan, outcomes and finish.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..atomic import output_exists
from ..messages import EXIT_BATCH_FAILED, EXIT_OK, echo
from .manifest import ManifestRow, check_output_dir

if TYPE_CHECKING:  # pragma: no cover
    from ..model.bundle import Bundle
    from ..options import Settings
    from .predict import RunState

DONE, CLAIMED, FAILED, STOP = "done", "claimed", "failed", "stop"


@dataclass
class SlideOutcome:
    """What became of one slide (plain data: it travels back from a Ray worker)."""

    name: str
    status: str  # DONE | CLAIMED | FAILED | STOP
    message: str  # the summary line, the error, or who holds the claim
    traceback: str = ""  # an internal error's traceback
    n_spots: int = 0
    seconds: float = 0.0


def row_settings(row: ManifestRow, settings: Settings) -> Settings:
    """The settings one row runs with: its option columns (mpp, id); a row with coords drops the grid,
    which is for the rows whose coords cell is empty."""
    values = dict(row.values)
    if row.coords is not None:
        values.update(grid=None, tissue_mask=None)
    return settings.with_values(**values)


def predict_row(row: ManifestRow, out: Path, bundle: Bundle, state: RunState, settings: Settings, *,
                manifest_name: str, run_id: str, spot_progress: Callable[[int], Any] | None = None) -> SlideOutcome:
    """Claim, predict and write one manifest row; never raises for the slide's own problems."""
    from ..errors import UserError
    from ..options import check_options
    from .claims import ClaimHolder, claim_path, try_claim
    from .predict import predict_to_file
    from .storage import OutputStorageError, storage_error

    t0 = time.perf_counter()
    try:
        claim = try_claim(out, run_id)
    except OSError as e:
        err = storage_error(e, out.parent, 4096, f"the claim file {claim_path(out).name}")
        if err is None:
            raise
        return SlideOutcome(row.name, STOP, str(err))
    except OutputStorageError as e:  # a bucket that cannot be written at all: every slide would fail so
        return SlideOutcome(row.name, STOP, str(e))
    except UserError as e:  # a bucket's one-line failure for this slide's claim
        return SlideOutcome(row.name, FAILED, str(e))
    if isinstance(claim, ClaimHolder):
        return SlideOutcome(row.name, CLAIMED, f"claimed by another run ({claim.describe()}; "
                                               f"{claim_path(out)})")
    with claim:
        try:
            check_options(settings, batch=True, has_coords=row.coords is not None, coords=row.coords,
                          slide=row.slide)
            result = predict_to_file(row.slide, row.coords, out, bundle, state, row_settings(row, settings),
                                     mpp_origin=f"{manifest_name} mpp column", spot_progress=spot_progress)
        except OutputStorageError as e:
            return SlideOutcome(row.name, STOP, str(e), seconds=time.perf_counter() - t0)
        except UserError as e:
            return SlideOutcome(row.name, FAILED, str(e), seconds=time.perf_counter() - t0)
        except Exception as e:  # a bug: keep its traceback for the driver to show, finish the other slides
            return SlideOutcome(row.name, FAILED, f"internal error {type(e).__name__}: {e} (traceback above)",
                                traceback=traceback.format_exc(), seconds=time.perf_counter() - t0)
    return SlideOutcome(row.name, DONE, result.summary_line(), n_spots=result.n_spots, seconds=result.seconds)


@dataclass
class BatchTally:
    """The counts behind a batch's summary line."""

    total: int
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    claimed: list[str] = field(default_factory=list)
    failed: list[tuple[ManifestRow, str]] = field(default_factory=list)
    stopped: str = ""
    not_started: int = 0

    def add(self, row: ManifestRow, outcome: SlideOutcome) -> None:
        if outcome.status == DONE:
            self.done.append(row.name)
        elif outcome.status == CLAIMED:
            self.claimed.append(row.name)
        elif outcome.status == STOP:
            self.failed.append((row, outcome.message))
            self.stopped = self.stopped or outcome.message
        else:
            self.failed.append((row, outcome.message))

    def summary_lines(self, manifest: Path, shard_txt: str = "") -> list[str]:
        """The summary at the end of a batch, one line and one per failed slide."""
        line = (f"batch{shard_txt}: {len(self.done)} done, {len(self.skipped)} skipped (already done), "
                f"{len(self.failed)} failed of {self.total} slide(s) in {manifest}")
        if self.claimed:
            line += f"; {len(self.claimed)} left to another run that holds them ({', '.join(self.claimed)})"
        lines = [line]
        if self.stopped:
            lines.append(f"batch stopped at the first output-folder failure: {self.not_started} slide(s) not "
                         "started; make room and rerun the same command (finished slides are skipped)")
        lines += [f"  failed: {row.name} ({manifest} line {row.line}): {msg}" for row, msg in self.failed]
        return lines


@dataclass
class BatchJob:
    """One slide of a batch: its place in the (shard's) rows, its row, its output; the try it is on."""

    k: int
    total: int
    row: ManifestRow
    out: Path
    attempt: int = 0

    @property
    def prefix(self) -> str:
        """What the slide's lines start with: `[k/total] id`."""
        return f"[{self.k}/{self.total}] {self.row.name}"


@dataclass
class BatchPlan:
    """The jobs of one batch, its tally, and the summary and exit code at its end."""

    manifest: Path
    out_dir: Path
    shard: tuple[int, int] | None
    overwrite: bool
    jobs: list[BatchJob]
    tally: BatchTally

    def skip_existing(self, job: BatchJob, say: Callable[[str], None] = echo) -> bool:
        """True (said, and counted) when the job's output is already there and --overwrite is not given."""
        if not self.overwrite and output_exists(job.out):
            self.tally.skipped.append(job.row.name)
            say(f"{job.prefix}: skipped, {job.out} exists (pass --overwrite to redo it)")
            return True
        return False

    def record(self, job: BatchJob, outcome: SlideOutcome, say: Callable[[str], None] = echo) -> None:
        """Count the job's outcome and say its line."""
        self.tally.add(job.row, outcome)
        echo_outcome(job.prefix, outcome, echo=say)

    def finish(self) -> int:
        """Say the summary; the batch's exit code."""
        shard_txt = f" (shard {self.shard[0]}/{self.shard[1]})" if self.shard else ""
        for line in self.tally.summary_lines(self.manifest, shard_txt):
            echo(line)
        return EXIT_BATCH_FAILED if self.tally.failed else EXIT_OK


def plan_batch(manifest: Path, rows: list[ManifestRow], out_dir: Path, settings: Settings, *,
               absolute: bool = False) -> BatchPlan:
    """The jobs for the manifest's `rows` (or one shard of them); `absolute`: every path made absolute.

    Ray's workers run elsewhere, so no path they are given may depend on the driver's cwd.
    """
    check_output_dir(out_dir)
    shard = settings.shard
    if shard is not None:
        i, n = shard
        rows = [r for k, r in enumerate(rows) if k % n == i]
    if absolute:
        out_dir = out_dir.absolute()
        rows = [dataclasses.replace(r, slide=r.slide.absolute(),
                                    coords=None if r.coords is None else r.coords.absolute()) for r in rows]
    jobs = [BatchJob(k, len(rows), row, out_dir / f"{row.name}.{settings.output_format or 'h5ad'}")
            for k, row in enumerate(rows, start=1)]
    return BatchPlan(manifest, out_dir, shard, settings.overwrite, jobs, BatchTally(len(rows)))


def run_batch(manifest: Path, rows: list[ManifestRow], out_dir: Path, bundle: Bundle, state: RunState,
              settings: Settings) -> int:
    """Every slide of the manifest's `rows` (or of one shard), one after the other; returns the exit code."""
    from .claims import new_run_id
    from .storage import make_output_dir

    plan = plan_batch(manifest, rows, out_dir, settings)
    make_output_dir(plan.out_dir)
    run_id = new_run_id()
    for job in plan.jobs:
        if plan.skip_existing(job):
            continue
        outcome = predict_row(job.row, job.out, bundle, state, settings, manifest_name=manifest.name, run_id=run_id)
        plan.record(job, outcome)
        if outcome.status == STOP:
            plan.tally.not_started = job.total - job.k
            break
    return plan.finish()


def echo_outcome(prefix: str, outcome: SlideOutcome, echo: Callable[[str], None] = echo) -> None:
    """One slide's line of a batch (a bug's traceback first)."""
    if outcome.traceback:
        echo(f"{prefix}: internal error; traceback follows")
        echo(outcome.traceback.rstrip())
    elif outcome.status in (FAILED, STOP):
        echo(f"{prefix}: error: {outcome.message}")
    else:
        echo(f"{prefix}: {'skipped, ' if outcome.status == CLAIMED else ''}{outcome.message}")
