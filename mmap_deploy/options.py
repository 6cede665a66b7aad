"""mmap-predict's options, each declared once: name, type, default, help, checks, and where it applies.

An option is a field of `Settings` whose metadata is an `Option`. From that
one declaration come:

- the command line: `cli.py` makes a click option of every field with a flag
  (`click_params`);
- the Python API: `Predictor(...)`, `Predictor.predict(...)`, `predict(...)`
  and `write(...)` take the fields of their scope by keyword, checked by the
  same `Kind` as the flag (`settings_from_api`; the functions' signatures are
  made from the fields too, `api_parameters`, `api_doc`);
- the batch manifest's columns: a field with a `column` may be set per slide
  in the manifest CSV (`manifest_columns`), read by the same `Kind`.

`Settings` is frozen: it is resolved once (`from_cli`, `settings_from_api`)
and then only copied with changes (`Settings.replace`, which checks the new
values again). What a run learns as it goes (the engines picked, the batch
size chosen for them) is kept apart, in `run.predict.RunState`.

Messages name an option as its caller spelled it: the flag (`--mpp`) on the
command line, the parameter (`mpp=`) from Python (`spell`, `caller`). The
cross-checks between options are one function, `check_options`, which the
CLI, the API and the batch all call.

Only the standard library and click's types are imported here (at call time):
`mmap-predict --help` stays instant.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from .location import Location

# -- who is asking: the spelling of option names in messages --------------------------------------
CLI, API = "cli", "api"
_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("mmap_caller", default=API)


@contextlib.contextmanager
def caller(name: str) -> Iterator[None]:
    """Inside the block, messages spell options for `name` (`CLI`: `--mpp`; `API`: `mpp=`)."""
    token = _CALLER.set(name)
    try:
        yield
    finally:
        _CALLER.reset(token)


def current_caller() -> str:
    """`CLI` or `API`: who messages are spelled for now."""
    return _CALLER.get()


def spell(name: str, value: object = None) -> str:
    """An option as the caller writes it: `--min-tissue 0.3` on the command line, `min_tissue=0.3` in Python.

    `name` is the field name (`min_tissue`); without `value`, the bare flag or `name=`.
    """
    spec = _OPTIONS.get(name)
    if _CALLER.get() == CLI and spec is not None and spec.flag:
        # as a shell would take it back: a value with spaces or quotes is quoted
        return spec.flag if value is None else f"{spec.flag} {shlex.quote(str(value))}"
    return f"{name}=" if value is None else f"{name}={value!r}"


# -- kinds: how a value is read and checked ------------------------------------------------------
class Kind:
    """How an option's value is read (from a command-line string or a Python value) and checked."""

    metavar: str = "TEXT"

    def parse(self, value: Any, name: str) -> Any:
        """The checked value; a `UserError` naming the option (`spell(name, value)`) otherwise."""
        raise NotImplementedError

    def click_type(self) -> Any:
        import click

        return click.STRING

    @staticmethod
    def refuse(name: str, value: Any, why: str) -> UserError:
        return UserError(f"{spell(name, value)}: {why}")


