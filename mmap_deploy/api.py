"""The Python API: predict a slide's spots into an `anndata.AnnData`, in memory.

>>> import mmap_deploy as mm
>>> with mm.Predictor(model="bundle/") as predictor:              # doctest: +SKIP
...     adata = predictor.predict("slide.svs", "spaceranger/outs/")
>>> mm.write(adata, "slide.h5ad")                                  # doctest: +SKIP

`mmap-predict` runs the same code: `Predictor.predict` is
`run.predict.predict_adata`, which the CLI, the local batch and the Ray
workers call too (followed there by `run.predict.write_adata`, which is
`write` here), so the AnnData returned is the one `mmap-predict` writes, bit
for bit in `X`, `obs` and `obsm`.

Nothing here prints or exits: bad input raises `UserError` (or a subclass)
with the CLI's one-line message; findings the run goes on with are
`MMAPWarning`s (`warnings`); notes go to the `mmap_deploy` logger;
`progress=True` shows tqdm's progress bar on stderr.
"""

from __future__ import annotations

import inspect
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union

from .errors import UserError
from .options import ENGINE, OUTPUT, SLIDE, Settings, api_doc, api_parameters, check_options, settings_from_api
from .run.predict import RunState, load_model, open_run, predict_adata, write_adata

if TYPE_CHECKING:  # pragma: no cover
    import anndata
    import pandas

    from .location import Location
    from .engines import Engines
    from .inputs.tissue import Tissue
    from .model.bundle import Bundle

PathLike = Union[str, "os.PathLike[str]"]
API_COMMAND = "mmap_deploy.Predictor.predict (Python API)"


def _path(value: object, what: str) -> Location:
    """A local path or a URL (s3://, gs://, https://: `location.as_location`), kept a URL."""
    from .location import RemotePath, as_location

    if not isinstance(value, (str, os.PathLike, RemotePath)):
        raise UserError(f"{what} must be a path or a URL (str or pathlib.Path), got {type(value).__name__}")
    return as_location(value)


