"""Reduced-precision conversions of ONNX models: fp16 (GPUs) and int8 (CPUs).

fp16: every float tensor becomes float16 except the graph inputs and outputs
(they stay float32, so the runtime feeds the same arrays) and the numerically
fragile ops in `FP16_KEEP_FP32` (LayerNormalization reduces over 1024 values,
Softmax exponentiates: both stay float32 with casts around them). LayerScale
is already folded into the weights by the fp32 export, so no 1e-5 factors
underflow.

int8: ONNX Runtime dynamic quantisation of the encoder (weights int8 per
output channel, activations quantised per batch at run time): no calibration
set needed, and what the CPU execution provider runs fastest.

Adding the converted files to a bundle, once they pass parity against fp32,
is `mmap_export.reduced`'s job; measuring parity is `mmap_export.parity`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmap_deploy.atomic import atomic_path

FP16_KEEP_FP32 = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Exp")


def topological_sort(graph) -> None:
    """Order a graph's nodes so each comes after the producers of its inputs (stable), in place.

    ONNX requires it (the checker and TensorRT's parser insist); the fp16
    converter appends its Cast nodes at the end of the list.
    """
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a dangling input near node {rest[0].name!r}")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def convert_fp16(src: Path, dst: Path, keep_fp32: tuple[str, ...] = FP16_KEEP_FP32) -> None:
    """Write an fp16 copy of the ONNX model `src` to `dst`, with float32 inputs/outputs kept.

    Uses ONNX Runtime's converter (it keeps an initializer float32 where an fp32
    op shares it, which the exporter's deduplication of equal constants needs).
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    model16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_fp32))
    topological_sort(model16.graph)
    onnx.checker.check_model(model16)
    with atomic_path(dst) as tmp:
        onnx.save(model16, str(tmp))


def quantize_int8(src: Path, dst: Path) -> None:
    """Write an int8 (dynamically quantised, per-channel weights) copy of `src` to `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # reduce_range: 7-bit weights. On CPUs with AVX2 but no VNNI, ONNX Runtime's
    # u8s8 kernel (VPMADDUBSW) saturates with full-range weights, and the int8
    # encoder drifts well below the parity bar there; 7-bit weights keep it
    # accurate on every x86 CPU, and a bundle runs on machines its maker never saw.
    # The quantiser logs a "run pre-processing" hint and a warning for the
    # uint8 input it does not quantise: noise to a user.
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with atomic_path(dst) as tmp:
            quantize_dynamic(src, tmp, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                             op_types_to_quantize=["MatMul", "Gemm"],
                             extra_options={"MatMulConstBOnly": True})
    finally:
        logging.getLogger().setLevel(level)
