"""The model bundle: a directory with `manifest.json` and the model files it names.

The manifest is the contract between export and runtime. This module is its
one schema: `Manifest.to_json` writes it (export) and `load_bundle` reads and
checks it (runtime). The runtime trusts nothing in a bundle: format version,
file hashes, paths staying inside the bundle, and value types are all checked,
and every problem is reported with the file and the fix.

`load_bundle` checks the manifest and that every listed file is there; a
model file's sha256 is checked when a run first asks for the file
(`Bundle.path_of`), once, so a run hashes only the files it opens (an fp32
CPU run never reads the bundle's fp16, int8 or TensorRT files). The training
summary behind familiarity (`familiarity.npz`, optional) is checked the same
way when `Bundle.familiarity()` first reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..errors import BundleError
from ..options import PRECISIONS, spell
from .familiarity import FamiliaritySummary, read_summary
from .neighbours import NeighbourSmoothing
from .preprocess import ViewSpec
from .prototypes import PrototypeRule

FORMAT = "mmap-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ROLES = ("encoder", "fusion")
FILE_FORMATS = ("onnx", "tensorrt")
HEAD_AVERAGES = ("reference", "paper")


@dataclass
class ModelFile:
    """One model file of a bundle.

    `target` describes what a TensorRT engine was built for (gpu name,
    compute capability, TensorRT version); empty for ONNX files.
    `parity` holds measured agreement with the fp32 model (e.g. cosine).
    `external_data` names the weights file of an ONNX model saved with external
    data (models over protobuf's 2 GB limit, e.g. UNI with one encoder per
    view); empty otherwise.
    """

    role: str
    path: str
    sha256: str
    precision: str = "fp32"
    format: str = "onnx"
    target: dict[str, str] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    external_data: str = ""
    external_sha256: str = ""


@dataclass
class SummaryFile:
    """The training summary behind familiarity (`model.familiarity`): its file, sha256 and what it is."""

    path: str
    sha256: str
    about: dict[str, Any] = field(default_factory=dict)  # method, centroids, training spots (information)


@dataclass
class Manifest:
    genes: list[str]
    embed_dim: int
    view: ViewSpec
    prototypes: PrototypeRule
    query_view: int = 2
    head_average: str = "reference"
    backbone: str = "tiny"
    files: list[ModelFile] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    demo: bool = False
    # the smoothing of predictions over each spot's neighbours; None (no manifest entry): none
    neighbours: NeighbourSmoothing | None = None
    # the training summary behind obs['mmap_familiarity']; None (no manifest entry): none
    familiarity: SummaryFile | None = None

    # -- writing -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        v = self.view
        # written only when there is one: a bundle without it reads as before
        smoothing = {"neighbour_smoothing": self.neighbours.to_dict()} if self.neighbours is not None else {}
        familiarity = {"familiarity": asdict(self.familiarity)} if self.familiarity is not None else {}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "demo": self.demo,
            "genes": list(self.genes),
            "embed_dim": self.embed_dim,
            "backbone": self.backbone,
            "input_size": v.input_size,
            "patch_um": v.patch_um,
            "mpp": v.mpp,
            "views": [{"crop_fraction": c} for c in v.crop_fractions],
            "normalisation": {"mean": list(v.mean), "std": list(v.std)},
            "prototypes": asdict(self.prototypes),
            "query_view": self.query_view,
            "head_average": self.head_average,
            **smoothing,
            "files": [asdict(f) for f in self.files],
            **familiarity,
            "provenance": self.provenance,
        }

    def write(self, bundle_dir: str | Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_NAME
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def model_file(self, role: str, precision: str = "fp32", fmt: str = "onnx") -> ModelFile | None:
        for f in self.files:
            if f.role == role and f.precision == precision and f.format == fmt:
                return f
        return None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- reading ---------------------------------------------------------------
class _Reader:
    """Typed access to the manifest's fields, each failure naming the field."""

    def __init__(self, data: Any, source: Path):
        self.source = source
        if not isinstance(data, dict):
            self.fail("the top level must be a JSON object")
        self.data = data

    def fail(self, what: str) -> None:
        raise BundleError(f"{self.source}: {what}; re-export the bundle with mmap-export")

    def get(self, key: str, kind: type | tuple[type, ...], obj: dict | None = None, where: str = "") -> Any:
        obj = self.data if obj is None else obj
        name = f"{where}{key}"
        if key not in obj:
            self.fail(f"missing field '{name}'")
        value = obj[key]
        # bool is an int in Python; do not let true pass as a number
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.fail(f"field '{name}' has the wrong type (bool)")
        if not isinstance(value, kind):
            self.fail(f"field '{name}' has the wrong type ({type(value).__name__})")
        return value

    def number(self, key: str, obj: dict | None = None, where: str = "", positive: bool = True) -> float:
        value = float(self.get(key, (int, float), obj, where))
        if not math.isfinite(value) or (positive and value <= 0):
            self.fail(f"field '{where}{key}' must be a positive finite number, got {value}")
        return value

    def integer(self, key: str, obj: dict | None = None, where: str = "", minimum: int = 1) -> int:
        value = self.get(key, int, obj, where)
        if value < minimum:
            self.fail(f"field '{where}{key}' must be >= {minimum}, got {value}")
        return value


