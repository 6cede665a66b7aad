"""Build TensorRT engines for a bundle on the GPU that will run them.

Strongly typed networks: the precision comes from the ONNX file itself (the
fp16 ONNX written by `--fp16`, with LayerNorm/Softmax kept in fp32), not from
builder flags (TensorRT 11 removed `BuilderFlag.FP16`). One optimisation
profile covers the batch axis (min/opt/max, configurable) and, for the fusion
head, the bank length up to the manifest's longest bank. The builder's
workspace is capped, and a timing cache (a file next to the engines unless
given) makes rebuilds fast.

Each engine is recorded in the manifest with its target (GPU name, compute
capability, TensorRT version), which the runtime checks before loading it,
and with its parity against the fp32 ONNX model measured on this GPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mmap_deploy.atomic import atomic_path
from mmap_deploy.errors import UserError
from mmap_deploy.model.bundle import Bundle

from .bundle_writer import add_to_bundle
from .parity import ParityReference

log = logging.getLogger(__name__)

TIMING_CACHE_NAME = "tensorrt.timing-cache"


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes (spots per engine call) the engine is optimised for: min <= opt <= max."""

    min: int = 1
    opt: int = 32
    max: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise UserError(
                f"TensorRT batch profile must satisfy 1 <= min <= opt <= max, got "
                f"min={self.min} opt={self.opt} max={self.max}; fix --trt-batch"
            )

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        """'1,32,128' -> BatchProfile(1, 32, 128)."""
        try:
            lo, opt, hi = (int(v) for v in text.split(","))
        except ValueError:
            raise UserError(f"--trt-batch must be MIN,OPT,MAX (three integers, e.g. 1,32,128), got {text!r}") from None
        return cls(lo, opt, hi)


def input_profiles(manifest, batch: BatchProfile) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
    """Per role, per input: (min, opt, max) shapes for the optimisation profile."""
    v = manifest.view
    s, nv, d, g = v.input_size, v.n_views, manifest.embed_dim, len(manifest.genes)
    max_bank = manifest.prototypes.max_bank

    def shapes(*rest_min, rest_opt=None, rest_max=None):
        rest_opt = rest_opt or rest_min
        rest_max = rest_max or rest_min
        return ((batch.min, *rest_min), (batch.opt, *rest_opt), (batch.max, *rest_max))

    return {
        "encoder": {"views": shapes(nv, s, s, 3)},
        "fusion": {
            "f": shapes(d),
            "bank": shapes(1, d, rest_opt=(max_bank, d), rest_max=(max_bank, d)),
            "mask": shapes(1, rest_opt=(max_bank,), rest_max=(max_bank,)),
            "y1": shapes(g),
        },
    }


def cast_uint8_inputs_first(model) -> int:
    """Make a Cast to float32 the only consumer of each uint8 graph input, in place.

    The exported encoder transposes its uint8 views before casting them;
    TensorRT takes uint8 only as network I/O feeding a cast, so the cast moves
    to the front (Transpose and Shape give the same result on float32).
    The input stays uint8: the runtime still moves 4x fewer bytes. Returns the
    number of inputs changed.
    """
    import onnx
    from onnx import TensorProto, helper

    changed = 0
    for inp in model.graph.input:
        if inp.type.tensor_type.elem_type != TensorProto.UINT8:
            continue
        cast_out = f"{inp.name}__as_float32"
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name == inp.name:
                    node.input[i] = cast_out
        cast = helper.make_node("Cast", [inp.name], [cast_out], to=TensorProto.FLOAT, name=f"{inp.name}__cast")
        model.graph.node.insert(0, cast)
        changed += 1
    if changed:
        # intermediate tensors recorded as uint8 are float32 now: let the types be inferred
        keep = [v for v in model.graph.value_info if v.type.tensor_type.elem_type != TensorProto.UINT8]
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
        onnx.checker.check_model(model)
    return changed


def build_engine(onnx_path: Path, engine_path: Path, profile: dict[str, tuple[tuple[int, ...], ...]], *,
                 workspace_bytes: int, timing_cache: Path | None = None) -> float:
    """Parse `onnx_path` into a strongly typed network and write the serialised engine.

    Returns the build time in seconds. Raises UserError with the parser's
    messages when TensorRT cannot parse the model.
    """
    from mmap_deploy.engines.tensorrt import import_tensorrt

    trt = import_tensorrt()
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 11: always strongly typed, flag may be gone
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    import onnx

    model = onnx.load(str(onnx_path))
    cast_uint8_inputs_first(model)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT cannot parse this model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in profile:
            raise UserError(f"{onnx_path}: unexpected input {name!r}; re-export the bundle with mmap-export")
        lo, opt, hi = profile[name]
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    if timing_cache is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return time.perf_counter() - t0


def add_tensorrt(bundle: Bundle | str | Path, *, precision: str = "fp16", batch: BatchProfile = BatchProfile(),
                 workspace_gib: float = 4.0, timing_cache: Path | None = None, data_dir: Path | None = None,
                 device: int = 0, reference: ParityReference | None = None) -> dict[str, dict]:
    """Build `encoder.<precision>.engine` and `fusion.<precision>.engine` for this GPU into the bundle.

    `precision` picks the ONNX files the engines are built from (fp16: the
    strongly typed mixed-precision files from --fp16; fp32). Records target and
    parity (cosine vs the fp32 ONNX model on CPU, measured through the
    runtime's TensorRT runner) in the manifest; `reference` is the export's
    parity reference, else one is built from `data_dir`. Returns
    {role: {"seconds": build time, "parity": {...}, "target": {...}}}.
    """
    from mmap_deploy.engines.tensorrt import TensorRTRunner, current_target, import_tensorrt

    from .parity import PARITY_SPOTS
    from .reduced import as_bundle

    import_tensorrt()  # a clear message before any work when TensorRT is missing
    if precision not in ("fp16", "fp32"):
        raise UserError(f"TensorRT engines are built from fp16 or fp32 ONNX files, not {precision!r}")
    bundle = as_bundle(bundle)
    root = bundle.root
    target = current_target(device)
    cache = timing_cache if timing_cache is not None else root / TIMING_CACHE_NAME
    profiles = input_profiles(bundle.manifest, batch)
    ref = reference or ParityReference.build(bundle, data_dir, n=min(batch.max, PARITY_SPOTS))
    results: dict[str, dict] = {}
    for role in ("encoder", "fusion"):
        src = bundle.path_of(bundle.select(role, precision, "onnx"))
        engine = root / f"{role}.{precision}.engine"
        seconds = build_engine(src, engine, profiles[role], workspace_bytes=int(workspace_gib * (1 << 30)),
                               timing_cache=cache)
        with TensorRTRunner(engine, target=target, precision=precision, device=device) as runner:
            parity = ref.measure(role, runner)
        parity["build_seconds"] = round(seconds, 2)
        engine_target = dict(target, batch_profile=f"{batch.min},{batch.opt},{batch.max}",
                             workspace_gib=f"{workspace_gib:g}")
        add_to_bundle(bundle, role, engine, precision=precision, fmt="tensorrt", target=engine_target, parity=parity)
        results[role] = {"seconds": seconds, "parity": parity, "target": engine_target}
    bundle.manifest.provenance[f"parity_inputs_tensorrt_{precision}"] = ref.inputs.source
    bundle.write_manifest()
    return results
