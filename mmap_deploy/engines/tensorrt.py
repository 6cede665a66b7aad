"""Native TensorRT engines: the runner, the GPU/TensorRT target, and the check that they match.

TensorRT 10.12+ / 11 API only: name-based I/O tensors (`set_input_shape`,
`set_tensor_address`), `execute_async_v3`, one optimisation profile. CUDA
memory, streams and device queries go through the CUDA driver library
(`libcuda`, present wherever the NVIDIA driver is) by ctypes, so the runtime
needs neither pycuda, cuda-python nor torch. `tensorrt` is imported only when
a runner is created.

An engine is tied to the GPU model and TensorRT version it was built with;
the bundle manifest records both (`target`). The runner is given that target
with the engine (`TensorRTRunner.from_bundle` takes both from the loaded,
checked bundle; it never reads the manifest again) and refuses an engine
whose target differs from this machine's with an `EngineMismatchError` that
says what differs and how to fix it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BundleError, EngineMismatchError, UserError, first_line
from ..options import spell
from .base import Runner, TensorSpec

if TYPE_CHECKING:  # pragma: no cover
    from ..model.bundle import Bundle, ModelFile

# The target fields an engine must match exactly.
TARGET_FIELDS = ("gpu", "compute_capability", "tensorrt")
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


class CudaDriver:
    """The few CUDA driver calls the runner needs, through ctypes.

    Uses the device's primary context (the one the CUDA runtime inside
    TensorRT uses too), made current on the calling thread.
    """

    def __init__(self, device: int = 0):
        name = ctypes.util.find_library("cuda") or "libcuda.so.1"
        try:
            self.lib = ctypes.CDLL(name)
        except OSError:
            raise UserError(
                "no NVIDIA driver found (libcuda could not be loaded): TensorRT engines need an NVIDIA GPU; "
                f"use {spell('backend', 'onnxruntime')} on this machine"
            ) from None
        self._check(self.lib.cuInit(0), "cuInit")
        count = ctypes.c_int()
        self._check(self.lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        if not 0 <= device < count.value:
            raise UserError(f"CUDA device {device} does not exist (this machine has {count.value}); "
                            "check CUDA_VISIBLE_DEVICES")
        self.device = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(self.device), device), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), self.device),
                    "cuDevicePrimaryCtxRetain")
        self.make_current()

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(status, ctypes.byref(text))
            msg = text.value.decode() if text.value else f"error {status}"
            # A GPU that cannot be used is the machine's state, not a bug: one line,
            # and `--backend auto` falls back to ONNX Runtime on it.
            raise UserError(f"CUDA {call} failed: {msg}; check the GPU and its driver, or run with "
                            f"{spell('backend', 'onnxruntime')}")

    def make_current(self) -> None:
        self._check(self.lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def name(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self._check(self.lib.cuDeviceGetName(buf, 256, self.device), "cuDeviceGetName")
        return buf.value.decode(errors="replace")

    def compute_capability(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                                  self.device), "cuDeviceGetAttribute")
        self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                                                  self.device), "cuDeviceGetAttribute")
        return f"{major.value}.{minor.value}"

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(max(int(nbytes), 1))), "cuMemAlloc")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self._check(self.lib.cuMemFree_v2(ctypes.c_uint64(ptr)), "cuMemFree")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self._check(self.lib.cuStreamCreate(ctypes.byref(s), 0), "cuStreamCreate")
        return int(s.value or 0)

    def destroy_stream(self, stream: int) -> None:
        self._check(self.lib.cuStreamDestroy_v2(ctypes.c_void_p(stream)), "cuStreamDestroy")

    def to_device(self, dst: int, src: np.ndarray, stream: int) -> None:
        self._check(self.lib.cuMemcpyHtoDAsync_v2(ctypes.c_uint64(dst), ctypes.c_void_p(src.ctypes.data),
                                                  ctypes.c_size_t(src.nbytes), ctypes.c_void_p(stream)),
                    "cuMemcpyHtoDAsync")

    def to_host(self, dst: np.ndarray, src: int, stream: int) -> None:
        self._check(self.lib.cuMemcpyDtoHAsync_v2(ctypes.c_void_p(dst.ctypes.data), ctypes.c_uint64(src),
                                                  ctypes.c_size_t(dst.nbytes), ctypes.c_void_p(stream)),
                    "cuMemcpyDtoHAsync")

    def synchronize(self, stream: int) -> None:
        self._check(self.lib.cuStreamSynchronize(ctypes.c_void_p(stream)), "cuStreamSynchronize")

    def release(self) -> None:
        if self.context:
            self.lib.cuDevicePrimaryCtxRelease_v2(self.device)
            self.context = ctypes.c_void_p()


def tensorrt_importable() -> tuple[bool, str]:
    """(True, version) when the tensorrt Python package imports, else (False, why)."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA library that fails to load
        return False, f"tensorrt does not import ({first_line(e, with_type=True)})"
    return True, str(getattr(tensorrt, "__version__", "unknown"))


