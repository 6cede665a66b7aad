"""Parity: how closely a reduced-precision model or a TensorRT engine agrees with the fp32 model.

Models run through the runtime's own runners (`mmap_deploy.engines`), as
`mmap-predict` runs them, so what is checked is what runs. A
`ParityReference` holds the inputs (views of real her2st spots when a data
folder is given, random uint8 views otherwise; the manifest says which) and
the fp32 models' outputs on them; one export builds it once and measures every
file it adds (fp16, int8, TensorRT) against it. The numbers: per-spot cosine of
each output (minimum and mean) and the largest absolute difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmap_deploy.engines import OnnxRuntimeRunner, Runner
from mmap_deploy.errors import UserError
from mmap_deploy.model.bundle import Bundle
from mmap_deploy.model.preprocess import ViewSpec, make_views

FP16_MIN_COSINE = 0.999
INT8_MIN_COSINE = 0.99
PARITY_SPOTS = 24
# Spots per engine call while measuring: a UNI-sized encoder on the CPU stays within memory.
PARITY_BATCH = 8


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
    from mmap_deploy.inputs.geometry import fallback_mpp, fit_lattice
    from mmap_deploy.inputs.layouts import read_spot_input
    from mmap_deploy.inputs.slide import open_slide

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
    spot_input = read_spot_input(coords_path)
    spots = spot_input.spots
    pick = np.linspace(0, len(spots) - 1, num=min(n, len(spots))).round().astype(int)
    # the JPEGs carry no resolution: the spot lattice's, as mmap-predict finds it
    fit = fit_lattice(spots.xy, spots.array_xy, spot_input.lattice)
    slide = open_slide(image, fallback_mpp=fallback_mpp(fit, None))
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
    """Fusion inputs from encoder outputs: each spot's prototype bank, by the runtime's prototype step."""
    from mmap_deploy.model.prototypes import slide_prototypes

    rule = bundle.manifest.prototypes
    protos = slide_prototypes(f, rule)
    # up to two padded, masked slots (parity covers the masking too), never past
    # the longest bank a TensorRT profile is built for
    bank, mask = protos.banks(f, pad_to=min(protos.l + 2, max(protos.l, rule.max_bank)))
    return {"f": f, "bank": bank, "mask": mask, "y1": y1}


class ParityReference:
    """The fp32 models' outputs on one set of parity inputs: what every added file is measured against.

    Each role's fp32 model runs (on the CPU, through `OnnxRuntimeRunner`) the
    first time its reference is needed, and only then; `fp32_runs` lists the
    roles run, in order. The fusion head's inputs are the fp32 encoder's
    outputs with their prototype banks.
    """

    def __init__(self, bundle: Bundle, inputs: ParityInputs):
        self.bundle = bundle
        self.inputs = inputs
        self.fp32_runs: list[str] = []
        self._feeds: dict[str, dict[str, np.ndarray]] = {"encoder": {"views": inputs.views}}
        self._outputs: dict[str, dict[str, np.ndarray]] = {}

    @classmethod
    def build(cls, bundle: Bundle, data_dir: Path | None, n: int = PARITY_SPOTS) -> "ParityReference":
        """Real her2st views when `data_dir` is given, else random views (see `parity_inputs`)."""
        return cls(bundle, parity_inputs(bundle.manifest.view, data_dir, n))

    def feeds(self, role: str) -> dict[str, np.ndarray]:
        if role not in self._feeds:
            enc = self.outputs("encoder")
            self._feeds[role] = fusion_feeds(self.bundle, enc["f"], enc["y1"])
        return self._feeds[role]

    def outputs(self, role: str) -> dict[str, np.ndarray]:
        if role not in self._outputs:
            path = self.bundle.path_of(self.bundle.select(role))
            with OnnxRuntimeRunner(path) as runner:
                self._outputs[role] = runner.infer(self.feeds(role), batch_size=PARITY_BATCH)
            self.fp32_runs.append(role)
        return self._outputs[role]

    def measure(self, role: str, runner: Runner) -> dict[str, float]:
        """`runner`'s parity with the fp32 `role` model, and how many spots (real or random) it was measured on."""
        got = runner.infer(self.feeds(role), batch_size=PARITY_BATCH)
        parity = compare_outputs(self.outputs(role), got)
        return dict(parity, n_spots=float(len(self.inputs.views)), real_patches=float(self.inputs.real))


def check_parity(precision: str, role: str, parity: dict[str, float], minimum: float, path: Path) -> None:
    """Raise ParityError when the minimum cosine is below `minimum`."""
    if parity["cosine_min"] < minimum:
        raise ParityError(
            f"{path.name}: {precision} {role} output cosine vs fp32 is {parity['cosine_min']:.5f}, "
            f"below the required {minimum}; the file was not added. Keep using the fp32 model, "
            "or lower the requirement with --min-cosine if you accept the difference"
        )
