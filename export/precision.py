"""Reduced-precision model files for a bundle: fp16 ONNX (GPUs) and int8 ONNX (CPUs).

fp16: every float tensor becomes float16 except the graph inputs and outputs
(they stay float32, so the runtime feeds the same arrays) and the numerically
fragile ops in `FP16_KEEP_FP32` (LayerNormalization reduces over 1024 values,
Softmax exponentiates: both stay float32 with casts around them). LayerScale
is already folded into the weights by the fp32 export, so no 1e-5 factors
underflow.

int8: ONNX Runtime dynamic quantisation of the encoder (weights int8 per
output channel, activations quantised per batch at run time): no calibration
set needed, and what the CPU execution provider runs fastest.

Every file added is measured against the fp32 model before it is recorded:
per-spot cosine of each output on real her2st patches when the data folder is
given (random uint8 views otherwise; the manifest says which), and a file
below the required cosine is not written.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmap_deploy.bundle import Bundle, load_bundle
from mmap_deploy.errors import UserError
from mmap_deploy.preprocess import ViewSpec, make_views

from .bundle_writer import add_file

log = logging.getLogger(__name__)

FP16_KEEP_FP32 = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Exp")
FP16_MIN_COSINE = 0.999
INT8_MIN_COSINE = 0.99
PARITY_SPOTS = 24
# Resolution of the her2st full-resolution images (200 µm spot pitch = ~273 px);
# the JPEGs carry no mpp metadata.
HER2ST_MPP = 0.73


class ParityError(UserError):
    """A reduced-precision model disagrees with fp32 more than allowed; nothing was written."""


@dataclass
class ParityInputs:
    """Encoder inputs for a parity check and a sentence saying what they are."""

    views: np.ndarray  # (N, V, S, S, 3) uint8
    source: str
    real: bool


def her2st_parity_views(data_dir: Path, spec: ViewSpec, n: int = PARITY_SPOTS) -> ParityInputs:
    """Views of `n` real spots of the first her2st section with an image in `data_dir`.

    `data_dir` holds `her2st/images/{section}.jpg` and
    `her2st/spots/{section}_selection.tsv` (the layout of the project's data
    folder). Spots are taken evenly along the spot table: deterministic.
    """
    from mmap_deploy.coords import read_coords
    from mmap_deploy.slide import open_slide

    root = Path(data_dir)
    her2st = root / "her2st" if (root / "her2st").is_dir() else root
    images = sorted((her2st / "images").glob("*.jpg"))
    if not images:
        raise UserError(
            f"{her2st}: no her2st images (images/*.jpg) for parity patches; "
            "pass the data folder that holds her2st/, or leave --parity-data out to use random views"
        )
    image = images[0]
    section = image.stem
    coords_path = her2st / "spots" / f"{section}_selection.tsv"
    if not coords_path.is_file():
        raise UserError(f"{coords_path}: spot table for {image.name} not found; the her2st folder is incomplete")
    spots = read_coords(coords_path)
    pick = np.linspace(0, len(spots) - 1, num=min(n, len(spots))).round().astype(int)
    slide = open_slide(image, mpp=HER2ST_MPP)
    try:
        views = np.stack([make_views(slide.read_patch(*spots.xy[i], spec), spec) for i in pick])
    finally:
        slide.close()
    return ParityInputs(views, f"her2st {section}: {len(pick)} real spots", True)


def random_parity_views(spec: ViewSpec, n: int = PARITY_SPOTS, seed: int = 0) -> ParityInputs:
    """Random uint8 views: the parity inputs when no real data is at hand."""
    rng = np.random.default_rng(seed)
    views = rng.integers(0, 256, (n, spec.n_views, spec.input_size, spec.input_size, 3), dtype=np.uint8)
    return ParityInputs(views, f"random uint8 views ({n} spots; no real data given)", False)


def parity_inputs(spec: ViewSpec, data_dir: Path | None, n: int = PARITY_SPOTS) -> ParityInputs:
    """Real her2st views when `data_dir` is given, else random views."""
    if data_dir is not None:
        return her2st_parity_views(data_dir, spec, n)
    return random_parity_views(spec, n)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two (N, D) arrays, in float64."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-30)


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _run(path: Path, feeds: dict[str, np.ndarray], batch: int = 8) -> dict[str, np.ndarray]:
    """Run a model on CPU in batches of `batch` spots; outputs by name."""
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    n = next(iter(feeds.values())).shape[0]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for i in range(0, n, batch):
        outs = sess.run(names, {k: v[i : i + batch] for k, v in feeds.items()})
        for k, o in zip(names, outs):
            parts[k].append(o)
    return {k: np.concatenate(v) for k, v in parts.items()}


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    """Parity numbers: min and mean per-spot cosine of every output, and their overall minimum."""
    out: dict[str, float] = {}
    for name in ref:
        cos = cosine_rows(ref[name], got[name])
        out[f"cosine_{name}_min"] = float(cos.min())
        out[f"cosine_{name}_mean"] = float(cos.mean())
        out[f"max_abs_diff_{name}"] = float(np.abs(ref[name] - got[name]).max())
    out["cosine_min"] = min(v for k, v in out.items() if k.endswith("_min") and k.startswith("cosine_"))
    return out


def fusion_feeds(bundle: Bundle, f: np.ndarray, y1: np.ndarray) -> dict[str, np.ndarray]:
    """Fusion inputs from encoder outputs: each spot's prototype bank from k-means on `f`."""
    from mmap_deploy.prototypes import slide_prototypes

    rule = bundle.manifest.prototypes
    protos = slide_prototypes(f, rule)
    # up to two padded, masked slots (parity covers the masking too), never past
    # the longest bank a TensorRT profile is built for
    bank, mask = protos.banks(f, pad_to=min(protos.l + 2, max(protos.l, rule.max_bank)))
    return {"f": f, "bank": bank, "mask": mask, "y1": y1}