def _signed(function: Any, leading: list[inspect.Parameter], scopes: tuple[str, ...], *,
            skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> None:
    """Give `function` (which takes `**options`) the signature and docstring of the options it takes,
    from their declarations (`options.Settings`), so `help()` and notebooks show them."""
    function.__signature__ = inspect.Signature(leading + api_parameters(scopes, skip=skip, only=only))
    indent = " " * (8 if "." in function.__qualname__ else 4)
    doc = api_doc(scopes, skip=skip, only=only).replace("\n", "\n" + indent)
    function.__doc__ = (function.__doc__ or "").replace("{options}", doc)


def _positional(name: str, annotation: str, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)


class DemoPaths(NamedTuple):
    """The built-in demo: a crop of her2st section B4 with its 120 spots, and the demo model.

    Attributes
    ----------
    slide
        The H&E image (JPEG; its resolution is in its EXIF tags).
    coords
        Its spots, a her2st ``*_selection.tsv``.
    model
        The demo model bundle (a tiny model for trying the tool, not for research).
    """

    slide: Path
    coords: Path
    model: Path


def demo_paths() -> DemoPaths:
    """Where the built-in demo sample and the demo model are.

    Returns
    -------
    DemoPaths
        ``(slide, coords, model)``; ``predict(slide, coords)`` runs the demo.

    Raises
    ------
    UserError
        When the demo files are not installed with this copy of mmap-deploy.
    """
    from .demo import sample_paths
    from .model.bundle import default_bundle_path

    slide, coords, _ = sample_paths()
    return DemoPaths(Path(slide), Path(coords), default_bundle_path())


class Predictor:
    """A model bundle and its engines, loaded once, to predict many slides.

    Parameters
    ----------
    model
        A model bundle directory made by ``mmap-export``. ``None``: the
        built-in demo model (a tiny model for trying the tool; a note says so
        on the ``mmap_deploy`` logger).
    {options}

    Raises
    ------
    UserError
        A bundle that is missing or damaged (`BundleError`), an engine built
        for another GPU (`EngineMismatchError`), an unknown backend or
        precision; the message is ``mmap-predict``'s one line.

    See Also
    --------
    predict : One call for one slide.
    write : Write the AnnData as ``mmap-predict`` does.

    Notes
    -----
    A `Predictor` holds the engines (and, on a GPU, its memory) until
    `close` is called or its ``with`` block ends. One slide runs at a time:
    calls of `predict` from several threads take turns.

    Examples
    --------
    >>> import mmap_deploy as mm
    >>> demo = mm.demo_paths()
    >>> with mm.Predictor(threads=1) as predictor:
    ...     adata = predictor.predict(demo.slide, demo.coords)
    >>> adata.n_obs
    120
    """

    def __init__(self, model: PathLike | None = None, **options: Any) -> None:
        self._state: RunState | None = None  # set before anything can fail: close() and __del__ rely on it
        self._lock = threading.Lock()
        if model is not None:
            options["model"] = model
        settings = settings_from_api(options, (ENGINE,), "Predictor")
        self._open(load_model(settings.model), settings, API_COMMAND)

    @classmethod
    def _from_settings(cls, bundle: Bundle, settings: Settings, command: str) -> Predictor:
        """A Predictor for `mmap-predict`: the bundle it has loaded, and the settings of its command line."""
        self = cls.__new__(cls)
        self._state = None
        self._lock = threading.Lock()
        self._open(bundle, settings, command)
        return self

    def _open(self, bundle: Bundle, settings: Settings, command: str) -> None:
        self.bundle = bundle
        self._settings = settings
        self._state = open_run(bundle, settings, command)

    # -- what it holds --------------------------------------------------------------
    @property
    def genes(self) -> list[str]:
        """The genes the model predicts, in the order of ``adata.var_names``."""
        return list(self.bundle.manifest.genes)

    @property
    def model_path(self) -> Path:
        """The model bundle's directory."""
        return Path(self.bundle.root)

    @property
    def engines(self) -> Engines:
        """The loaded encoder and fusion engines (`mmap_deploy.engines.Engines`)."""
        return self.state.engines

    @property
    def state(self) -> RunState:
        """The run's state: its engines, and the batch size and reader threads chosen for them."""
        self._check_open()
        return self._state

    @property
    def settings(self) -> Settings:
        """The settings this Predictor was made with (frozen)."""
        return self._settings

    @property
    def backend(self) -> str:
        """The backend that runs the engines: ``"onnxruntime"`` or ``"tensorrt"``."""
        return str(self.engines.plan.backend)

    @property
    def closed(self) -> bool:
        """True once `close` has run."""
        return self._state is None

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.backend}, {self._settings.precision}"
        return f"Predictor(model={str(self.model_path)!r}, {state})"

    # -- predicting -----------------------------------------------------------------
    def predict(self, slide: PathLike, coords: PathLike | None = None, **options: Any) -> anndata.AnnData:
        """Predict the expression of every spot of one slide (given, or laid over its tissue with `grid`).

        Parameters
        ----------
        slide
            A whole-slide image (SVS, pyramidal TIFF, NDPI, MRXS, ...) or a
            plain JPEG/PNG/TIFF.
        coords
            The spots, in full-resolution pixels: a Space Ranger ``outs/`` or
            ``spatial/`` folder, a Visium HD ``binned_outputs/square_NNNum/``
            folder, a Visium ``tissue_positions`` file, a her2st
            ``*_selection.tsv``, or a table with ``x,y`` and optionally
            ``barcode``/``id``. Leave it out for a slide with no spatial
            assay and give ``grid``.
        {options}

        Returns
        -------
        anndata.AnnData
            What ``mmap-predict`` writes: ``X`` the predictions (float32, the
            training log scale), ``var_names`` the genes, ``obs_names`` the
            spot ids, ``obs['mmap_cluster']``, ``obsm['spatial']`` and
            ``obsm['mmap_embedding']``, ``uns['spatial']`` (a thumbnail and
            its scale factors, for ``scanpy.pl.spatial``) and
            ``uns['mmap']`` (provenance).

        Raises
        ------
        UserError
            Bad input (a missing or unreadable slide or table, a resolution
            that is unknown or contradicts the spot lattice, spots outside the
            slide, an option given without the one it applies with, a bad
            value, ...), with ``mmap-predict``'s one-line message naming the
            parameter (``mpp=``).

        Warns
        -----
        MMAPWarning
            A finding the run went on with (``mpp`` contradicts the slide's
            metadata, few spots on tissue, a Space Ranger image that does not
            fit the slide).
        """
        slide_path = _path(slide, "slide")
        coords_path = None if coords is None else _path(coords, "coords")
        with self._lock:
            self._check_open()
            settings = settings_from_api(options, (SLIDE,), "Predictor.predict", base=self._settings)
            check_options(settings, has_coords=coords_path is not None, coords=coords_path, slide=slide_path)
            run = predict_adata(slide_path, coords_path, self.bundle, self._state, settings)
        return run.adata

    # -- closing --------------------------------------------------------------------
    def close(self) -> None:
        """Release the engines (and their GPU memory). Calling it again does nothing."""
        with self._lock:
            state, self._state = self._state, None
        if state is not None:
            state.close()

    def _check_open(self) -> None:
        if self._state is None:
            raise ValueError("this Predictor is closed; make a new one to predict more slides")

    def __enter__(self) -> Predictor:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110  # pragma: no cover (interpreter shutdown)
            pass


