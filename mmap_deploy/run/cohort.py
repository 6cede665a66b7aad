"""One slide of a batch, and the batch's summary: shared by the local batch and the Ray batch.

`predict_row` is what happens to a manifest row once it is someone's turn:
claim it (see `claims`), predict and write it (`predict.predict_to_file`), and
classify the result as an outcome the driver prints. It never raises for a
slide: a bad slide is `failed` (the others go on), a full or unwritable
output folder is `stop` (the batch stops: every further slide would fail
the same way), a bug is `failed` with its traceback.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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


def predict_row(row: Any, out: Path, bundle: Any, engines: Any, settings: Any, *, manifest_name: str,
                run_id: str, spot_progress: Callable[[int], Any] | None = None) -> SlideOutcome:
    """Claim, predict and write one manifest row; never raises for the slide's own problems."""
    from ..errors import UserError
    from .claims import ClaimHolder, claim_path, try_claim
    from .predict import _summary_line, predict_to_file
    from .storage import OutputStorageError, storage_error

    t0 = time.perf_counter()
    try:
        claim = try_claim(out, run_id)
    except OSError as e:
        err = storage_error(e, out.parent, 4096, f"the claim file {claim_path(out).name}")
        if err is None:
            raise
        return SlideOutcome(row.name, STOP, str(err))
    if isinstance(claim, ClaimHolder):
        return SlideOutcome(row.name, CLAIMED, f"claimed by another run ({claim.describe()}; "
                                               f"{claim_path(out)})")
    run_settings = settings
    if getattr(row, "coords", None) is not None and getattr(settings, "grid", None) is not None:
        # --grid (and --tissue-mask) lay spots for the rows whose coords cell is empty; a row with
        # coords is predicted at its own spots (given both, predict_adata would refuse it)
        run_settings = dataclasses.replace(settings, grid=None, tissue_mask=None)
    with claim:
        try:
            result = predict_to_file(row.slide, row.coords, out, bundle, engines, run_settings, mpp=row.mpp,
                                     library_id=row.name, mpp_origin=f"{manifest_name} mpp column",
                                     spot_progress=spot_progress)
        except OutputStorageError as e:
            return SlideOutcome(row.name, STOP, str(e), seconds=time.perf_counter() - t0)
        except UserError as e:
            return SlideOutcome(row.name, FAILED, str(e), seconds=time.perf_counter() - t0)
        except Exception as e:  # a bug: keep its traceback for the driver to show, finish the other slides
            return SlideOutcome(row.name, FAILED, f"internal error {type(e).__name__}: {e} (traceback above)",
                                traceback=traceback.format_exc(), seconds=time.perf_counter() - t0)
        finally:
            settings.engines_note = run_settings.engines_note  # said once, by the first slide
    return SlideOutcome(row.name, DONE, _summary_line(result), n_spots=result.n_spots, seconds=result.seconds)


@dataclass
class BatchTally:
    """The counts behind a batch's summary line."""

    total: int
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    claimed: list[str] = field(default_factory=list)
    failed: list[tuple[Any, str]] = field(default_factory=list)
    stopped: str = ""
    not_started: int = 0

    def add(self, row: Any, outcome: SlideOutcome) -> None:
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
