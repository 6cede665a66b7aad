"""Inference engines behind one small runner interface, and backend selection.

A runner loads one model file, runs batches (`run(feeds) -> outputs`, numpy in
and out, by tensor name) and releases its resources (`close`, or use it as a
context manager). `.name` says which backend it is, `.providers` which
execution providers it uses, `.precision` the precision of the file it runs.

Backends:
- `OnnxRuntimeRunner`: ONNX Runtime with the CPU execution provider, and the
  CUDA / TensorRT execution providers where onnxruntime-gpu is installed.
- `TensorRTRunner` (in `mmap_deploy.tensorrt_runner`): native TensorRT
  engines from the bundle; imported only when it is asked for.

`select_backend` turns `--backend auto|onnxruntime|tensorrt` and
`--precision` into an `EnginePlan` for the bundle, with a sentence saying
which backend it picked and why. onnxruntime and tensorrt are imported
lazily, so importing this module is cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bundle import PRECISIONS
from .errors import BundleError, UserError

if TYPE_CHECKING:  # pragma: no cover
    from .bundle import Bundle

BACKENDS = ("auto", "onnxruntime", "tensorrt")

# Short names a user may type for ONNX Runtime execution providers.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
# Fastest first: what `auto` prefers when onnxruntime offers it.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class Runner:
    """One loaded model: `run(feeds)` by tensor name, `close()`; a context manager."""

    name: str = "runner"
    providers: list[str]
    precision: str = "fp32"
    path: Path
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover
        pass

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path.name}, {self.precision}, providers={self.providers})"


def available_providers() -> list[str]:
    """The ONNX Runtime execution providers this installation offers."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_providers(requested: list[str] | tuple[str, ...] | None) -> list[str]:
    """Match provider names (full or short: cpu, cuda, tensorrt) against what is installed.

    None means CPU only. Raises UserError listing the available providers
    when one is not there.
    """
    available = available_providers()
    if not requested:
        return ["CPUExecutionProvider"]
    out = []
    lowered = {p.lower(): p for p in available}
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        match = lowered.get(full.lower())
        if match is None:
            hint = ""
            if full in GPU_PROVIDERS:
                hint = "; install onnxruntime-gpu (pip install 'mmap-deploy[gpu]') on a machine with a GPU"
            raise UserError(
                f"ONNX Runtime execution provider {name!r} is not available here "
                f"(available: {', '.join(available)}){hint}"
            )
        if match not in out:
            out.append(match)
    return out


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime session for one model file.

    Graph optimisation is ALL, execution sequential, and intra-op threads are
    `threads` (0 lets ONNX Runtime use every core); idle threads do not spin,
    so the patch-reading threads get the cores between batches. Providers are matched by
    name (see `resolve_providers`); CPU is always added last as the fallback
    for nodes the GPU providers do not take.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | tuple[str, ...] | None = None,
                 threads: int = 0, precision: str = "fp32"):
        import onnxruntime as ort

        self.path = Path(path)
        if threads < 0:
            raise UserError(f"--threads must be 0 (all cores) or a positive number, got {threads}")
        names = resolve_providers(providers)
        if "CPUExecutionProvider" not in names:
            names = names + ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # warnings about unused initialisers etc. are noise to a user
        # Idle intra-op threads must not spin: the patch readers share the cores
        # (2-core box, 600 spots: encoder 11-12 s spinning, 6-8 s without).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=so, providers=names)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(
                f"{self.path}: ONNX Runtime cannot load this model ({str(e).splitlines()[0]}); "
                "re-export the bundle with mmap-export"
            ) from None
        # What the session really uses: a GPU provider that failed to initialise is dropped.
        self.providers = list(self._session.get_providers())
        self.precision = precision
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise RuntimeError(f"{self.path.name}: the runner is closed")
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.path.name}: missing inputs {missing}; it takes {self.input_names}")
        outs = self._session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self._session = None