def predict(slide: PathLike, coords: PathLike | None = None, *, model: PathLike | None = None,
            **options: Any) -> anndata.AnnData:
    """Predict one slide in one call: a `Predictor` that lives for this slide only.

    For several slides, make one `Predictor` and call its `Predictor.predict`:
    the model and its engines are then loaded once.

    Parameters
    ----------
    slide, coords
        As for `Predictor.predict`.
    model
        As for `Predictor`.
    {options}

    Returns
    -------
    anndata.AnnData
        What ``mmap-predict`` writes for this slide (see `Predictor.predict`).

    Raises
    ------
    UserError
        Bad input, with ``mmap-predict``'s one-line message.

    Examples
    --------
    >>> import mmap_deploy as mm
    >>> demo = mm.demo_paths()
    >>> adata = mm.predict(demo.slide, demo.coords, threads=1)
    >>> adata.X.shape
    (120, 785)
    """
    engine = {k: v for k, v in options.items() if k not in _SLIDE_OPTIONS}
    per_slide = {k: v for k, v in options.items() if k in _SLIDE_OPTIONS}
    with Predictor(model, **engine) as predictor:
        return predictor.predict(slide, coords, **per_slide)


def write(adata: anndata.AnnData, path: PathLike, **options: Any) -> Location:
    """Write a prediction as ``mmap-predict`` does: ``.h5ad``, SpatialData for ``.zarr``, QuPath detections
    for ``.geojson``, atomically.

    The file is written to a temporary file beside `path` and renamed into
    place (in a bucket: written locally and uploaded whole): a reader, or a
    run killed half-way, never sees half a file.

    Parameters
    ----------
    adata
        An AnnData from `predict` or `Predictor.predict`.
    path
        The output: ``*.h5ad`` (AnnData, its images gzip-compressed),
        ``*.zarr`` (a SpatialData store; needs the ``[spatialdata]`` extra) or
        ``*.geojson`` (the spots as QuPath detections, with measurements); a
        local path or a bucket's URL.
    {options}

    Returns
    -------
    pathlib.Path or RemotePath
        The path written.

    Raises
    ------
    UserError
        A path with another suffix, an existing output without `overwrite`,
        a missing ``spatialdata`` for ``.zarr``; `OutputStorageError` for a
        folder that is full or cannot be written (nothing is left behind).
    """
    from .run.predict import geojson_options

    out = _path(path, "path")
    settings = settings_from_api(options, (OUTPUT,), "write")
    check_options(settings, output=out)
    write_adata(adata, out, overwrite=settings.overwrite, **geojson_options(settings))
    return out


