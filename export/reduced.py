"""Reduced-precision files added to a bundle: fp16 ONNX (GPUs) and int8 ONNX (CPUs).

Each file is converted (`mmap_export.precision`) into a temporary name,
measured against the fp32 model through the runtime's runners
(`mmap_export.parity`), and only when it passes renamed into the bundle and
recorded in the manifest with its parity numbers. A file below the required
cosine is not written.
"""

from __future__ import annotations

from pathlib import Path

from mmap_deploy.atomic import atomic_path
from mmap_deploy.engines import OnnxRuntimeRunner
from mmap_deploy.model.bundle import Bundle, load_bundle

from .bundle_writer import add_to_bundle
from .parity import FP16_MIN_COSINE, INT8_MIN_COSINE, PARITY_SPOTS, ParityReference, check_parity
from .precision import convert_fp16, quantize_int8


def as_bundle(bundle: Bundle | str | Path) -> Bundle:
    """A loaded bundle as it is, or the bundle at a path, loaded and checked."""
    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle)


def add_fp16(bundle: Bundle | str | Path, data_dir: Path | None = None, *, min_cosine: float = FP16_MIN_COSINE,
             n_spots: int = PARITY_SPOTS, reference: ParityReference | None = None) -> dict[str, dict[str, float]]:
    """Add `encoder.fp16.onnx` and `fusion.fp16.onnx` to a bundle, with parity vs fp32.

    `reference`: the parity reference to measure against (one export builds it
    once for every file it adds); by default one is built from `data_dir` and
    `n_spots`. Returns the parity numbers per role. Raises ParityError (writing
    nothing) when a model's minimum cosine is below `min_cosine`.
    """
    bundle = as_bundle(bundle)
    ref = reference or ParityReference.build(bundle, data_dir, n_spots)
    paths = {role: bundle.root / f"{role}.fp16.onnx" for role in ("encoder", "fusion")}
    results: dict[str, dict[str, float]] = {}
    # converted into temporary names; both renamed in place only once both pass
    with atomic_path(paths["encoder"]) as tmp_enc, atomic_path(paths["fusion"]) as tmp_fus:
        for role, tmp in (("encoder", tmp_enc), ("fusion", tmp_fus)):
            convert_fp16(bundle.path_of(bundle.select(role)), tmp)
            with OnnxRuntimeRunner(tmp, precision="fp16") as runner:
                results[role] = ref.measure(role, runner)
            check_parity("fp16", role, results[role], min_cosine, paths[role])
    for role, path in paths.items():
        add_to_bundle(bundle, role, path, precision="fp16", fmt="onnx", parity=results[role])
    bundle.manifest.provenance["parity_inputs_fp16"] = ref.inputs.source
    bundle.write_manifest()
    return results


def add_int8(bundle: Bundle | str | Path, data_dir: Path | None = None, *, min_cosine: float = INT8_MIN_COSINE,
             n_spots: int = PARITY_SPOTS, reference: ParityReference | None = None) -> dict[str, float]:
    """Add `encoder.int8.onnx` (for CPUs) to a bundle, with parity vs fp32.

    Only the encoder is quantised: it is nearly all of the work, and the
    runtime runs the small fusion head from its fp32 file. `reference` as for
    `add_fp16`. Raises ParityError (writing nothing) when the minimum cosine is
    below `min_cosine`.
    """
    bundle = as_bundle(bundle)
    ref = reference or ParityReference.build(bundle, data_dir, n_spots)
    enc8 = bundle.root / "encoder.int8.onnx"
    with atomic_path(enc8) as tmp:
        quantize_int8(bundle.path_of(bundle.select("encoder")), tmp)
        with OnnxRuntimeRunner(tmp, precision="int8") as runner:
            parity = ref.measure("encoder", runner)
        check_parity("int8", "encoder", parity, min_cosine, enc8)
    add_to_bundle(bundle, "encoder", enc8, precision="int8", fmt="onnx", parity=parity)
    bundle.manifest.provenance["parity_inputs_int8"] = ref.inputs.source
    bundle.write_manifest()
    return parity
