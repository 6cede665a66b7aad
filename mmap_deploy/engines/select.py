"""`--backend auto|onnxruntime|tensorrt`: which engines run a bundle, and loading them.

`select_backend` turns the backend and `--precision` into an `EnginePlan` for
the bundle, with a sentence saying which backend it picked and why;
`open_engines` loads the plan's two runners (and, for `auto`, falls back to
ONNX Runtime when a TensorRT engine cannot run here). Model files reach the
runners through the bundle (`Bundle.path_of`), which checks each one's hash
the first time it is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..options import BACKENDS, PRECISIONS, spell
from .base import Runner
from .onnxruntime import GPU_PROVIDERS, OnnxRuntimeRunner, best_providers, resolve_providers
from .tensorrt import TensorRTRunner, tensorrt_importable

if TYPE_CHECKING:  # pragma: no cover
    from ..model.bundle import Bundle, ModelFile

# The most encoder calls in flight at once on the CPU (see cpu_encoder_streams).
CPU_ENCODER_STREAMS = 2


@dataclass
class EngineChoice:
    """How one role (encoder or fusion) will run: backend, the bundle's model file, providers."""

    role: str
    backend: str  # "onnxruntime" | "tensorrt"
    model_file: "ModelFile"
    path: Path
    providers: list[str] = field(default_factory=list)

    @property
    def precision(self) -> str:
        return self.model_file.precision


@dataclass
class EnginePlan:
    """The backend picked for a bundle, per role, and why."""

    encoder: EngineChoice
    fusion: EngineChoice
    reason: str
    threads: int = 0

    @property
    def backend(self) -> str:
        """One word for provenance: the encoder's backend (it does nearly all the work)."""
        return self.encoder.backend

    def open(self) -> "Engines":
        """Load both runners."""
        enc = self._open_one(self.encoder)
        try:
            fus = self._open_one(self.fusion)
        except BaseException:
            enc.close()
            raise
        return Engines(encoder=enc, fusion=fus, plan=self)

    def _open_one(self, c: EngineChoice) -> Runner:
        if c.backend == "tensorrt":
            # the target recorded in the checked manifest: the runner never re-reads it
            return TensorRTRunner(c.path, target=c.model_file.target, precision=c.precision)
        threads, streams = self.threads, 1
        if c.role == "encoder" and not any(p in GPU_PROVIDERS for p in c.providers):
            streams = cpu_encoder_streams(threads)
            if streams > 1:  # the threads are shared out between the calls in flight
                threads = max(1, (threads or default_threads()) // streams)
        return OnnxRuntimeRunner(c.path, providers=c.providers, threads=threads, precision=c.precision,
                                 streams=streams)


@dataclass
class Engines:
    """The two loaded runners of a bundle; a context manager that closes both."""

    encoder: Runner
    fusion: Runner
    plan: EnginePlan

    def close(self) -> None:
        self.encoder.close()
        self.fusion.close()

    def __enter__(self) -> "Engines":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, str]:
        """Flat, string-only description for provenance (anndata cannot store None)."""
        out = {"backend": self.plan.backend, "backend_reason": self.plan.reason}
        for role, r in (("encoder", self.encoder), ("fusion", self.fusion)):
            out[f"{role}_backend"] = r.name
            out[f"{role}_file"] = r.path.name
            out[f"{role}_precision"] = r.precision
            out[f"{role}_providers"] = ",".join(r.providers)
        return out


def _choice(bundle: "Bundle", mf: "ModelFile", backend: str, providers: list[str]) -> EngineChoice:
    return EngineChoice(mf.role, backend, mf, bundle.path_of(mf), providers)


def _onnx_file(bundle: "Bundle", role: str, precision: str, strict: bool) -> "ModelFile":
    """The ONNX file of `role` at `precision`; the fusion head may fall back to fp32."""
    mf = bundle.manifest.model_file(role, precision, "onnx")
    if mf is None and not strict and precision != "fp32":
        mf = bundle.manifest.model_file(role, "fp32", "onnx")
    if mf is None:
        mf = bundle.select(role, precision, "onnx")  # raises, naming what the bundle has
    return mf