@dataclass(frozen=True)
class Number(Kind):
    """A float (or, with `whole`, an int) within bounds; text is parsed, bools and fractions for ints refused."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False
    unit: str = ""

    @property
    def metavar(self) -> str:  # type: ignore[override]
        return "N" if self.whole else "X"

    def _what(self) -> str:
        low = high = ""
        if self.low is not None:
            low = f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"
        if self.high is not None:
            high = f"below {self.high:g}" if self.high_open else f"at most {self.high:g}"
        bounds = " and ".join(b for b in (low, high) if b)
        what = "a whole number" if self.whole else "a number"
        return f"must be {what}" + (f", {bounds}" if bounds else "") + (f" ({self.unit})" if self.unit else "")

    def parse(self, value: Any, name: str) -> float | int:
        if isinstance(value, bool) or value is None:
            raise self.refuse(name, value, self._what())
        if isinstance(value, str):
            text = value.strip()
            try:
                number: float | int = int(text) if self.whole else float(text)
            except ValueError:
                raise self.refuse(name, value, self._what()) from None
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise self.refuse(name, value, self._what()) from None
            if self.whole:
                if not math.isfinite(number) or number != int(number):
                    raise self.refuse(name, value, self._what())
                number = int(number)
        if not math.isfinite(number):
            raise self.refuse(name, value, self._what())
        low_bad = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        high_bad = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if low_bad or high_bad:
            raise self.refuse(name, value, self._what())
        return number


@dataclass(frozen=True)
class Choice(Kind):
    """One of a few names."""

    values: tuple[str, ...]

    @property
    def metavar(self) -> str:  # type: ignore[override]
        return "[" + "|".join(self.values) + "]"

    def parse(self, value: Any, name: str) -> str:
        if not isinstance(value, str) or value not in self.values:
            raise self.refuse(name, value, f"must be one of {', '.join(self.values)}")
        return value

    def click_type(self) -> Any:
        import click

        return click.Choice(list(self.values))


@dataclass(frozen=True)
class Flag(Kind):
    """True or False (a command-line switch)."""

    metavar: str = ""

    def parse(self, value: Any, name: str) -> bool:
        if type(value).__name__ == "bool_":  # numpy's bool
            value = bool(value)
        if not isinstance(value, bool):
            raise self.refuse(name, value, "must be True or False")
        return value


@dataclass(frozen=True)
class Text(Kind):
    """A string, checked by `check` (which returns why it is refused, or "")."""

    check: Callable[[str], str] | None = None
    metavar: str = "TEXT"

    def parse(self, value: Any, name: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.refuse(name, value, "must be a non-empty string")
        why = self.check(value) if self.check is not None else ""
        if why:
            raise self.refuse(name, value, why)
        return value


@dataclass(frozen=True)
class Names(Kind):
    """Names separated by commas on the command line; a list (or one string) from Python. Duplicates dropped."""

    metavar: str = "NAME[,NAME...]"

    def parse(self, value: Any, name: str) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise self.refuse(name, value, "must be names separated by commas (or a list of names)")
        names = [v.strip() for v in items if v.strip()]
        if not names:
            raise self.refuse(name, value, "needs at least one name")
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class PathArg(Kind):
    """A local path or a URL (`location.as_location`); a missing one is refused when `must_exist`, a URL
    when `local_only`."""

    what: str = "file"
    must_exist: bool = False
    local_only: bool = False
    metavar: str = "PATH"

    def parse(self, value: Any, name: str) -> Location:
        from .location import RemotePath, as_location

        if not isinstance(value, (str, os.PathLike, RemotePath)) or not str(value):
            raise self.refuse(name, value, f"must be a path to a {self.what} (str or pathlib.Path)")
        path = as_location(value)
        if self.local_only and isinstance(path, RemotePath):
            raise self.refuse(name, str(path), f"must be a local {self.what}; copy it to local disk first")
        if self.must_exist and not path.exists():
            raise self.refuse(name, str(path), f"{self.what} not found; check the path")
        return path


@dataclass(frozen=True)
class Shard(Kind):
    """`i/n` with 0 <= i < n: the rows k with k % n == i."""

    metavar: str = "I/N"

    def parse(self, value: Any, name: str) -> tuple[int, int]:
        if isinstance(value, tuple) and len(value) == 2:
            i, n = value
        else:
            try:
                i_s, n_s = str(value).split("/")
                i, n = int(i_s), int(n_s)
            except ValueError:
                raise self.refuse(name, value, "must look like i/n (e.g. 0/4)") from None
        if not (isinstance(i, int) and isinstance(n, int)) or n < 1 or not 0 <= i < n:
            raise self.refuse(name, value, "needs 0 <= i < n (shards are numbered 0 to n-1)")
        return i, n


# -- the declaration ---------------------------------------------------------------------------
ENGINE, SLIDE, OUTPUT, BATCH = "engine", "slide", "output", "batch"


@dataclass(frozen=True)
class Option:
    """What one `Settings` field is to its users.

    `scope` says where it is given: `ENGINE` (`Predictor(...)`: the model and
    its engines), `SLIDE` (`Predictor.predict(...)`: one slide), `OUTPUT`
    (writing: `write(...)`), `BATCH` (the command line's batch only).
    `flag` is the command-line flag (None: not on the command line; "": made
    from the name); `api` whether Python callers give it; `column` the batch
    manifest column that sets it per slide; `applies_with` the option it is
    meaningless without (e.g. `min_tissue` needs `grid`).
    """

    kind: Kind
    help: str
    scope: str
    flag: str | None = ""
    short: str | None = None
    api: bool = True
    column: str | None = None
    applies_with: str | None = None
    cli_default: Any = None  # with cli_invert: the value the command line has when the switch is absent
    cli_invert: str | None = None  # a command-line switch that sets the field to False (--quiet)
    show_default: bool = True


def option(default: Any, kind: Kind, help: str, scope: str, **how: Any) -> Any:
    """A `Settings` field declared as an option (see `Option`)."""
    return field(default=default, metadata={"option": Option(kind, help, scope, **how)})


def _library_id_problem(value: str) -> str:
    # a key of uns['spatial'] (HDF5 and zarr read a '/' as a sub-group) and, in a batch, the output's file name
    bad = any(c in value for c in "/\\") or value in (".", "..")
    return "cannot contain '/' or '\\' or be '.' or '..'; use letters, digits, - and _" if bad else ""


BACKENDS = ("auto", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
SLIDE_READERS = ("auto", "openslide", "tifffile", "image")
OUTPUT_FORMATS = ("h5ad", "zarr", "geojson")
GEOJSON = "geojson"  # `applies_with` of the QuPath file's options: a .geojson output, not an option


@dataclass(frozen=True)
class Settings:
    """The settings of one run, resolved once. Each field is an option: see `Option`.

    Make them with `from_cli` or `settings_from_api`; change them only with
    `replace` (a new, checked object). `given` holds the names the caller set
    (the rest are defaults), for the checks that an option is not given
    without the one it applies with.
    """

    # -- the model and its engines (Predictor) --
    model: Path | None = option(None, PathArg("model bundle directory", local_only=True), "Model bundle "
                                "directory made by mmap-export. Default: the built-in demo model.", ENGINE)
    backend: str = option("auto", Choice(BACKENDS), "Inference engine; auto picks the fastest available and "
                          "says which.", ENGINE)
    precision: str = option("fp32", Choice(PRECISIONS), "Which of the bundle's model files to run.", ENGINE)
    batch_size: int | None = option(None, Number(low=1, whole=True), "Spots per engine call (default: 32 on the "
                                    "CPU, 128 on a GPU).", ENGINE)
    threads: int = option(0, Number(low=0, whole=True), "CPU threads for ONNX Runtime (0: all cores); on the CPU, "
                          "two encoder batches run at once on half of them each.", ENGINE)
    progress: bool = option(False, Flag(), "Show a progress bar on stderr while a slide runs.", ENGINE,
                            cli_invert="--quiet", short="-q", cli_default=True)
    # -- one slide (Predictor.predict) --
    mpp: float | None = option(None, Number(low=0, low_open=True, unit="µm per pixel"), "Slide resolution in µm "
                               "per pixel; overrides the slide's metadata.", SLIDE, column="mpp")
    reader: str = option("auto", Choice(SLIDE_READERS), "Slide reader: auto picks one per file (OpenSlide for "
                         "vendor formats and DICOM, tifffile for OME-TIFF and other TIFF pyramids, the image reader "
                         "for JPEG/PNG) and records why in uns['mmap']['slide_reader']; the others force it.", SLIDE)
    library_id: str | None = option(None, Text(_library_id_problem), "Key of uns['spatial'] (default: the slide "
                                    "file name without extension).", SLIDE, column="id")
    all_spots: bool = option(False, Flag(), "Keep spots marked outside the tissue (in_tissue/selected = 0).", SLIDE)
    strict: bool = option(False, Flag(), "Fail on an unreadable spot instead of dropping and listing it.", SLIDE)
    skip_geometry_checks: bool = option(False, Flag(), "Run even when the coordinates look wrong for the slide "
                                        "(lattice vs resolution, swapped x/y, spots off tissue); the findings "
                                        "become warnings.", SLIDE)
    # checked by inputs.grid.parse_grid where it is used (the CLI before anything is loaded)
    grid: str | None = option(None, Text(metavar="visium|st|NUMum"), "Without {COORDS}: lay spots over the "
                              "slide's tissue: 'visium' (hexagonal, 100 µm apart, 55 µm spots), 'st' (square, "
                              "200 µm, 100 µm spots) or square bins of NUM µm (e.g. 16um; 2-1000). In a batch: for "
                              "the rows whose coords are empty.", SLIDE)
    tissue_mask: Location | None = option(None, PathArg("mask file", must_exist=True), "With {grid}: the tissue, in "
                                      "place of detection: a binary PNG/TIFF (the slide's aspect ratio, any size) "
                                      "or GeoJSON polygons in level-0 pixels (QuPath, TRIDENT).", SLIDE,
                                      applies_with="grid")
    min_tissue: float = option(0.5, Number(low=0.0, high=1.0, low_open=True), "With {grid}: keep a spot when at "
                               "least this share of its area is tissue.", SLIDE, applies_with="grid")
    max_spots: int = option(2_000_000, Number(low=1, whole=True), "With {grid}: refuse a grid with more spots than "
                            "this (a coarser {grid} is faster).", SLIDE, applies_with="grid")
    # -- writing --
    overwrite: bool = option(False, Flag(), "Replace existing output files.", OUTPUT)
    plot: tuple[str, ...] = option((), Names("GENE[,GENE...]"), "Also write a PNG map of each gene over the "
                                   "slide thumbnail, or of a per-spot column: qc_blur, qc_ink, qc_background, "
                                   "qc_pass, tissue_fraction, mmap_familiarity (needs matplotlib).", OUTPUT, api=False)
    overview: bool = option(False, Flag(), "Also write OUT.overview.png: the slide's thumbnail, the tissue outline "
                            "and every spot (spots failing the image QC ringed in red).", OUTPUT, api=False)
    genes: tuple[str, ...] | None = option(None, Names("GENE[,GENE...]|all"), "With a .geojson output (QuPath): the "
                                           "genes written as measurements (default: the 20 whose predictions vary "
                                           "most over the slide; all: every gene).", OUTPUT, applies_with=GEOJSON)
    classify_by: str = option("tissue_id", Text(metavar="COLUMN"), "With a .geojson output: the obs column that "
                              "classifies each spot in QuPath (tissue_id where the run has it, as --grid runs do; "
                              "e.g. qc_pass or mmap_cluster).", OUTPUT, applies_with=GEOJSON)
    # -- the command line's batch --
    output_format: str | None = option(None, Choice(OUTPUT_FORMATS), "With --manifest: write each slide as "
                                       "{{id}}.h5ad (default), {{id}}.zarr (SpatialData) or {{id}}.geojson (QuPath).",
                                       BATCH, flag="--format",
                                       api=False, show_default=False)
    shard: tuple[int, int] | None = option(None, Shard(), "With --manifest: run only rows k with k % N == I "
                                           "(I = 0..N-1), e.g. $SLURM_ARRAY_TASK_ID/N.", BATCH, api=False)
    ray_workers: int | None = option(None, Number(low=1, whole=True), "With --ray: how many workers (default: one "
                                     "per GPU; without GPUs one per 8 cores of a node, or per {threads} cores).",
                                     BATCH, api=False)

    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` (field names), each checked by its option's kind; they count as given."""
        checked = {name: _parse(name, value, type(self)) for name, value in changes.items()}
        return dataclasses.replace(self, **checked, given=self.given | frozenset(changes))

    def with_values(self, **values: Any) -> Settings:
        """A copy with values the run sets itself, checked already (a manifest row's columns, the grid a
        row with coords drops, a Ray worker's share of the cores): not options the caller gave."""
        return dataclasses.replace(self, **values)



def option_fields(cls: type = Settings) -> tuple[dataclasses.Field, ...]:
    """The fields of `cls` that are options, in declaration order (indexed for `spell` on first use)."""
    fields = tuple(f for f in dataclasses.fields(cls) if "option" in f.metadata)
    if cls not in _REGISTERED:
        _register(fields)
        _REGISTERED.add(cls)
    return fields


def _flag(name: str, spec: Option) -> str | None:
    if spec.flag is None:
        return None
    return spec.flag or "--" + name.replace("_", "-")


_OPTIONS: dict[str, Option] = {}  # name -> its declaration, the flag resolved (an empty one made from the name)
_REGISTERED: set[type] = set()


def _register(fields: tuple[dataclasses.Field, ...]) -> None:
    for f in fields:
        spec = f.metadata["option"]
        _OPTIONS[f.name] = dataclasses.replace(spec, flag=spec.cli_invert or _flag(f.name, spec))


option_fields(Settings)


def _parse(name: str, value: Any, cls: type = Settings) -> Any:
    """`value` checked by the option's kind; None stays None where the default is None."""
    f = next((f for f in option_fields(cls) if f.name == name), None)
    if f is None:
        raise UserError(f"unknown option {name}=; known: {', '.join(x.name for x in option_fields(cls))}")
    if value is None and f.default is None:
        return None
    return f.metadata["option"].kind.parse(value, name)


# -- the three ways in: command line, Python, manifest ---------------------------------------------
def click_params(cls: type = Settings) -> list[Any]:
    """One click option per field with a flag, from its declaration (values stay raw: `from_cli` checks them)."""
    import click

    params = []
    for f in option_fields(cls):
        spec = f.metadata["option"]
        flag = _flag(f.name, spec)
        if flag is None:
            continue
        if isinstance(spec.kind, Flag):
            if spec.cli_invert:  # --quiet: the switch turns the field off
                decls = [d for d in (spec.short, spec.cli_invert) if d]
                params.append(click.Option([*decls, f"cli_{f.name}"], is_flag=True, show_default=False,
                                           help=_invert_help(f.name)))
            else:
                decls = [d for d in (spec.short, flag) if d]
                params.append(click.Option([*decls, f.name], is_flag=True, show_default=False,
                                           help=render_help(spec.help, True)))
            continue
        default = f.default
        show = spec.show_default and default not in (None, (), "")
        decls = [d for d in (spec.short, flag) if d]
        params.append(click.Option([*decls, f.name], type=spec.kind.click_type(), default=None, show_default=False,
                                   metavar=None if isinstance(spec.kind, Choice) else spec.kind.metavar,
                                   help=render_help(spec.help, True)
                                   + (f"  [default: {_show(default)}]" if show else "")))
    return params


def render_help(text: str, for_cli: bool) -> str:
    """An option's help as the command line (`{grid}` -> `--grid`) or Python (`{grid}` -> ``grid``) reads it."""
    names = {name: (spec.flag if for_cli else f"``{name}``") for name, spec in _OPTIONS.items()}
    return text.format(COORDS="COORDS" if for_cli else "``coords``", **names)


def _invert_help(name: str) -> str:
    return {"progress": "No progress bar."}.get(name, f"Turn {name} off.")


def _show(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:_}"
    return str(value)


def from_cli(values: Mapping[str, Any], given: Sequence[str], cls: type = Settings) -> Settings:
    """Settings from click's values (raw strings and switches); `given`: the names the command line set."""
    out: dict[str, Any] = {}
    names = set()
    for f in option_fields(cls):
        spec = f.metadata["option"]
        if _flag(f.name, spec) is None:
            continue
        if spec.cli_invert:  # the switch sets the opposite of the command line's own default
            switched = bool(values.get(f"cli_{f.name}"))
            out[f.name] = (not spec.cli_default) if switched else spec.cli_default
            if switched:
                names.add(f.name)
            continue
        if f.name in given:
            out[f.name] = _parse(f.name, values[f.name], cls)
            names.add(f.name)
    return cls(**out, given=frozenset(names))


def _api_fields(scopes: Sequence[str], cls: type, skip: Sequence[str] = (),
                only: Sequence[str] | None = None) -> list[dataclasses.Field]:
    return [f for f in option_fields(cls) if f.metadata["option"].api and f.metadata["option"].scope in scopes
            and f.name not in skip and (only is None or f.name in only)]


def settings_from_api(options: Mapping[str, Any], scopes: Sequence[str], where: str,
                      base: Settings | None = None, cls: type | None = None,
                      only: Sequence[str] | None = None) -> Settings:
    """Settings from a Python call's keyword arguments, each checked as its flag is.

    Only options of `scopes` (and among them `only`) that Python callers give
    are accepted; another name is a `UserError` that lists the accepted ones
    (`where` names the function, e.g. "Predictor.predict"). `base`: the
    settings to start from (its class is used); else the defaults of `cls`.
    """
    cls = cls or (type(base) if base is not None else Settings)
    accepted = {f.name for f in _api_fields(scopes, cls, only=only)}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UserError(f"{where}() got unknown option(s) {', '.join(unknown)}; it takes "
                        f"{', '.join(sorted(accepted))}")
    with caller(API):
        if base is None:
            return cls().replace(**options)
        return base.replace(**options)


def api_parameters(scopes: Sequence[str], cls: type = Settings, *, skip: Sequence[str] = (),
                   only: Sequence[str] | None = None) -> list[Any]:
    """`inspect.Parameter`s (keyword-only, with defaults) of the options Python callers give in `scopes`."""
    import inspect

    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
            for f in _api_fields(scopes, cls, skip, only)]