def _atomic_save(model, path: Path) -> None:
    import onnx

    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a bundle is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    _atomic_save(model16, dst)


def quantize_int8(src: Path, dst: Path) -> None:
    """Write an int8 (dynamically quantised, per-channel weights) copy of `src` to `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".onnx.tmp", dir=dst.parent)
    os.close(fd)
    try:
        # The quantiser logs a "run pre-processing" hint and a warning for the
        # uint8 input it does not quantise: noise to a user.
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            quantize_dynamic(src, tmp, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"],
                             extra_options={"MatMulConstBOnly": True})
        finally:
            logging.getLogger().setLevel(level)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _record_inputs(bundle: Bundle, precision: str, inputs: ParityInputs) -> None:
    bundle.manifest.provenance[f"parity_inputs_{precision}"] = inputs.source


def _check(precision: str, role: str, parity: dict[str, float], minimum: float, path: Path) -> None:
    if parity["cosine_min"] < minimum:
        raise ParityError(
            f"{path.name}: {precision} {role} output cosine vs fp32 is {parity['cosine_min']:.5f}, "
            f"below the required {minimum}; the file was not added. Keep using the fp32 model, "
            "or lower the requirement with --min-cosine if you accept the difference"
        )


def add_fp16(bundle_dir: str | Path, data_dir: Path | None = None, *, min_cosine: float = FP16_MIN_COSINE,
             n_spots: int = PARITY_SPOTS) -> dict[str, dict[str, float]]:
    """Add `encoder.fp16.onnx` and `fusion.fp16.onnx` to a bundle, with parity vs fp32.

    Returns the parity numbers per role. Raises ParityError (writing nothing to
    the manifest) when a model's minimum cosine is below `min_cosine`.
    """
    bundle = load_bundle(bundle_dir)
    root = bundle.root
    inputs = parity_inputs(bundle.manifest.view, data_dir, n_spots)
    enc32 = bundle.path_of(bundle.select("encoder"))
    fus32 = bundle.path_of(bundle.select("fusion"))
    enc16, fus16 = root / "encoder.fp16.onnx", root / "fusion.fp16.onnx"
    # converted into temporary names; renamed in place only once both pass
    tmp16 = {p: p.with_name(f".{p.name}.tmp") for p in (enc16, fus16)}
    results: dict[str, dict[str, float]] = {}
    try:
        convert_fp16(enc32, tmp16[enc16])
        ref = _run(enc32, {"views": inputs.views})
        results["encoder"] = compare_outputs(ref, _run(tmp16[enc16], {"views": inputs.views}))
        _check("fp16", "encoder", results["encoder"], min_cosine, enc16)
        convert_fp16(fus32, tmp16[fus16])
        feeds = fusion_feeds(bundle, ref["f"], ref["y1"])
        results["fusion"] = compare_outputs(_run(fus32, feeds), _run(tmp16[fus16], feeds))
        _check("fp16", "fusion", results["fusion"], min_cosine, fus16)
        for final, tmp in tmp16.items():
            os.replace(tmp, final)
    finally:
        for tmp in tmp16.values():
            tmp.unlink(missing_ok=True)
    for role, path in (("encoder", enc16), ("fusion", fus16)):
        parity = dict(results[role], n_spots=float(len(inputs.views)), real_patches=float(inputs.real))
        add_file(bundle.manifest, root, role, path, precision="fp16", fmt="onnx", parity=parity)
    _record_inputs(bundle, "fp16", inputs)
    bundle.manifest.write(root)
    return results


def add_int8(bundle_dir: str | Path, data_dir: Path | None = None, *, min_cosine: float = INT8_MIN_COSINE,
             n_spots: int = PARITY_SPOTS) -> dict[str, float]:
    """Add `encoder.int8.onnx` (for CPUs) to a bundle, with parity vs fp32.

    Only the encoder is quantised: it is nearly all of the work, and the
    runtime runs the small fusion head from its fp32 file. Raises ParityError
    (writing nothing) when the minimum cosine is below `min_cosine`.
    """
    bundle = load_bundle(bundle_dir)
    root = bundle.root
    inputs = parity_inputs(bundle.manifest.view, data_dir, n_spots)
    enc32 = bundle.path_of(bundle.select("encoder"))
    enc8 = root / "encoder.int8.onnx"
    tmp8 = enc8.with_name(f".{enc8.name}.tmp")
    try:
        quantize_int8(enc32, tmp8)
        parity = compare_outputs(_run(enc32, {"views": inputs.views}), _run(tmp8, {"views": inputs.views}))
        _check("int8", "encoder", parity, min_cosine, enc8)
        os.replace(tmp8, enc8)
    finally:
        tmp8.unlink(missing_ok=True)
    parity = dict(parity, n_spots=float(len(inputs.views)), real_patches=float(inputs.real))
    add_file(bundle.manifest, root, "encoder", enc8, precision="int8", fmt="onnx", parity=parity)
    _record_inputs(bundle, "int8", inputs)
    bundle.manifest.write(root)
    return parity