def tensorrt_importable() -> tuple[bool, str]:
    """(True, version) when the tensorrt Python package imports, else (False, why)."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA library that fails to load
        return False, f"tensorrt does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return True, str(getattr(tensorrt, "__version__", "unknown"))


def _open_tensorrt(path: Path, precision: str) -> Runner:
    from .tensorrt_runner import TensorRTRunner

    # the runner reads the engine's target (GPU, TensorRT version) from the manifest beside it
    return TensorRTRunner(path, precision=precision)


@dataclass
class EngineChoice:
    """How one role (encoder or fusion) will run: backend, file, providers."""

    role: str
    backend: str  # "onnxruntime" | "tensorrt"
    path: Path
    precision: str
    providers: list[str] = field(default_factory=list)


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
            return _open_tensorrt(c.path, c.precision)
        return OnnxRuntimeRunner(c.path, providers=c.providers, threads=self.threads, precision=c.precision)


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

    def __exit__(self, *exc: Any) -> None:
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


def _onnx_file(bundle: "Bundle", role: str, precision: str, strict: bool) -> tuple[Path, str]:
    """The ONNX file of `role` at `precision`; the fusion head may fall back to fp32."""
    mf = bundle.manifest.model_file(role, precision, "onnx")
    if mf is None and not strict and precision != "fp32":
        mf = bundle.manifest.model_file(role, "fp32", "onnx")
    if mf is None:
        mf = bundle.select(role, precision, "onnx")  # raises, naming what the bundle has
    return bundle.path_of(mf), mf.precision


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
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    m = bundle.manifest

    if backend in ("auto", "tensorrt"):
        enc_trt = m.model_file("encoder", precision, "tensorrt")
        ok, trt_info = tensorrt_importable() if enc_trt is not None else (False, "no engine in the bundle")
        if enc_trt is not None and ok:
            enc = EngineChoice("encoder", "tensorrt", bundle.path_of(enc_trt), precision, ["TensorRT " + trt_info])
            fus_trt = m.model_file("fusion", precision, "tensorrt") or m.model_file("fusion", "fp32", "tensorrt")
            if fus_trt is not None:
                fus = EngineChoice("fusion", "tensorrt", bundle.path_of(fus_trt), fus_trt.precision,
                                   ["TensorRT " + trt_info])
            else:
                fpath, fprec = _onnx_file(bundle, "fusion", precision, strict=False)
                fus = EngineChoice("fusion", "onnxruntime", fpath, fprec, _best_ort_providers())
            why = (f"the bundle has a {precision} TensorRT engine ({enc_trt.path}) and tensorrt {trt_info} imports")
            return EnginePlan(enc, fus, ("picked native TensorRT: " if backend == "auto" else "TensorRT: ") + why,
                              threads)
        if backend == "tensorrt":
            if enc_trt is None:
                bundle.select("encoder", precision, "tensorrt")  # raises with the fix
            raise UserError(
                f"--backend tensorrt: {trt_info}; install TensorRT 10.12+ "
                "(pip install 'mmap-deploy[tensorrt]') or use --backend onnxruntime"
            )
        no_trt = (f"no {precision} TensorRT engine in the bundle" if enc_trt is None else trt_info)
    else:
        no_trt = "--backend onnxruntime"

    if providers:
        ort_providers = resolve_providers(providers)
    else:
        ort_providers = _best_ort_providers()
    epath, eprec = _onnx_file(bundle, "encoder", precision, strict=True)
    fpath, fprec = _onnx_file(bundle, "fusion", precision, strict=False)
    enc = EngineChoice("encoder", "onnxruntime", epath, eprec, ort_providers)
    fus = EngineChoice("fusion", "onnxruntime", fpath, fprec, ort_providers)
    gpu = [p for p in ort_providers if p in GPU_PROVIDERS]
    if gpu:
        why = f"ONNX Runtime with {gpu[0]} ({no_trt})"
    else:
        why = f"ONNX Runtime on the CPU ({no_trt}; no GPU execution provider installed)"
        if backend == "onnxruntime" or providers:
            why = f"ONNX Runtime with {', '.join(ort_providers)}"
    return EnginePlan(enc, fus, ("picked " if backend == "auto" else "") + why, threads)


def _best_ort_providers() -> list[str]:
    available = available_providers()
    gpu = [p for p in GPU_PROVIDERS if p in available]
    return gpu + ["CPUExecutionProvider"]


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


def default_threads() -> int:
    """Cores this process may use (respects CPU affinity / container limits where visible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
