"""Batch prediction on Ray: `mmap-predict --manifest slides.csv -o OUT_DIR --ray [ADDRESS]`.

Workers are Ray Core actors, one per GPU (`num_gpus=1`) or, on a CPU-only
cluster, one per group of cores of a node. Each loads the bundle once, keeps
its engines, and predicts whole slides with the same code as the local batch
(`batch.predict_row` -> `predict.predict_to_file`); the driver hands the next
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
from typing import TYPE_CHECKING, Any

from ..errors import UserError, first_line
from ..messages import echo

if TYPE_CHECKING:  # pragma: no cover
    from ..location import Location
    from ..model.bundle import Bundle
    from ..options import Settings
    from .batch import BatchJob, BatchPlan, SlideOutcome
    from .manifest import ManifestRow

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

    def __init__(self, bundle_path: str, settings: Settings, command: str, run_id: str, counter: Any):
        import socket

        from ..messages import echo, show_on_stderr
        from ..options import CLI, caller
        from .predict import open_run

        # the worker's notes and warnings are lines on its stderr, which Ray forwards to the driver, spelled
        # as the command line's; the provenance's command line is the driver's (`command`), not the worker's
        self._messages = show_on_stderr(echo)
        self._messages.__enter__()  # for the worker's whole life: the process is this actor's alone
        self._caller = caller(CLI)
        self._caller.__enter__()
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.settings, self.run_id, self.counter = settings, run_id, counter
        self.error = ""
        try:
            from ..model.bundle import load_bundle

            self.bundle = load_bundle(bundle_path)
            self.state = open_run(self.bundle, settings, command)
        except UserError as e:  # reported by ready(): the driver stops with this line
            self.error = str(e)

    def ready(self) -> dict[str, Any]:
        info = {"host": self.host, "pid": self.pid, "error": self.error}
        if not self.error:
            engines = self.state.engines
            info.update(reason=engines.plan.reason, providers=", ".join(engines.encoder.providers),
                        batch_size=self.state.batch_size, readers=self.state.read_workers)
        return info

    def predict(self, row: ManifestRow, out: Location, manifest_name: str) -> SlideOutcome:
        from .batch import predict_row

        return predict_row(row, out, self.bundle, self.state, self.settings, manifest_name=manifest_name,
                           run_id=self.run_id, spot_progress=lambda n: self.counter.add.remote(n))


class _RayBatch:
    """The driver's side of a Ray batch: hands slides to free workers, and acts on what comes back.

    One method each for a worker that is ready (`on_ready`), a slide's result
    (`on_result`) and a worker's death (`on_death`: its slide is retried once
    on a new worker).
    """

    def __init__(self, ray: Any, plan: BatchPlan, to_do: deque[BatchJob], bundle: Bundle, settings: Settings,
                 command: str, run_id: str):
        self.ray, self.plan, self.to_do, self.bundle, self.settings = ray, plan, to_do, bundle, settings
        self.command, self.run_id = command, run_id
        self.actors: dict[int, Any] = {}
        self.info: dict[int, dict[str, Any]] = {}
        self.in_flight: dict[Any, tuple[int, BatchJob]] = {}  # ref -> (worker, job)
        self.starting: dict[Any, int] = {}  # ready() ref -> worker
        self.free: deque[int] = deque()
        self.stopped, self.announced, self.deaths_at_start = False, False, 0

    def start(self, where: str) -> None:
        """Plan the workers on the cluster's nodes, say so, and start them."""
        from ..messages import progress

        ray, settings = self.ray, self.settings
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.workers = plan_workers(nodes, settings.ray_workers, settings.threads)
        self.workers.n_workers = min(self.workers.n_workers, len(self.to_do))
        echo(f"ray: {self.workers.describe()} on {len(nodes)} node(s) of {where}; {len(self.to_do)} slide(s) to predict")
        self.worker_settings = settings.with_values(threads=self.workers.num_cpus, progress=False)
        self.counter = ray.remote(SpotCounter).options(num_cpus=0).remote()
        self.worker_cls = ray.remote(SlideWorker).options(num_cpus=self.workers.num_cpus,
                                                          num_gpus=self.workers.num_gpus, max_restarts=0)
        for w in range(self.workers.n_workers):
            self.spawn(w)
        quiet = not settings.progress
        self.slides_bar = progress(len(self.to_do), "slides", not quiet, unit="slide", position=0, file=sys.stderr)
        self.spots_bar = progress(None, "spots (all workers)", not quiet, unit="spot", position=1, file=sys.stderr)

    def spawn(self, w: int) -> None:
        self.actors[w] = self.worker_cls.remote(str(self.bundle.root), self.worker_settings, self.command, self.run_id,
                                                self.counter)
        self.starting[self.actors[w].ready.remote()] = w

    def say(self, msg: str) -> None:
        if self.settings.progress:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        else:
            echo(msg)

    def run(self) -> None:
        """Until every slide is done (or the batch stopped and the slides in flight are back)."""
        while self.in_flight or (self.to_do and not self.stopped):
            while self.free and self.to_do and not self.stopped:
                w, job = self.free.popleft(), self.to_do.popleft()
                # job.out itself: a RemotePath travels as its full URL, str() would be its redacted form
                self.in_flight[self.actors[w].predict.remote(job.row, job.out, self.plan.manifest.name)] = (w, job)
            if not self.in_flight and not self.starting:
                raise UserError("no Ray worker could be started; see the messages above")
            done, _ = self.ray.wait(list(self.in_flight) + list(self.starting), num_returns=1, timeout=POLL_S)
            self._count_spots()
            for ref in done:
                if ref in self.starting:
                    self.on_ready(ref)
                else:
                    self.on_result(ref)
            if self.stopped:
                self.plan.tally.not_started = len(self.to_do)
        self._count_spots()
        self.slides_bar.close()
        self.spots_bar.close()

    def _count_spots(self) -> None:
        self.spots_bar.update(self.ray.get(self.counter.read.remote()) - self.spots_bar.n)

    def on_ready(self, ref: Any) -> None:
        """A worker has started (or died starting: a new one takes its place, within limits)."""
        from ray.exceptions import RayActorError

        w = self.starting.pop(ref)
        try:
            info = self.info[w] = self.ray.get(ref)
        except RayActorError as e:
            self.deaths_at_start += 1
            if self.deaths_at_start > 2 * self.workers.n_workers:
                raise UserError(f"Ray workers die as they start: {first_line(e)}") from None
            self.spawn(w)
            return
        if info["error"]:
            raise UserError(f"worker on {info['host']}: {info['error']}")
        if not self.announced:
            self.announced = True
            self.say(f"engines (each worker): {info['reason']}; providers: {info['providers']}; "
                     f"batch size {info['batch_size']}, {info['readers']} patch reader thread(s)")
        self.free.append(w)

    def on_result(self, ref: Any) -> None:
        """A slide is back: its outcome, a bug outside `predict_row`'s own handling, or its worker's death."""
        from ray.exceptions import RayActorError, RayTaskError

        from .batch import FAILED, STOP, SlideOutcome

        w, job = self.in_flight.pop(ref)
        try:
            outcome = self.ray.get(ref)
            self.free.append(w)
        except RayActorError as e:
            outcome = self.on_death(w, job, e)
            if outcome is None:
                return
        except RayTaskError as e:
            outcome = SlideOutcome(job.row.name, FAILED, f"internal error: {first_line(e)} (traceback above)",
                                   traceback=str(e))
            self.free.append(w)
        self.plan.record(job, outcome, say=self.say)
        self.slides_bar.update(1)
        if outcome.status == STOP:
            self.stopped = True

    def on_death(self, w: int, job: BatchJob, e: Exception) -> SlideOutcome | None:
        """Replace the dead worker; retry its slide once (None), or its failed outcome on the second try."""
        from .batch import FAILED, SlideOutcome

        who = self.info.get(w, {})
        reason = f"its worker (host {who.get('host', '?')}, pid {who.get('pid', '?')}) died: {first_line(e)}"
        self.ray.kill(self.actors[w])
        self.spawn(w)
        if job.attempt == 0:
            self.say(f"{job.prefix}: {reason}; retrying it once on a new worker")
            self.to_do.appendleft(dataclasses.replace(job, attempt=1))
            return None
        return SlideOutcome(job.row.name, FAILED, f"{reason}, on its second try too")

    def close(self) -> None:
        """Stop the workers; release the claims of slides stopped mid-way (Ctrl-C, an error) at once."""
        from .claims import release_run_claims

        for a in self.actors.values():
            self.ray.kill(a)
        release_run_claims([job.out for _, job in self.in_flight.values()], self.run_id)


def run_batch_ray(manifest: Path, rows: list[ManifestRow], out_dir: Path, bundle: Bundle, settings: Settings,
                  command: str, address: str) -> int:
    """The manifest's slides on Ray workers; the same plan, outputs, summary and exit code as `batch.run_batch`.

    `command` is the driver's command line, for each slide's provenance.
    """
    from .batch import plan_batch
    from .claims import new_run_id
    from .storage import make_output_dir

    plan = plan_batch(manifest, rows, out_dir, settings, absolute=True)
    to_do = deque(job for job in plan.jobs if not plan.skip_existing(job))
    if not to_do:
        return plan.finish()
    ray = import_ray()
    started = connect(address)
    driver = _RayBatch(ray, plan, to_do, bundle, settings, command, new_run_id())
    try:
        make_output_dir(plan.out_dir)  # once Ray is there: a wrong ADDRESS leaves nothing behind
        driver.start("a local Ray on 127.0.0.1" if started else f"the Ray cluster at {address}")
        driver.run()
    finally:
        driver.close()
        if started:
            ray.shutdown()
    return plan.finish()
