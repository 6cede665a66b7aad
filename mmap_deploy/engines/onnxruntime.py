"""ONNX Runtime: the CPU execution provider, and CUDA / TensorRT where onnxruntime-gpu is installed.

`onnxruntime` is imported when a runner is made or providers are listed, not
when this module is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BundleError, UserError
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


def best_providers() -> list[str]:
    """The GPU providers onnxruntime offers here, fastest first, then the CPU."""
    available = available_providers()
    return [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


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
        self.inputs = [
            TensorSpec(i.name, _ORT_DTYPES.get(i.type), tuple(d if isinstance(d, int) else None for d in i.shape))
            for i in self._session.get_inputs()
        ]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self._session.run(self.output_names, feeds)))

    def close_impl(self) -> None:
        self._session = None