def api_doc(scopes: Sequence[str], cls: type = Settings, *, skip: Sequence[str] = (),
            only: Sequence[str] | None = None) -> str:
    """numpydoc entries for the options of `scopes` (the Parameters sections of the API's docstrings)."""
    import textwrap

    entries = []
    for f in _api_fields(scopes, cls, skip, only):
        text = f"{render_help(f.metadata['option'].help, False)} Default: ``{f.default!r}``."
        entries.append(f"{f.name}\n" + textwrap.fill(text, 96, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(entries)


def manifest_columns(cls: type = Settings) -> dict[str, str]:
    """The batch manifest's optional columns that set an option per slide: column -> field name."""
    return {f.metadata["option"].column: f.name for f in option_fields(cls) if f.metadata["option"].column}


def parse_column(column: str, text: str, where: str, cls: type = Settings) -> Any:
    """A manifest cell, checked by its option's kind; the error names `where` (file and line) and the column."""
    name = manifest_columns(cls)[column]
    try:
        with caller(API):
            return _parse(name, text, cls)
    except UserError as e:
        why = str(e).split(": ", 1)[-1]
        raise UserError(f"{where}: {column} {text!r}: {why}") from None


# -- the cross-checks ------------------------------------------------------------------------------
def _applies(settings: Settings, needed: str, output: object) -> bool:
    """Whether what an option `applies_with` is there: another option, or a .geojson output."""
    if needed == GEOJSON:
        return str(output).endswith(".geojson") or settings.output_format == GEOJSON
    return getattr(settings, needed) is not None


def _needed_text(needed: str) -> str:
    if needed == GEOJSON:
        return ("a .geojson output (-o OUT.geojson, or --format geojson in a batch)" if current_caller() == CLI
                else "a .geojson output (write(adata, 'OUT.geojson'))")
    return f"{spell(needed)} (to the spots it lays over the tissue)"


def check_options(settings: Settings, *, batch: bool = False, has_coords: bool | None = None,
                  coords: object = "", slide: object = "", output: object = "") -> None:
    """The checks between options: one function for the CLI, the API and each batch row.

    - an option given without the one it applies with (`min_tissue` without `grid`, `genes` without a
      .geojson `output`);
    - a batch option outside a batch (`batch`: the command line's --manifest), and in a batch no
      per-slide value from the command line (it is a manifest column);
    - for one slide (`has_coords` known): spots from coordinates or from a grid, not both and not
      neither. `coords` and `slide` name them in the message.
    """
    cls = type(settings)
    orphans: dict[str, list[str]] = {}
    for f in option_fields(cls):
        spec: Option = f.metadata["option"]
        if f.name not in settings.given:
            continue
        if spec.applies_with and not _applies(settings, spec.applies_with, output):
            orphans.setdefault(spec.applies_with, []).append(f.name)
        if spec.scope == BATCH and not batch:
            raise UserError(f"{spell(f.name)} only applies with --manifest")
        if batch and spec.column and spec.scope == SLIDE:
            raise UserError(f"with --manifest, give {spell(f.name)} per slide in the manifest's {spec.column} column")
    for needed, names in orphans.items():
        said = " and ".join(spell(n) for n in names)
        raise UserError(f"{said} only appl{'ies' if len(names) == 1 else 'y'} with {_needed_text(needed)}")
    if has_coords is None:
        return
    grid = settings.grid
    if has_coords and grid is not None and not batch:  # in a batch, the grid is for the rows without coords
        raise UserError(f"{coords}: give spot coordinates or {spell('grid', grid)}, not both; drop the coordinates "
                        f"to lay a grid over the tissue, or drop {spell('grid')} to predict at the given spots")
    if not has_coords and grid is None:
        what = "COORDS" if current_caller() == CLI else "coords"
        raise UserError(f"{slide}: no spot coordinates given: pass {what} (a coordinates table or a Space Ranger / "
                        f"Visium HD folder), or {spell('grid', 'visium')} (or st, NUMum) to lay spots over the "
                        "tissue")