def read_spots(coords: PathLike, *, all_spots: bool = False) -> pandas.DataFrame:
    """Read spot coordinates as ``mmap-predict`` reads them: a table, or a Space Ranger / Visium HD folder.

    Parameters
    ----------
    coords
        A Space Ranger ``outs/`` or ``spatial/`` folder, a Visium HD
        ``binned_outputs/square_NNNum/`` folder, a Visium
        ``tissue_positions`` file (``.csv``, ``_list.csv``, ``.parquet``), a
        her2st ``*_selection.tsv``, or a table with ``x,y`` and optionally
        ``barcode``/``id``.
    all_spots
        Keep spots marked outside the tissue (``in_tissue``/``selected`` = 0).

    Returns
    -------
    pandas.DataFrame
        One row per spot in the file's order, indexed by the spot ids: ``x``
        and ``y`` (the centre in full-resolution pixels: x the column, y the
        row) and, when the input has them, the array indices ``array_col``
        and ``array_row``. ``attrs`` holds ``layout`` (``"table"``,
        ``"spaceranger-spatial"``, ``"visium-hd-bins"``), ``format`` (the
        table's layout, e.g. ``"visium"``, ``"her2st"``, ``"xy"``),
        ``table`` (the file read) and ``scalefactors`` (Space Ranger's).

    Raises
    ------
    UserError
        A missing or malformed input, with ``mmap-predict``'s one-line message.
    """
    import numpy as np
    import pandas as pd

    from .inputs.layouts import read_spot_input

    spot_input = read_spot_input(_path(coords, "coords"), all_spots=bool(all_spots))
    spots = spot_input.spots
    xy = np.asarray(spots.xy, dtype=np.float64)
    columns: dict[str, np.ndarray] = {"x": xy[:, 0], "y": xy[:, 1]}
    if spots.array_xy is not None:
        columns["array_col"] = np.asarray(spots.array_xy)[:, 0]
        columns["array_row"] = np.asarray(spots.array_xy)[:, 1]
    frame = pd.DataFrame(columns, index=pd.Index(np.asarray(spots.ids, dtype=object), dtype=object))
    frame.attrs.update(layout=spot_input.layout, format=spots.source_format, table=str(spot_input.table),
                       scalefactors=dict(spot_input.scalefactors))
    return frame


def detect_tissue(slide: PathLike, **options: Any) -> Tissue:
    """Find the tissue of a slide as ``mmap-predict --grid`` does (or read the user's mask).

    Parameters
    ----------
    slide
        A whole-slide image or a plain JPEG/PNG/TIFF.
    {options}

    Returns
    -------
    Tissue
        ``mask`` (bool, about 8 µm per pixel), ``labels`` (pieces 1..n),
        ``scale_x``/``scale_y`` (mask pixels per level-0 pixel), ``area_mm2``,
        ``pieces``, ``polygons()`` (outlines in level-0 pixels),
        ``to_geojson()`` and ``record()`` (what ``uns['mmap']['tissue']`` holds).

    Raises
    ------
    UserError
        No tissue found (the message says what share looked like tissue), a
        slide without a resolution, or a bad mask.

    Examples
    --------
    The outline as GeoJSON, to check in QuPath or to edit and pass back as
    ``tissue_mask``:

    >>> import json
    >>> import mmap_deploy as mm
    >>> tissue = mm.detect_tissue("slide.svs")                          # doctest: +SKIP
    >>> with open("slide.geojson", "w") as f:                           # doctest: +SKIP
    ...     json.dump(tissue.to_geojson(), f)
    """
    from .inputs.slide import open_slide

    from .inputs.tissue import tissue_for

    settings = settings_from_api(options, (SLIDE,), "detect_tissue", only=_DETECT_OPTIONS)
    with open_slide(_path(slide, "slide"), mpp=settings.mpp, reader=settings.reader) as reader:
        return tissue_for(reader, settings.tissue_mask)