def _read_view(r: _Reader) -> ViewSpec:
    """The views' crop fractions, the normalisation and the patch geometry."""
    views = r.get("views", list)
    if not 1 <= len(views) <= 8 or not all(isinstance(v, dict) for v in views):
        r.fail("'views' must be a list of 1 to 8 objects")
    fractions = tuple(r.number("crop_fraction", v, f"views[{i}].") for i, v in enumerate(views))
    if any(c > 1 for c in fractions):
        r.fail("each 'views[].crop_fraction' must be in (0, 1]")
    norm = r.get("normalisation", dict)
    mean = r.get("mean", list, norm, "normalisation.")
    std = r.get("std", list, norm, "normalisation.")
    for name, vals in (("mean", mean), ("std", std)):
        if len(vals) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            r.fail(f"'normalisation.{name}' must be three numbers")
    if any(s <= 0 for s in std):
        r.fail("'normalisation.std' must be positive")
    return ViewSpec(
        patch_um=r.number("patch_um"),
        mpp=r.number("mpp"),
        input_size=r.integer("input_size", minimum=8),
        crop_fractions=fractions,
        mean=tuple(float(x) for x in mean),
        std=tuple(float(x) for x in std),
    )


def _read_prototypes(r: _Reader) -> PrototypeRule:
    """The K rule (min, max, divisor) and L (ratio or fixed)."""
    p = r.get("prototypes", dict)
    rule = PrototypeRule(
        k_min=r.integer("k_min", p, "prototypes."),
        k_max=r.integer("k_max", p, "prototypes."),
        k_divisor=r.integer("k_divisor", p, "prototypes."),
        l_ratio=r.number("l_ratio", p, "prototypes."),
        l_fixed=r.integer("l_fixed", p, "prototypes.", minimum=0),
    )
    if rule.k_min > rule.k_max:
        r.fail("'prototypes.k_min' is larger than 'prototypes.k_max'")
    return rule


def _read_neighbours(r: _Reader) -> NeighbourSmoothing | None:
    """The neighbour smoothing (radius in µm, weight), or None for a manifest without one."""
    if "neighbour_smoothing" not in r.data:
        return None
    p = r.get("neighbour_smoothing", dict)
    weight = r.number("weight", p, "neighbour_smoothing.", positive=False)
    if weight < 0:
        r.fail(f"field 'neighbour_smoothing.weight' must be 0 (no smoothing) or more, got {weight}")
    return NeighbourSmoothing(radius_um=r.number("radius_um", p, "neighbour_smoothing."), weight=weight)


def _read_familiarity(r: _Reader) -> SummaryFile | None:
    """The training summary's entry (path, sha256, about), or None for a manifest without one."""
    if "familiarity" not in r.data:
        return None
    p = r.get("familiarity", dict)
    sf = SummaryFile(path=r.get("path", str, p, "familiarity."), sha256=r.get("sha256", str, p, "familiarity."),
                     about=r.get("about", dict, p, "familiarity.") if "about" in p else {})
    if len(sf.sha256) != 64 or any(ch not in "0123456789abcdef" for ch in sf.sha256):
        r.fail("'familiarity.sha256' is not a sha256 hex digest")
    return sf


