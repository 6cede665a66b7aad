"""Inference engines behind one runner interface, and backend selection.

- `base`: `Runner` (load, `infer`, `close`; a context manager). Its
  `infer` checks inputs and chunks batches once; each backend implements only
  `infer_impl`.
- `onnxruntime`: `OnnxRuntimeRunner` (CPU; CUDA and TensorRT execution
  providers with onnxruntime-gpu) and the provider names.
- `tensorrt`: `TensorRTRunner` (native TensorRT engines), the GPU/TensorRT
  target of an engine and the check that it matches this machine.
- `select`: `--backend auto|onnxruntime|tensorrt` -> `EnginePlan` -> `Engines`.

onnxruntime and tensorrt themselves are imported only when a runner is made,
so importing this package is cheap.
"""

from .base import Runner, TensorSpec
from .onnxruntime import GPU_PROVIDERS, OnnxRuntimeRunner, available_providers, resolve_providers
from .select import BACKENDS, EngineChoice, EnginePlan, Engines, default_threads, open_engines, select_backend
from .tensorrt import TensorRTRunner, tensorrt_importable

__all__ = [
    "BACKENDS", "GPU_PROVIDERS", "EngineChoice", "EnginePlan", "Engines", "OnnxRuntimeRunner", "Runner",
    "TensorRTRunner", "TensorSpec", "available_providers", "default_threads", "open_engines", "resolve_providers",
    "select_backend", "tensorrt_importable",
]