def make_grid(slide: PathLike, grid: str, *, tissue: Tissue | None = None, **options: Any) -> pandas.DataFrame:
    """The spots ``mmap-predict --grid`` lays over a slide's tissue, without predicting.

    Parameters
    ----------
    slide
        A whole-slide image or a plain JPEG/PNG/TIFF.
    grid
        ``"visium"``, ``"st"`` or ``"NUMum"`` (square bins of NUM µm).
    tissue
        A `Tissue` from `detect_tissue`; ``None``: detected here (or read
        from ``tissue_mask``).
    {options}

    Returns
    -------
    pandas.DataFrame
        One row per spot, indexed by the spot ids: ``x``, ``y`` (level-0
        pixels), ``array_row``, ``array_col``, ``tissue_fraction`` and
        ``tissue_id``; ``attrs['grid']`` is the grid's record
        (``uns['mmap']['grid']`` of a prediction).

    Raises
    ------
    UserError
        An unknown `grid`, a slide without a resolution, no tissue found, a
        bad mask, both `tissue` and ``tissue_mask``, a ``min_tissue`` outside
        (0, 1], or a grid with no spot on tissue or with more than
        ``max_spots`` (the message names the count and the fixes).
    """
    import numpy as np
    import pandas as pd

    from .inputs.grid import grid_over_tissue, parse_grid
    from .inputs.slide import open_slide
    from .inputs.tissue import tissue_for

    settings = settings_from_api(dict(options, grid=grid), (SLIDE,), "make_grid", only=_GRID_OPTIONS)
    if tissue is not None and settings.tissue_mask is not None:
        raise UserError("give tissue= or tissue_mask=, not both: tissue_mask= is read to make a tissue")
    spec = parse_grid(settings.grid)
    with open_slide(_path(slide, "slide"), mpp=settings.mpp, reader=settings.reader) as reader:
        if tissue is None:
            tissue = tissue_for(reader, settings.tissue_mask)
        g = grid_over_tissue(spec, reader, tissue, min_tissue=settings.min_tissue, max_spots=settings.max_spots)
    frame = pd.DataFrame({"x": g.xy[:, 0], "y": g.xy[:, 1], "array_row": g.array_row, "array_col": g.array_col,
                          "tissue_fraction": g.tissue_fraction, "tissue_id": g.tissue_id},
                         index=pd.Index(np.asarray(g.ids, dtype=object), dtype=object))
    frame.attrs["grid"] = g.record()
    return frame


# The options each function takes, from their declarations (options.Settings): the signatures that
# help() and notebooks show, and the Parameters sections of the docstrings.
_SLIDE_OPTIONS = tuple(p.name for p in api_parameters((SLIDE,)))
_DETECT_OPTIONS = ("mpp", "reader", "tissue_mask")
_GRID_OPTIONS = ("grid", "mpp", "reader", "tissue_mask", "min_tissue", "max_spots")
_SELF = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
_SLIDE = _positional("slide", "PathLike")
_COORDS = _positional("coords", "PathLike | None", None)
_signed(Predictor.__init__, [_SELF, _positional("model", "PathLike | None", None)], (ENGINE,), skip=("model",))
_signed(Predictor.predict, [_SELF, _SLIDE, _COORDS], (SLIDE,))
_signed(predict, [_SLIDE, _COORDS, inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, default=None,
                                                      annotation="PathLike | None")], (ENGINE, SLIDE), skip=("model",))
_signed(write, [_positional("adata", "anndata.AnnData"), _positional("path", "PathLike")], (OUTPUT,))
_signed(detect_tissue, [_SLIDE], (SLIDE,), only=_DETECT_OPTIONS)
_signed(make_grid, [_SLIDE, _positional("grid", "str"), inspect.Parameter(
    "tissue", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Tissue | None")], (SLIDE,),
        only=_GRID_OPTIONS[1:])