def _read_file(r: _Reader, i: int, entry: Any) -> ModelFile:
    """One entry of 'files': a model file, its hash, precision and format."""
    where = f"files[{i}]."
    if not isinstance(entry, dict):
        r.fail(f"'files[{i}]' must be an object")
    mf = ModelFile(
        role=r.get("role", str, entry, where),
        path=r.get("path", str, entry, where),
        sha256=r.get("sha256", str, entry, where),
        precision=r.get("precision", str, entry, where),
        format=r.get("format", str, entry, where),
        target={str(k): str(v) for k, v in r.get("target", dict, entry, where).items()},
        parity={str(k): float(v) for k, v in r.get("parity", dict, entry, where).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)},
        external_data=r.get("external_data", str, entry, where) if "external_data" in entry else "",
        external_sha256=r.get("external_sha256", str, entry, where) if "external_sha256" in entry else "",
    )
    if mf.role not in ROLES:
        r.fail(f"'{where}role' must be one of {', '.join(ROLES)}, got {mf.role!r}")
    if mf.precision not in PRECISIONS:
        r.fail(f"'{where}precision' must be one of {', '.join(PRECISIONS)}, got {mf.precision!r}")
    if mf.format not in FILE_FORMATS:
        r.fail(f"'{where}format' must be one of {', '.join(FILE_FORMATS)}, got {mf.format!r}")
    for key in ("sha256", "external_sha256") if mf.external_data else ("sha256",):
        digest = getattr(mf, key)
        if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
            r.fail(f"'{where}{key}' is not a sha256 hex digest")
    return mf


def _read_files(r: _Reader) -> list[ModelFile]:
    """The model files; an fp32 ONNX file of each role must be among them."""
    files = [_read_file(r, i, entry) for i, entry in enumerate(r.get("files", list))]
    for role in ROLES:
        if not any(f.role == role and f.format == "onnx" and f.precision == "fp32" for f in files):
            r.fail(f"no fp32 ONNX '{role}' file is listed")
    return files


def parse_manifest(data: Any, source: Path) -> Manifest:
    """Validate a decoded manifest and build a `Manifest`; raise BundleError naming the problem."""
    r = _Reader(data, source)
    if r.get("format", str) != FORMAT:
        r.fail(f"'format' is {data.get('format')!r}, expected {FORMAT!r}: this is not an MMAP bundle")
    version = r.get("format_version", int)
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{source}: bundle format version {version} is not supported by this mmap-deploy "
            f"(it reads version {FORMAT_VERSION}); upgrade mmap-deploy or re-export the bundle"
        )
    genes = r.get("genes", list)
    if not genes or not all(isinstance(g, str) and g for g in genes):
        r.fail("'genes' must be a non-empty list of gene names")
    if len(set(genes)) != len(genes):
        r.fail("'genes' has duplicate names")
    view = _read_view(r)
    rule = _read_prototypes(r)
    fractions = view.crop_fractions
    query_view = r.get("query_view", int)
    if not 0 <= query_view < len(fractions):
        r.fail(f"'query_view' must index one of the {len(fractions)} views, got {query_view}")
    head_average = r.get("head_average", str)
    if head_average not in HEAD_AVERAGES:
        r.fail(f"'head_average' must be one of {', '.join(HEAD_AVERAGES)}, got {head_average!r}")
    files = _read_files(r)
    provenance = r.get("provenance", dict)
    return Manifest(
        genes=list(genes),
        embed_dim=r.integer("embed_dim"),
        view=view,
        prototypes=rule,
        query_view=query_view,
        head_average=head_average,
        backbone=r.get("backbone", str),
        files=files,
        provenance=provenance,
        demo=r.get("demo", bool),
        neighbours=_read_neighbours(r),
        familiarity=_read_familiarity(r),
    )


