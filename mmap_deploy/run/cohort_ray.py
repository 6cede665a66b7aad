"""Batch prediction on Ray: `mmap-predict --manifest slides.csv -o OUT_DIR --ray [ADDRESS]`.

Workers are Ray Core actors, one per GPU (`num_gpus=1`) or, on a CPU-only
cluster, one per group of cores of a node. Each loads the bundle once, keeps
its engines, and predicts whole slides with the same code as the local batch
(`cohort.predict_row` -> `predict.predict_to_file`); the driver hands the next
slide to whichever worker is free (`ray.wait`), so a slow slide never holds
up the others.

Why actors and not Ray Data: the unit of work is a slide, not a row of a
table. A slide's k-means needs all of its spots at once and its output is
one file, so Ray Data would either stream single-slide batches through an
actor pool (its machinery with none of its benefits) or split slides into
spot batches and regroup them with a shuffle before k-means. Ray Data also
retries and writes on its own terms, while the batch contract here is per
slide: skip finished outputs, one bad slide does not stop the others, a full
output folder stops the batch, a dead worker's slide is retried exactly
once. A few actors and `ray.wait` say that directly, and need only `ray`
(no pandas/pyarrow stack on every node).

Why tiles are read inside the worker (its reader threads, as in the local
run) and not as separate Ray CPU tasks: a spot's three views are 113 KB of
uint8 for 112 px views; shipping them through the object store costs a copy
and a serialisation per spot and, across nodes, network traffic, for work
(JPEG/tile decoding) the worker's own cores do next to the engine. A GPU
worker asks Ray for the node's cores per GPU (up to 8) and uses them as
reader threads, as a local GPU run does (`predict.engine_defaults`). Separate
read tasks were not measured against this.

A worker that dies (killed, out of memory, node lost) is replaced by a new
actor and its slide is retried once. Slides are claimed (see `claims`), so
two runs over one manifest never write the same slide at once.

Security: without ADDRESS the run starts its own Ray bound to 127.0.0.1,
without dashboard, and shuts it down at the end. A shared cluster's ports
accept any client that reaches them: see the README ("Cohorts on Ray").
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError, first_line

RAY_EXTRA = "pip install 'mmap-deploy[ray]'"
LOCAL = "local"  # --ray without ADDRESS
MAX_CORES_PER_WORKER = 8  # ONNX Runtime on more cores than this gains little; the node gets more workers instead
LOCAL_OBJECT_STORE = 128 << 20  # slides' outcomes are a few hundred bytes; no need for Ray's 30% of RAM
POLL_S = 0.5


def import_ray() -> Any:
    """`ray`, or a one-line UserError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, which is not installed here: {RAY_EXTRA}") from None
    return ray


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start a Ray for this process only, reachable from this machine only.

    Ray binds its servers to the node's address, which it resolves to the
    machine's network address even when asked for 127.0.0.1, except on
    single-machine platforms; `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` selects
    that single-machine mode, so every Ray server listens on 127.0.0.1.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported ...
    ray = import_ray()
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # ... and again here, for a process that imported ray earlier
    ray.init(address=LOCAL, num_cpus=num_cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE,
             configure_logging=False, log_to_driver=True)


