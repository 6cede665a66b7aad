"""ONNX Runtime: the CPU execution provider, and CUDA / TensorRT where onnxruntime-gpu is installed.

`onnxruntime` is imported when a runner is made or providers are listed, not
when this module is. Before a GPU provider's first session, the CUDA and
cuDNN libraries that pip installs as Python packages (nvidia-*) are loaded
(`preload_gpu_libraries`), so onnxruntime-gpu finds them without
LD_LIBRARY_PATH.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from pathlib import Path

import numpy as np

from ..errors import BundleError, UserError, first_line
from ..options import spell
from .base import Runner, TensorSpec

# Short names a user may type for ONNX Runtime execution providers.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
# Fastest first: what `auto` prefers when onnxruntime offers it.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# CUDA execution provider settings. The memory arena grows by what a batch
# asks for, not to the next power of two (a large UNI batch would reserve up
# to twice its memory); cuDNN picks convolution algorithms by heuristic
# rather than timing each one for every new input shape (the batch axis is
# dynamic: a slide's last batch is a new shape); copies share the compute
# stream (ONNX Runtime's default, stated because the other choice can race).
CUDA_OPTIONS = {
    "arena_extend_strategy": "kSameAsRequested",
    "cudnn_conv_algo_search": "HEURISTIC",
    "do_copy_in_default_stream": "1",
}
_preload_lock = threading.Lock()
_preloaded: list[str] = []  # what preloading printed, once it has run
# ONNX tensor types as ONNX Runtime names them, and their numpy dtypes.
_ORT_DTYPES = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in (("float", np.float32), ("float16", np.float16), ("double", np.float64), ("uint8", np.uint8),
                        ("int8", np.int8), ("int32", np.int32), ("int64", np.int64), ("bool", np.bool_))
}


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


def provider_options(names: list[str], device: int = 0) -> list[dict[str, str]]:
    """Options for each execution provider in `names`: the GPU ones run on CUDA device `device`."""
    out = []
    for name in names:
        if name == "CUDAExecutionProvider":
            out.append({"device_id": str(device), **CUDA_OPTIONS})
        elif name == "TensorrtExecutionProvider":
            out.append({"device_id": str(device)})
        else:
            out.append({})
    return out


def preload_gpu_libraries() -> None:
    """Load the CUDA and cuDNN libraries installed as Python packages, once per process.

    Uses `onnxruntime.preload_dlls` (onnxruntime-gpu 1.21+; on a CPU build,
    or an older one, nothing happens). What it prints about libraries it
    could not load goes to stderr: stdout stays clean.
    """
    import onnxruntime as ort

    with _preload_lock:
        if _preloaded or not hasattr(ort, "preload_dlls"):
            return
        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            try:
                ort.preload_dlls(cuda=True, cudnn=True, msvc=True)
            except Exception as e:  # a missing or broken library: the session's own error says more
                print(f"onnxruntime could not preload the CUDA libraries ({type(e).__name__}: {e})")
        _preloaded.append(said.getvalue().strip())
        if _preloaded[0]:
            print(_preloaded[0], file=sys.stderr)


def best_providers() -> list[str]:
    """The GPU providers onnxruntime offers here, fastest first, then the CPU."""
    available = available_providers()
    return [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime session for one model file.

    Graph optimisation is ALL, execution sequential, and intra-op threads are
    `threads` (0 lets ONNX Runtime use every core); idle threads do not spin,
    so the patch-reading threads get the cores between batches. `streams`
    > 1: the pipeline may run that many calls at once (a session runs
    concurrent calls; each takes `threads` intra-op threads). Providers are matched by
    name (see `resolve_providers`); CPU is always added last as the fallback
    for nodes the GPU providers do not take. GPU providers run on CUDA device
    `device` with `CUDA_OPTIONS`. `io_binding` runs each batch through ONNX
    Runtime's IO binding instead of `session.run` (same outputs; opt-in, for
    measuring on GPUs).
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | tuple[str, ...] | None = None,
                 threads: int = 0, precision: str = "fp32", *, device: int = 0, io_binding: bool = False,
                 streams: int = 1):
        import onnxruntime as ort

        self.path = Path(path)
        if threads < 0:
            raise UserError(f"{spell('threads', threads)}: must be 0 (all cores) or a positive number")
        names = resolve_providers(providers)
        if "CPUExecutionProvider" not in names:
            names = names + ["CPUExecutionProvider"]
        if any(n in GPU_PROVIDERS for n in names):
            preload_gpu_libraries()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.streams = max(1, int(streams))
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # warnings about unused initialisers etc. are noise to a user
        # Idle intra-op threads must not spin: the patch readers share the cores,
        # and a spinning thread holds one the readers need (benchmarks/RESULTS.md).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=so, providers=names,
                                                 provider_options=provider_options(names, device))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(
                f"{self.path}: ONNX Runtime cannot load this model ({first_line(e)}); "
                "re-export the bundle with mmap-export"
            ) from None
        # What the session really uses: a GPU provider that failed to initialise is dropped.
        self.providers = list(self._session.get_providers())
        self.precision = precision
        self.inputs = [
            TensorSpec(i.name, _ORT_DTYPES.get(i.type), tuple(d if isinstance(d, int) else None for d in i.shape))
            for i in self._session.get_inputs()
        ]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.io_binding = io_binding

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.io_binding:
            return dict(zip(self.output_names, self._session.run(self.output_names, feeds)))
        # IO binding (opt-in, for measuring on GPUs): ONNX Runtime copies the host inputs to the
        # provider's device and the outputs back itself.
        binding = self._session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def close_impl(self) -> None:
        self._session = None