def select_backend(backend: str, bundle: "Bundle", precision: str = "fp32", *,
                   threads: int = 0, providers: list[str] | None = None) -> EnginePlan:
    """Pick the engines for `bundle`: the fastest available unless `backend` names one.

    auto: a TensorRT engine in the bundle for this precision and an importable
    tensorrt -> native TensorRT; else ONNX Runtime with its TensorRT or CUDA
    execution provider when onnxruntime-gpu offers one; else ONNX Runtime on
    the CPU. The encoder must exist at `precision`; the fusion head (small)
    falls back to its fp32 file when the bundle has no other. Whether a
    TensorRT engine matches this GPU is checked when it is loaded (see
    `open_engines`, which falls back for `auto`).
    """
    if backend not in BACKENDS:
        raise UserError(f"{spell('backend', backend)}: must be one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise UserError(f"{spell('precision', precision)}: must be one of {', '.join(PRECISIONS)}")
    m = bundle.manifest

    if backend in ("auto", "tensorrt"):
        enc_trt = m.model_file("encoder", precision, "tensorrt")
        ok, trt_info = tensorrt_importable() if enc_trt is not None else (False, "no engine in the bundle")
        if enc_trt is not None and ok:
            enc = _choice(bundle, enc_trt, "tensorrt", ["TensorRT " + trt_info])
            fus_trt = m.model_file("fusion", precision, "tensorrt") or m.model_file("fusion", "fp32", "tensorrt")
            if fus_trt is not None:
                fus = _choice(bundle, fus_trt, "tensorrt", ["TensorRT " + trt_info])
            else:
                fus = _choice(bundle, _onnx_file(bundle, "fusion", precision, strict=False), "onnxruntime",
                              best_providers())
            why = (f"the bundle has a {precision} TensorRT engine ({enc_trt.path}) and tensorrt {trt_info} imports")
            return EnginePlan(enc, fus, ("picked native TensorRT: " if backend == "auto" else "TensorRT: ") + why,
                              threads)
        if backend == "tensorrt":
            if enc_trt is None:
                bundle.select("encoder", precision, "tensorrt")  # raises with the fix
            raise UserError(
                f"{spell('backend', 'tensorrt')}: {trt_info}; install TensorRT 10.12+ "
                f"(pip install 'mmap-deploy[tensorrt]') or use {spell('backend', 'onnxruntime')}"
            )
        no_trt = (f"no {precision} TensorRT engine in the bundle" if enc_trt is None else trt_info)
    else:
        no_trt = spell("backend", "onnxruntime")

    ort_providers = resolve_providers(providers) if providers else best_providers()
    enc = _choice(bundle, _onnx_file(bundle, "encoder", precision, strict=True), "onnxruntime", ort_providers)
    fus = _choice(bundle, _onnx_file(bundle, "fusion", precision, strict=False), "onnxruntime", ort_providers)
    gpu = [p for p in ort_providers if p in GPU_PROVIDERS]
    if gpu:
        why = f"ONNX Runtime with {gpu[0]} ({no_trt})"
    else:
        why = f"ONNX Runtime on the CPU ({no_trt}; no GPU execution provider installed)"
        if backend == "onnxruntime" or providers:
            why = f"ONNX Runtime with {', '.join(ort_providers)}"
    return EnginePlan(enc, fus, ("picked " if backend == "auto" else "") + why, threads)


def open_engines(backend: str, bundle: "Bundle", precision: str = "fp32", *, threads: int = 0,
                 providers: list[str] | None = None) -> Engines:
    """`select_backend`, then load both runners.

    With `auto`, a TensorRT engine that cannot run here (built for another
    GPU or TensorRT version, no NVIDIA driver, ...) falls back to ONNX
    Runtime and the reason says so; with `--backend tensorrt` it is an error.
    """
    plan = select_backend(backend, bundle, precision, threads=threads, providers=providers)
    try:
        return plan.open()
    except UserError as e:  # EngineMismatchError, or no usable GPU
        if backend != "auto" or plan.backend != "tensorrt":
            raise
        fallback = select_backend("onnxruntime", bundle, precision, threads=threads, providers=providers)
        fallback.reason = f"picked {fallback.reason} because the TensorRT engine does not fit here: {e}"
        return fallback.open()


def cpu_encoder_streams(threads: int = 0) -> int:
    """Encoder batches run at once on the CPU, each on its share of the `threads` (0: every core).

    Two calls of one thread each beat one call on two threads on the 2-core
    box: the patch readers share the cores, and a call split over two threads
    waits at every operator for the thread the readers held up (interleaved
    runs over 4 000 bins, demo bundle: benchmarks/RESULTS.md). The batches
    are those of one call at a time; each call runs on fewer threads, which
    leaves the outputs as they were (tested: the demo encoder at 1 and 2
    threads and in batches of 1 to 32, and whole predictions of the test
    bundle with one call or two in flight).
    """
    return max(1, min(CPU_ENCODER_STREAMS, threads or default_threads()))


def default_threads() -> int:
    """Cores this process may use (respects CPU affinity / container limits where visible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