def connect(address: str) -> bool:
    """Connect to Ray (`local`: start a private one); True when this call started it."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address == LOCAL:
        start_local_ray()
        return True
    try:
        ray.init(address=address, configure_logging=False, log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError) as e:
        first = first_line(e)
        raise UserError(
            f"--ray {address}: no Ray cluster to join there ({first}); start one with `ray start --head` "
            "(or give its HOST:PORT), or use --ray without ADDRESS for a local one"
        ) from None
    return False


@dataclass
class WorkerPlan:
    """How many workers, and what each asks Ray for."""

    n_workers: int
    num_cpus: int
    num_gpus: int

    def describe(self) -> str:
        gpu = f" and {self.num_gpus} GPU" if self.num_gpus else ""
        return f"{self.n_workers} worker(s), {self.num_cpus} CPU core(s){gpu} each"


def plan_workers(node_resources: list[dict[str, float]], requested: int | None, threads: int) -> WorkerPlan:
    """One worker per GPU; on CPU-only clusters one per `threads` (else up to 8) cores of each node.

    `requested` (--ray-workers) overrides the count; the cores of the
    cluster are then split between the workers unless --threads says how many.
    """
    cpus = [int(r.get("CPU", 0)) for r in node_resources]
    gpus = [int(r.get("GPU", 0)) for r in node_resources]
    if sum(gpus):
        per_gpu = [c // g for c, g in zip(cpus, gpus) if g]
        cores = threads or max(1, min(MAX_CORES_PER_WORKER, min(per_gpu)))
        return WorkerPlan(requested or sum(gpus), cores, 1)
    if requested:
        return WorkerPlan(requested, threads or max(1, sum(cpus) // requested), 0)
    cores = threads or max(1, min(MAX_CORES_PER_WORKER, max(cpus, default=1)))
    return WorkerPlan(max(1, sum(c // cores for c in cpus)), cores, 0)


class SpotCounter:
    """Spots done across the cluster (a Ray actor): workers add, the driver reads."""

    def __init__(self) -> None:
        self.spots = 0

    def add(self, n: int) -> None:
        self.spots += n

    def read(self) -> int:
        return self.spots


class SlideWorker:
    """One worker (a Ray actor): loads the bundle and its engines once, then predicts slides."""

    def __init__(self, bundle_path: str, settings: Any, run_id: str, counter: Any):
        import socket

        from ..engines import open_engines
        from ..messages import show_on_stderr
        from .predict import _echo, engine_defaults

        # the worker's notes and warnings are lines on its stderr, which Ray forwards to the driver;
        # the provenance's command line is the driver's (settings.command), not the worker's
        self._messages = show_on_stderr(_echo)
        self._messages.__enter__()  # for the worker's whole life: the process is this actor's alone
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.settings, self.run_id, self.counter = settings, run_id, counter
        self.error = ""
        try:
            from ..model.bundle import load_bundle

            self.bundle = load_bundle(bundle_path)
            self.engines = open_engines(settings.backend, self.bundle, settings.precision, threads=settings.threads)
            engine_defaults(self.engines, settings)
        except UserError as e:  # reported by ready(): the driver stops with this line
            self.error = str(e)

    def ready(self) -> dict[str, Any]:
        info = {"host": self.host, "pid": self.pid, "error": self.error}
        if not self.error:
            info.update(reason=self.engines.plan.reason, providers=", ".join(self.engines.encoder.providers),
                        batch_size=self.settings.batch_size, readers=self.settings.read_workers)
        return info

    def predict(self, row: Any, out: str, manifest_name: str) -> Any:
        from .cohort import predict_row

        return predict_row(row, Path(out), self.bundle, self.engines, self.settings, manifest_name=manifest_name,
                           run_id=self.run_id, spot_progress=lambda n: self.counter.add.remote(n))


def run_batch_ray(manifest: Path, rows: list[Any], out_dir: Path, bundle: Any, settings: Any,
                  shard: tuple[int, int] | None, address: str, n_workers: int | None) -> int:
    """The manifest's slides on Ray workers; the same outputs, summary and exit code as `batch.run_batch`."""
    from .batch import check_output_dir, echo_outcome
    from .claims import new_run_id, release_run_claims
    from .cohort import FAILED, STOP, BatchTally, SlideOutcome
    from .predict import EXIT_BATCH_FAILED, _echo
    from .storage import make_output_dir

    check_output_dir(out_dir)
    if shard is not None:
        i, n = shard
        rows = [r for k, r in enumerate(rows) if k % n == i]
    out_dir = out_dir.absolute()  # workers run elsewhere: no path may depend on the driver's cwd
    tally, to_do = BatchTally(len(rows)), deque()
    for k, row in enumerate(rows, start=1):
        out = out_dir / f"{row.name}.{settings.output_format}"
        if out.exists() and not settings.overwrite:
            tally.skipped.append(row.name)
            _echo(f"[{k}/{len(rows)}] {row.name}: skipped, {out} exists (pass --overwrite to redo it)")
            continue
        row = dataclasses.replace(row, slide=row.slide.absolute(),
                                  coords=None if row.coords is None else row.coords.absolute())
        to_do.append((k, row, 0))
    shard_txt = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    if not to_do:
        for line in tally.summary_lines(manifest, shard_txt):
            _echo(line)
        return 0

    ray = import_ray()
    from ray.exceptions import RayActorError, RayTaskError

    started = connect(address)
    run_id = new_run_id()
    actors: dict[int, Any] = {}
    info: dict[int, dict[str, Any]] = {}
    in_flight: dict[Any, tuple[int, int, Any, int]] = {}
    try:
        make_output_dir(out_dir)  # once Ray is there: a wrong ADDRESS leaves nothing behind
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        plan = plan_workers(nodes, n_workers, settings.threads)
        plan.n_workers = min(plan.n_workers, len(to_do))
        where = "a local Ray on 127.0.0.1" if started else f"the Ray cluster at {address}"
        _echo(f"ray: {plan.describe()} on {len(nodes)} node(s) of {where}; {len(to_do)} slide(s) to predict")
        worker_settings = dataclasses.replace(settings, threads=plan.num_cpus, progress=False, plot=list(settings.plot))
        counter = ray.remote(SpotCounter).options(num_cpus=0).remote()
        worker_cls = ray.remote(SlideWorker).options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=0)
        starting: dict[Any, int] = {}

        def spawn(w: int) -> None:
            actors[w] = worker_cls.remote(str(bundle.root), worker_settings, run_id, counter)
            starting[actors[w].ready.remote()] = w

        for w in range(plan.n_workers):
            spawn(w)
        free: deque[int] = deque()
        stopped = False
        from tqdm import tqdm

        quiet = not settings.progress
        slides_bar = tqdm(total=len(to_do), unit="slide", desc="slides", file=sys.stderr, disable=quiet,
                          position=0, dynamic_ncols=True)
        spots_bar = tqdm(unit="spot", desc="spots (all workers)", file=sys.stderr, disable=quiet, position=1,
                         dynamic_ncols=True)

        def say(msg: str) -> None:
            if settings.progress:
                tqdm.write(msg, file=sys.stderr)
            else:
                _echo(msg)

        deaths_at_start, announced = 0, False
        while in_flight or (to_do and not stopped):
            while free and to_do and not stopped:
                w = free.popleft()
                k, row, attempt = to_do.popleft()
                out = out_dir / f"{row.name}.{settings.output_format}"
                ref = actors[w].predict.remote(row, str(out), manifest.name)
                in_flight[ref] = (w, k, row, attempt)
            if not in_flight and not starting:
                raise UserError("no Ray worker could be started; see the messages above")
            done, _ = ray.wait(list(in_flight) + list(starting), num_returns=1, timeout=POLL_S)
            spots_bar.update(ray.get(counter.read.remote()) - spots_bar.n)
            for ref in done:
                if ref in starting:
                    w = starting.pop(ref)
                    try:
                        info[w] = ray.get(ref)
                    except RayActorError as e:
                        deaths_at_start += 1
                        if deaths_at_start > 2 * plan.n_workers:
                            raise UserError(f"Ray workers die as they start: {first_line(e)}") from None
                        spawn(w)
                        continue
                    if info[w]["error"]:
                        raise UserError(f"worker on {info[w]['host']}: {info[w]['error']}")
                    if not announced:
                        announced = True
                        say(f"engines (each worker): {info[w]['reason']}; providers: {info[w]['providers']}; "
                            f"batch size {info[w]['batch_size']}, {info[w]['readers']} patch reader thread(s)")
                    free.append(w)
                    continue
                w, k, row, attempt = in_flight.pop(ref)
                prefix = f"[{k}/{len(rows)}] {row.name}"
                try:
                    outcome = ray.get(ref)
                    free.append(w)
                except RayActorError as e:
                    who = info.get(w, {})
                    reason = (f"its worker (host {who.get('host', '?')}, pid {who.get('pid', '?')}) died: "
                              f"{first_line(e)}")
                    ray.kill(actors[w])
                    spawn(w)
                    if attempt == 0:
                        say(f"{prefix}: {reason}; retrying it once on a new worker")
                        to_do.appendleft((k, row, 1))
                        continue
                    outcome = SlideOutcome(row.name, FAILED, f"{reason}, on its second try too")
                except RayTaskError as e:  # a bug outside predict_row's own handling
                    outcome = SlideOutcome(row.name, FAILED, f"internal error: {first_line(e)} (traceback above)",
                                           traceback=str(e))
                    free.append(w)
                tally.add(row, outcome)
                echo_outcome(prefix, outcome, echo=say)
                slides_bar.update(1)
                if outcome.status == STOP and not stopped:
                    stopped = True
            if stopped:
                tally.not_started = len(to_do)
        spots_bar.update(ray.get(counter.read.remote()) - spots_bar.n)
        slides_bar.close()
        spots_bar.close()
    finally:
        for a in actors.values():
            ray.kill(a)
        # claims of slides whose workers were stopped mid-way (Ctrl-C, an error) must not wait to go stale
        fmt = settings.output_format
        release_run_claims([out_dir / f"{row.name}.{fmt}" for _, _, row, _ in in_flight.values()], run_id)
        if started:
            ray.shutdown()
    for line in tally.summary_lines(manifest, shard_txt):
        _echo(line)
    return EXIT_BATCH_FAILED if tally.failed else 0
