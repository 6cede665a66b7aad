"""One slide through the engines: patches -> views -> encoder -> prototypes -> fusion -> neighbours.

Views come from the band reader (`bands.read_spot_views`): a thread pool
that runs ahead of the encoder, decodes each needed slide tile once and keeps
a bounded window of spots in flight, so memory stays bounded however many
spots a slide has. Spots are encoded in its reading order; every result lands
in the spot's own row, so the output keeps the input order. The encoder's
outputs stream into preallocated arrays. The K rule needs every spot of the
slide, so k-means runs once encoding is done; each fusion batch then gathers
its spots' top-L prototype banks (never the whole (N, L, D) bank at once).
A bundle with a neighbour smoothing (`model.neighbours`) then smooths the
predictions in place over each spot's neighbours in µm. A bundle with a
training summary gives each spot its familiarity (`model.familiarity`). Each
spot's image QC (`spot_qc`: blur, ink, blank glass) is scored from its views
on the reader thread that made them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import UserError, first_line
from ..inputs.bands import read_spot_views
from ..inputs.spot_qc import QC_COLUMNS, qc_record, qc_warning, spot_qc
from ..messages import warn
from ..options import spell
from ..model.familiarity import slide_familiarity
from ..model.neighbours import smooth_predictions
from ..model.prototypes import slide_prototypes
from ..outputs.prediction import DroppedSpot, SlidePrediction

if TYPE_CHECKING:  # pragma: no cover
    from ..engines import Engines
    from ..engines.base import Runner
    from ..inputs.coords import Spots
    from ..inputs.slide import SlideReader
    from ..model.bundle import Bundle, Manifest
    from ..model.prototypes import SlidePrototypes

# Slides with at least this many spots run k-means on multi-threaded BLAS.
KMEANS_THREADED_FROM = 20_000
# The training target is log10(1 + normalised count): nothing is below 0, so
# neither is a prediction (values below are clipped and counted).
PREDICTION_FLOOR = 0.0


def _single_threaded_blas():
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _kmeans_blas(n_spots: int):
    """BLAS threads for k-means: one below KMEANS_THREADED_FROM spots, the default above.

    A slide's k-means is a few small GEMMs per iteration; waking BLAS threads
    for them costs more than it saves (figures: benchmarks/RESULTS.md,
    "Figures behind design choices in the code").
    """
    if n_spots < KMEANS_THREADED_FROM:
        return _single_threaded_blas()
    return contextlib.nullcontext()


class _EncoderCalls:
    """Encoder batches, up to `runner.streams` in flight at once, each writing its own rows.

    Batches are made in reading order whatever the number of streams, and each
    result lands in its spots' rows, so the outputs are those of one call at a
    time. `busy` is the wall time during which at least one call ran.
    """

    def __init__(self, runner: Runner, f: np.ndarray, y1: np.ndarray, ok: np.ndarray,
                 progress: Callable[[int], Any] | None):
        self.runner, self.f, self.y1, self.ok, self.progress = runner, f, y1, ok, progress
        self.streams = max(1, runner.streams)
        self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="mmap-encode") if self.streams > 1 else None
        self._pending: deque[tuple[Future, np.ndarray, np.ndarray]] = deque()
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._running, self._since, self.busy = 0, 0.0, 0.0

    def buffer(self, batch_size: int, shape: tuple[int, ...]) -> np.ndarray:
        """An empty batch to fill: one whose call has ended, or a new one."""
        return self._free.pop() if self._free else np.empty((batch_size,) + shape, dtype=np.uint8)

    def _call(self, views: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            if self._running == 0:
                self._since = time.perf_counter()
            self._running += 1
        try:
            return self.runner.infer({"views": views})
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self.busy += time.perf_counter() - self._since

    def submit(self, batch: np.ndarray, rows: list[int]) -> None:
        k = len(rows)
        if self._pool is None:
            self._store(self._call(batch[:k]), np.asarray(rows), batch)
            return
        while len(self._pending) >= self.streams:
            self._collect()
        self._pending.append((self._pool.submit(self._call, batch[:k]), np.asarray(rows), batch))

    def _store(self, out: dict[str, np.ndarray], rows: np.ndarray, batch: np.ndarray) -> None:
        self.f[rows] = out["f"]
        self.y1[rows] = out["y1"]
        self.ok[rows] = True
        self._free.append(batch)
        if self.progress is not None:
            self.progress(len(rows))

    def _collect(self) -> None:
        fut, rows, batch = self._pending.popleft()
        self._store(fut.result(), rows, batch)

    def finish(self) -> None:
        while self._pending:
            self._collect()

    def close(self) -> None:
        for fut, _, _ in self._pending:
            fut.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


class _Timer:
    """Seconds per step of one slide, summed over the step's calls: `with timer("fusion"): ...`."""

    def __init__(self, *steps: str):
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(steps, 0.0)

    @contextlib.contextmanager
    def __call__(self, step: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - t

    def finish(self) -> dict[str, float]:
        """The timings, with the total and the time spent inside and outside the engines (rounded)."""
        s = self.seconds
        s["total"] = time.perf_counter() - self.start
        s["engines"] = s["encoder"] + s["fusion"]
        s["outside_engines"] = s["total"] - s["engines"]
        return {key: round(v, 4) for key, v in s.items()}


def predict_slide(
    slide: SlideReader,
    spots: Spots,
    bundle: "Bundle",
    engines: "Engines",
    *,
    batch_size: int,
    read_workers: int,
    strict: bool = False,
    progress: Callable[[int], Any] | None = None,
    reader: str = "auto",
) -> SlidePrediction:
    """Predict every spot of one slide: encode -> prototypes -> fuse.

    `slide` is a `SlideReader` (`read_patch(x, y, spec)`), `spots` a `Spots`
    (`ids`, `xy`), `engines` the loaded encoder and fusion runners
    (`engines.open_engines`); `batch_size` and `read_workers` are what the
    run chose (`predict.RunState`). `progress(n)` is called after each encoder
    batch with the number of spots done in it. `reader` picks the band
    reader's path ("auto", "per_spot", "tile_once"; see `bands.plan_reads`).

    A spot whose patch cannot be decoded (`PatchReadError`: the reader has
    already retried once) is dropped and listed in `.dropped`; with `strict`
    the first such spot is an error, and a slide where no spot can be read is
    an error too (UserError). Any other exception is a bug and propagates.
    """
    if batch_size < 1:
        raise UserError(f"{spell('batch_size', batch_size)}: must be a positive number")
    m = bundle.manifest
    ids = spots.ids  # a list, or a numpy string array (no per-spot objects for Visium HD)
    xy = np.asarray(spots.xy, dtype=np.float64)
    n = len(ids)
    if n == 0:
        raise UserError("no spots to predict: the coordinates file has no (in-tissue) spots")
    summary = bundle.familiarity()  # read and hash-checked before any patch is read
    timer = _Timer("read_wait", "encoder", "kmeans", "banks", "fusion")
    f, y1, ok, dropped, qc = _encode(slide, ids, xy, m, engines.encoder, timer, batch_size=batch_size,
                                     read_workers=read_workers, strict=strict, progress=progress, reader=reader)
    if not ok.any():
        first = dropped[0]
        raise UserError(
            f"{slide.path}: none of the {n} spots could be read (first: spot {first.spot_id}: {first.error}); "
            "check that the file is a complete, readable slide"
        )
    keep = np.flatnonzero(ok)
    if len(keep) < n:
        f, y1, qc = f[keep], y1[keep], qc[keep]
    qc_note = qc_warning(qc)
    if qc_note:
        warn(f"{slide.path}: {qc_note}")
    if len(keep) == n:
        kept_ids = ids
    else:
        kept_ids = ids[keep] if isinstance(ids, np.ndarray) else [ids[i] for i in keep]
    with timer("kmeans"), _kmeans_blas(len(keep)):
        protos = slide_prototypes(f, m.prototypes)
    pred, n_clipped = _fuse(engines.fusion, f, y1, protos, batch_size, timer)
    with timer("familiarity"):  # on one BLAS thread (FamiliaritySummary.similarity): the same bits on any machine
        familiarity = slide_familiarity(summary, f, str(slide.path), str(bundle.root))
    if m.neighbours is not None and m.neighbours.active:
        with timer("neighbours"):  # in place, over the spots kept, in µm at the slide's resolution
            array_xy = spots.array_xy[keep] if spots.array_xy is not None else None
            smooth_predictions(pred, xy[keep] * slide.mpp, m.neighbours, array_xy=array_xy, out=pred)
    return SlidePrediction(
        spot_ids=kept_ids,
        xy=xy[keep],
        prediction=pred,
        embedding=f,
        clusters=protos.labels,
        n_prototypes=protos.k,
        bank_size=protos.l,
        genes=list(m.genes),
        dropped=dropped,
        timings=timer.finish(),
        engines=engines.describe(),
        n_clipped=n_clipped,
        familiarity=familiarity,
        qc=qc,
        qc_record=qc_record(m.view),
    )


def _encode(slide: SlideReader, ids: list[str] | np.ndarray, xy: np.ndarray, m: Manifest, runner: Runner,
            timer: _Timer, *, batch_size: int,
            read_workers: int, strict: bool, progress: Callable[[int], Any] | None,
            reader: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[DroppedSpot], np.ndarray]:
    """Every readable spot's `f`, `y1` and image QC scores (rows where `ok`), and the dropped spots in input order."""
    n, spec = len(ids), m.view
    f = np.empty((n, m.embed_dim), dtype=np.float32)
    y1 = np.empty((n, len(m.genes)), dtype=np.float32)
    qc = np.full((n, len(QC_COLUMNS)), np.nan, dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    dropped: list[DroppedSpot] = []
    dropped_rows: list[int] = []
    views_shape = (spec.n_views, spec.input_size, spec.input_size, 3)
    encoder = _EncoderCalls(runner, f, y1, ok, progress)
    batch = encoder.buffer(batch_size, views_shape)
    batch_rows: list[int] = []

    def run_encoder() -> None:
        nonlocal batch
        encoder.submit(batch, batch_rows)
        batch = encoder.buffer(batch_size, views_shape)
        batch_rows.clear()

    read_spent: list[float] = []
    qc_spent: list[float] = []

    def score(views: np.ndarray) -> np.ndarray:  # on the reader thread, part of its read_threads time
        t = time.perf_counter()
        try:
            return spot_qc(views, spec)
        finally:
            qc_spent.append(time.perf_counter() - t)
    # The views' resizes are small matrix products: BLAS threads only fight the
    # reader threads and the engine for cores (benchmarks/RESULTS.md, "Figures
    # behind design choices"). The limit is process-wide, so it is lifted again for k-means.
    with _single_threaded_blas():
        chunks = read_spot_views(slide, xy, spec, workers=read_workers, reader=reader, spent=read_spent, score=score)
        try:
            while True:
                with timer("read_wait"):
                    chunk = next(chunks, None)
                if chunk is None:
                    break
                for i, e in chunk.failed:
                    if strict:
                        raise UserError(
                            f"spot {ids[i]} at ({xy[i, 0]:.0f}, {xy[i, 1]:.0f}): {e} "
                            f"(run without {spell('strict')} to skip unreadable spots)"
                        ) from None
                    dropped.append(DroppedSpot(ids[i], float(xy[i, 0]), float(xy[i, 1]), first_line(e)))
                    dropped_rows.append(i)
                    if progress is not None:
                        progress(1)
                qc[chunk.rows] = chunk.scores
                for i, views in zip(chunk.rows, chunk.views):
                    batch[len(batch_rows)] = views
                    batch_rows.append(int(i))
                    if len(batch_rows) == batch_size:
                        run_encoder()
            if batch_rows:
                run_encoder()
            encoder.finish()
        finally:
            encoder.close()
            chunks.close()
    timer.seconds["encoder"] = encoder.busy
    timer.seconds["read_threads"] = float(sum(read_spent))
    timer.seconds["qc_threads"] = float(sum(qc_spent))
    # the record lists dropped spots in input order, whatever order they were read in
    return f, y1, ok, [dropped[j] for j in np.argsort(dropped_rows, kind="stable")], qc


def _fuse(runner: Runner, f: np.ndarray, y1: np.ndarray, protos: SlidePrototypes, batch_size: int,
          timer: _Timer) -> tuple[np.ndarray, int]:
    """The predictions, batch by batch with each spot's top-L prototype bank; and how many were clipped.

    Each fusion batch's predictions overwrite its own y1 rows once that batch
    has run: one (N, G) array instead of two (a Visium HD slide has 10^5-10^6 bins).
    """
    pred = y1
    n_clipped = 0
    mask = np.ones((batch_size, protos.l), dtype=bool)
    for s in range(0, len(f), batch_size):
        e = min(s + batch_size, len(f))
        with timer("banks"):
            bank = protos.centroids[protos.bank_indices(f[s:e])]
        with timer("fusion"):
            out = runner.infer({"f": f[s:e], "bank": bank, "mask": mask[: e - s], "y1": y1[s:e]})
        below = out["prediction"] < PREDICTION_FLOOR
        n_clipped += int(np.count_nonzero(below))
        pred[s:e] = np.where(below, np.float32(PREDICTION_FLOOR), out["prediction"])
    return pred, n_clipped