@dataclass
class Bundle:
    """A bundle whose manifest has been checked; its model files are checked as they are used.

    `path_of(mf)` is how code reaches a model file: the first time, the file
    (and its external data) is hashed against the manifest, a BundleError
    naming the file when it differs; later calls reuse that result.
    `hashed` lists, in order, the files hashed so far (each appears once).
    """

    root: Path
    manifest: Manifest
    manifest_sha256: str = ""
    verify_hashes: bool = True
    hashed: list[str] = field(default_factory=list)
    _verified: set[str] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _summary: list[FamiliaritySummary | None] = field(default_factory=list, repr=False)  # read once, kept

    def path_of(self, mf: ModelFile) -> Path:
        """The path of model file `mf`, its sha256 checked against the manifest on first use."""
        if self.verify_hashes:
            with self._lock:  # two threads asking for one file hash it once
                for rel, digest in _listed(mf):
                    if rel not in self._verified:
                        self._verify(rel, digest)
        return self.root / mf.path

    def _verify(self, rel: str, digest: str) -> None:
        fp = self.root / rel
        got = sha256_file(fp)
        self.hashed.append(rel)
        if got != digest:
            raise BundleError(
                f"{fp}: sha256 {got[:12]}… does not match the manifest's {digest[:12]}…; "
                "the file is damaged or was changed; copy or re-export the bundle"
            )
        self._verified.add(rel)

    def familiarity(self) -> FamiliaritySummary | None:
        """The training summary behind familiarity, read and checked on first use; None without one.

        Its sha256 is checked against the manifest as a model file's is (a
        BundleError naming the file when it differs), and its width against
        the model's embeddings.
        """
        sf = self.manifest.familiarity
        if sf is None:
            return None
        with self._lock:
            if not self._summary:
                if self.verify_hashes and sf.path not in self._verified:
                    self._verify(sf.path, sf.sha256)
                self._summary.append(read_summary(self.root / sf.path, self.manifest.embed_dim))
            return self._summary[0]

    def add_verified(self, mf: ModelFile) -> None:
        """Record that `mf`'s files were hashed as they were written (export), so use does not hash them again."""
        with self._lock:
            self._verified.update(rel for rel, _ in _listed(mf))

    def select(self, role: str, precision: str = "fp32", fmt: str = "onnx") -> ModelFile:
        mf = self.manifest.model_file(role, precision, fmt)
        if mf is None:
            have = ", ".join(f"{f.role}:{f.precision}:{f.format}" for f in self.manifest.files)
            hint = {"fp16": "mmap-export --fp16", "int8": "mmap-export --int8"}.get(precision, "mmap-export")
            if fmt == "tensorrt":
                hint = "mmap-export --tensorrt on the GPU that will run it"
            raise BundleError(
                f"{self.root}: no {precision} {fmt} {role} in this bundle (it has {have}); add one with {hint}"
            )
        return mf

    def write_manifest(self) -> Path:
        """Write the (changed) manifest into the bundle; `sha256()` then identifies the new one."""
        path = self.manifest.write(self.root)
        self.manifest_sha256 = sha256_file(path)
        return path

    def sha256(self) -> str:
        """Hash of the manifest file as loaded (or last written): identifies the bundle in provenance."""
        return self.manifest_sha256


def _listed(mf: ModelFile) -> list[tuple[str, str]]:
    """(path, sha256) of a model file and, when it has one, of its external data."""
    return [(mf.path, mf.sha256)] + ([(mf.external_data, mf.external_sha256)] if mf.external_data else [])


def _resolve_inside(root: Path, rel: str, manifest_path: Path) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        raise BundleError(
            f"{manifest_path}: model file path {rel!r} leaves the bundle directory; "
            "paths must be relative names inside the bundle"
        )
    resolved = (root / p).resolve()
    if root.resolve() not in resolved.parents:
        raise BundleError(f"{manifest_path}: model file path {rel!r} resolves outside the bundle directory")
    return resolved


def load_bundle(path: str | Path, verify_hashes: bool = True) -> Bundle:
    """Read and check a bundle directory; raise BundleError with the fix on any problem.

    The manifest is checked in full, and every file it lists must lie inside
    the bundle and exist. Hashes are checked when files are used (see
    `Bundle.path_of`); `verify_hashes=False` skips them (benchmarks).
    """
    root = Path(path)
    if root.is_file() and root.name == MANIFEST_NAME:
        root = root.parent
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"{root}: model bundle directory not found; pass {spell('model', 'DIR')} made by mmap-export")
    if not manifest_path.is_file():
        raise BundleError(f"{root}: no {MANIFEST_NAME} in this directory; it is not a bundle made by mmap-export")
    raw = manifest_path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{manifest_path}: not valid JSON ({e}); re-export the bundle with mmap-export") from None
    manifest = parse_manifest(data, manifest_path)
    listed = [rel for mf in manifest.files for rel, _ in _listed(mf)]
    for rel in listed + ([manifest.familiarity.path] if manifest.familiarity is not None else []):
        fp = _resolve_inside(root, rel, manifest_path)
        if not fp.is_file():
            raise BundleError(f"{manifest_path}: lists {rel} but {fp} does not exist; copy the whole bundle directory")
    return Bundle(root=root, manifest=manifest, manifest_sha256=hashlib.sha256(raw).hexdigest(),
                  verify_hashes=verify_hashes)


def default_bundle_path() -> Path:
    """The small demo bundle shipped inside the package (a tiny model; not for real use)."""
    return Path(__file__).resolve().parents[1] / "demo" / "bundle"