def import_tensorrt() -> Any:
    """`import tensorrt`, or a UserError that says how to get it."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or its CUDA libraries failing to load
        raise UserError(
            f"TensorRT is not available here ({first_line(e, with_type=True)}); "
            "install it with pip install 'mmap-deploy[tensorrt]' on a machine with an NVIDIA GPU, "
            f"or run the ONNX models ({spell('backend', 'onnxruntime')})"
        ) from None
    return trt


def current_target(device: int = 0, cuda: CudaDriver | None = None) -> dict[str, str]:
    """What an engine built here would be for: GPU name, compute capability, TensorRT version."""
    trt = import_tensorrt()
    cuda = cuda or CudaDriver(device)
    return {"gpu": cuda.name(), "compute_capability": cuda.compute_capability(), "tensorrt": str(trt.__version__)}


def check_engine_target(path: str | Path, recorded: dict[str, str], current: dict[str, str]) -> None:
    """Raise EngineMismatchError when an engine's recorded target differs from this machine's."""
    missing = [k for k in TARGET_FIELDS if not recorded.get(k)]
    if missing:
        raise EngineMismatchError(
            f"{path}: the manifest does not record the engine's {', '.join(missing)}; "
            "rebuild it with mmap-export --tensorrt on the GPU that will run it"
        )
    diffs = [f"{k} {recorded[k]!r} (here: {current.get(k)!r})" for k in TARGET_FIELDS
             if str(recorded[k]) != str(current.get(k))]
    if diffs:
        raise EngineMismatchError(
            f"{path}: TensorRT engine built for another target: {'; '.join(diffs)}. "
            f"Rebuild it here with mmap-export --tensorrt, or run the ONNX model with {spell('backend', 'onnxruntime')}"
        )


class TensorRTRunner(Runner):
    """A deserialised TensorRT engine with its execution context, buffers and stream.

    `target` is what the engine was built for (the manifest's record: GPU,
    compute capability, TensorRT version), checked against this machine
    before the engine is loaded. Device buffers are allocated once, for the
    optimisation profile's maximum shapes; `max_batch` is the profile's
    maximum batch, and `infer` splits larger batches into chunks of it.
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, *, target: dict[str, str], precision: str, device: int = 0):
        self.path = Path(path)
        self._buffers: dict[str, int] = {}
        self._stream = 0
        self._cuda: CudaDriver | None = None
        trt = import_tensorrt()
        self.precision = precision
        self._cuda = CudaDriver(device)
        here = current_target(device, self._cuda)
        check_engine_target(self.path, target, here)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise BundleError(f"{self.path}: TensorRT could not load this engine; rebuild it with mmap-export --tensorrt")
        self._context = self._engine.create_execution_context()
        self.providers = [f"TensorRT {trt.__version__}", here["gpu"]]
        self.inputs, self.output_names = [], []
        self._dtype: dict[str, np.dtype] = {}
        self._max_shape: dict[str, tuple[int, ...]] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            self._dtype[name] = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._max_shape[name] = tuple(self._engine.get_tensor_profile_shape(name, 0)[2])
                shape = tuple(d if d >= 0 else None for d in self._engine.get_tensor_shape(name))
                self.inputs.append(TensorSpec(name, self._dtype[name], shape, self._max_shape[name]))
            else:
                self.output_names.append(name)
        self.max_batch = min(s[0] for s in self._max_shape.values())
        # Output buffers: set the inputs to their maximum shapes and ask the context.
        for name in self.input_names:
            self._context.set_input_shape(name, self._max_shape[name])
        for name in self.output_names:
            self._max_shape[name] = tuple(self._context.get_tensor_shape(name))
        self._stream = self._cuda.stream()
        for name, shape in self._max_shape.items():
            nbytes = math.prod(shape) * self._dtype[name].itemsize
            self._buffers[name] = self._cuda.malloc(nbytes)
            self._context.set_tensor_address(name, self._buffers[name])

    @classmethod
    def from_bundle(cls, bundle: "Bundle", mf: "ModelFile", device: int = 0) -> "TensorRTRunner":
        """The engine `mf` of a loaded bundle, with the target and precision its manifest entry records."""
        return cls(bundle.path_of(mf), target=mf.target, precision=mf.precision, device=device)

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One chunk of at most `max_batch` spots, already checked by `Runner.infer`."""
        self._cuda.make_current()
        for name, value in feeds.items():
            value = np.ascontiguousarray(value)
            self._context.set_input_shape(name, value.shape)
            self._cuda.to_device(self._buffers[name], value, self._stream)
        outs = {k: np.empty(tuple(self._context.get_tensor_shape(k)), dtype=self._dtype[k])
                for k in self.output_names}
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeError(f"{self.path.name}: TensorRT execution failed")
        for name, out in outs.items():
            self._cuda.to_host(out, self._buffers[name], self._stream)
        self._cuda.synchronize(self._stream)
        return outs

    def close_impl(self) -> None:
        cuda = self._cuda
        if cuda is None:
            return
        self._context = None
        self._engine = None
        for ptr in self._buffers.values():
            cuda.free(ptr)
        self._buffers = {}
        if self._stream:
            cuda.destroy_stream(self._stream)
            self._stream = 0
        cuda.release()
        self._cuda = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
