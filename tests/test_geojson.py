"""-o slide.geojson (outputs/geojson.py): QuPath detections at the spots' true size, values equal to the AnnData's."""

from __future__ import annotations

import json
import math
import uuid

import numpy as np
import pytest

from mmap_deploy.errors import UserError
from mmap_deploy.outputs.geojson import (
    CIRCLE_VERTICES,
    DEFAULT_N_GENES,
    MEASURED_COLUMNS,
    default_genes,
    outline,
    spot_shape,
    write_geojson,
)

import anndata as ad
import shapely.geometry as shapely_geometry

AREA_TOLERANCE = 1e-3  # relative: the polygons have the spot's area (coordinates rounded to 0.01 px)
CENTROID_TOLERANCE_PX = 0.01


@pytest.fixture(scope="module")
def demo_adata(tiny_bundle):
    """The demo sample predicted with the tiny bundle: real spots (her2st ST, circles), real QC columns."""
    import mmap_deploy as mm
    from mmap_deploy.demo import sample_paths

    image, coords, _ = sample_paths()
    with mm.Predictor(tiny_bundle, threads=1) as p:
        adata = p.predict(image, coords)
    adata.obs.loc[adata.obs_names[0], "tissue_fraction"] = np.nan  # a value JSON cannot hold
    return adata


def _read(path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _check_geometry(data: dict, adata, shape: str, size: float) -> None:
    """Every feature parses (shapely), sits on its spot, and has the spot's true area."""
    true_area = size * size if shape == "square" else math.pi * size * size / 4.0
    xy = np.asarray(adata.obsm["spatial"])
    assert data["type"] == "FeatureCollection" and len(data["features"]) == adata.n_obs
    for f, (x, y), name in zip(data["features"], xy, adata.obs_names):
        geom = shapely_geometry.shape(f["geometry"])
        assert geom.is_valid and geom.geom_type == "Polygon"
        assert len(geom.exterior.coords) == (5 if shape == "square" else CIRCLE_VERTICES + 1)
        assert abs(geom.centroid.x - x) < CENTROID_TOLERANCE_PX and abs(geom.centroid.y - y) < CENTROID_TOLERANCE_PX
        assert geom.area == pytest.approx(true_area, rel=AREA_TOLERANCE)
        assert geom.exterior.is_ccw  # RFC 7946's right-hand rule
        assert f["properties"]["objectType"] == "detection" and f["properties"]["name"] == name
        assert uuid.UUID(f["id"]).version == 5


def test_spots_parse_and_land_on_their_pixels_with_their_values(demo_adata, tmp_path):
    path = write_geojson(demo_adata, tmp_path / "demo.geojson", genes="all")
    data = _read(path)
    shape, size = spot_shape(demo_adata)
    assert (shape, size) == ("circle", float(demo_adata.uns["spatial"]["B4_crop"]["scalefactors"]["spot_diameter_fullres"]))
    _check_geometry(data, demo_adata, shape, size)
    genes = list(demo_adata.var_names)
    x = np.asarray(demo_adata.X)
    for i, f in enumerate(data["features"]):
        m = f["properties"]["measurements"]
        assert np.array_equal(np.array([m[g] for g in genes], np.float32), x[i])  # float32 exactly
        for col in MEASURED_COLUMNS:
            if col not in demo_adata.obs:
                continue
            value = float(demo_adata.obs[col].iloc[i])
            if math.isnan(value):
                assert col not in m  # JSON has no NaN: left out
            else:
                assert np.float32(m[col]) == np.float32(value)
        assert "classification" not in f["properties"]  # no tissue_id at given spots
    assert set(MEASURED_COLUMNS) - {"mmap_familiarity"} <= set(data["features"][1]["properties"]["measurements"])
    assert data["features"][0]["properties"]["measurements"]["qc_pass"] in (0, 1)


def test_default_genes_are_the_most_variable_and_names_match_like_plot(demo_adata, tmp_path):
    var = np.asarray(demo_adata.X, dtype=np.float64).var(axis=0)
    five = default_genes(demo_adata, n=5)
    assert [var[demo_adata.var_names.get_loc(g)] for g in five] == sorted(var, reverse=True)[:5]
    chosen = default_genes(demo_adata)
    assert chosen[:5] == five and len(chosen) == min(DEFAULT_N_GENES, demo_adata.n_vars)  # the tiny model has 12
    data = _read(write_geojson(demo_adata, tmp_path / "d.geojson"))
    assert list(data["features"][0]["properties"]["measurements"])[:len(chosen)] == chosen
    gene = demo_adata.var_names[3]
    data = _read(write_geojson(demo_adata, tmp_path / "g.geojson", genes=[gene.lower()]))
    assert list(data["features"][0]["properties"]["measurements"])[0] == gene
    with pytest.raises(UserError, match=r"^genes: gene\(s\) GENE99 not predicted by the model .*did you mean") as e:
        write_geojson(demo_adata, tmp_path / "bad.geojson", genes="GENE1,GENE99")  # from Python: the parameter
    assert "\n" not in str(e.value) and not (tmp_path / "bad.geojson").exists()


def test_classes_from_a_column_and_their_colours(demo_adata, tmp_path, monkeypatch):
    data = _read(write_geojson(demo_adata, tmp_path / "c.geojson", classify_by="mmap_cluster"))
    classes = {f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
               for f in data["features"]}
    assert set(classes) == set(demo_adata.obs["mmap_cluster"].astype(str))  # text classes, named as they are
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in classes.values())
    data = _read(write_geojson(demo_adata, tmp_path / "p.geojson", classify_by="qc_pass"))
    assert {f["properties"]["classification"]["name"] for f in data["features"]} <= {"qc_pass True", "qc_pass False"}
    with pytest.raises(UserError, match="^classify_by='nope': no such column in this output"):
        write_geojson(demo_adata, tmp_path / "n.geojson", classify_by="nope")
    import mmap_deploy.outputs.geojson as g

    monkeypatch.setattr(g, "MAX_CLASSES", 10)
    a = demo_adata.copy()
    a.obs["noise"] = np.arange(a.n_obs, dtype=np.float64) + 0.5
    with pytest.raises(UserError, match="120 different values; classify by a column with at most 10"):
        write_geojson(a, tmp_path / "n.geojson", classify_by="noise")


def _grid_adata(shape: str, size: float, tissue_id: bool = True):
    """A small AnnData as a --grid run makes it (square bins or discs), without running a slide."""
    from mmap_deploy.outputs.adata import build_anndata
    from mmap_deploy.outputs.prediction import SlidePrediction

    gx, gy = np.meshgrid(np.arange(6), np.arange(5))
    xy = np.stack([1000.0 + size * gx.ravel(), 2000.0 + size * gy.ravel()], axis=1)
    n = len(xy)
    rng = np.random.default_rng(1)
    pred = SlidePrediction(spot_ids=[f"s_{i:03d}" for i in range(n)], xy=xy,
                           prediction=rng.random((n, 4), dtype=np.float32), embedding=np.zeros((n, 2), np.float32),
                           clusters=np.zeros(n, np.int64), n_prototypes=1, bank_size=1, genes=list("ABCD"),
                           qc=rng.random((n, 3), dtype=np.float32))
    adata = build_anndata(pred, np.zeros((10, 10, 3), np.uint8), 0.01, library_id="g", slide_mpp=0.5,
                          patch_um=154.0, provenance={"mpp": 0.5})
    adata.uns["spatial"]["g"]["scalefactors"]["spot_diameter_fullres"] = size
    adata.uns["mmap"]["grid"] = {"shape": shape, "name": "16um" if shape == "square" else "visium"}
    if tissue_id:
        adata.obs["tissue_id"] = (np.arange(n) % 3 + 1).astype(np.int32)
    return adata


def test_square_bins_and_tissue_pieces_by_default(tmp_path):
    adata = _grid_adata("square", 32.0)
    data = _read(write_geojson(adata, tmp_path / "bins.geojson"))
    _check_geometry(data, adata, "square", 32.0)
    names = [f["properties"]["classification"]["name"] for f in data["features"]]
    assert names == [f"tissue_id {t}" for t in adata.obs["tissue_id"]]
    colours = {f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"]
               for f in data["features"]}
    assert len({tuple(c) for c in colours.values()}) == 3
    circles = _grid_adata("circle", 110.0)
    _check_geometry(_read(write_geojson(circles, tmp_path / "v.geojson", classify_by=None)), circles, "circle", 110.0)


def test_hd_bins_are_squares_and_the_polygon_has_the_circles_area():
    adata = _grid_adata("circle", 20.0)
    del adata.uns["mmap"]["grid"]
    adata.uns["spatial"]["g"]["scalefactors"]["bin_size_um"] = 8.0
    assert spot_shape(adata) == ("square", 20.0)
    del adata.uns["spatial"]["g"]["scalefactors"]["bin_size_um"]
    adata.uns["mmap"]["coords_format"] = "visium-hd"
    assert spot_shape(adata)[0] == "square"
    ring = outline("circle", 100.0)
    x, y = ring[:-1, 0], ring[:-1, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
    assert area == pytest.approx(math.pi * 50.0**2, rel=1e-12)
    assert np.hypot(x, y).max() / 50.0 - 1 < 0.0033  # vertices 0.32% outside the circle


def test_written_atomically_deterministically_and_dispatched_by_suffix(demo_adata, tmp_path):
    from mmap_deploy.run.predict import write_adata

    out = tmp_path / "w.geojson"
    write_adata(demo_adata, out, genes="all", classify_by="qc_pass")
    first = out.read_bytes()
    with pytest.raises(UserError, match="already exists; pass overwrite="):
        write_adata(demo_adata, out)
    write_adata(demo_adata, out, overwrite=True, genes="all", classify_by="qc_pass")
    assert out.read_bytes() == first  # same input, same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.geojson"]  # no temporary file left
    feats = json.loads(first)["features"]
    assert len(feats[1]["properties"]["measurements"]) == demo_adata.n_vars + 5  # spot 0: tissue_fraction NaN


def test_cli_writes_geojson_from_the_suffix(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from mmap_deploy.cli import main

    out = tmp_path / "demo.geojson"
    r = CliRunner().invoke(main, ["-q", "--demo", "--model", str(tiny_bundle), "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = _read(out)
    assert len(data["features"]) == 120
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.geojson"]


def test_genes_and_classes_from_the_command_line_the_api_and_a_batch(tiny_bundle, demo_adata, tmp_path):
    """--genes / --classify-by (genes= / classify_by=) reach the file; without a .geojson output they are refused,
    by the CLI and the API alike; a batch with --format geojson writes {id}.geojson."""
    import mmap_deploy as mm
    from conftest import run_cli

    from mmap_deploy.demo import sample_paths

    out = tmp_path / "demo.geojson"
    run_cli("--demo", "--model", tiny_bundle, "-o", out, "--genes", "gene3,GENE1", "--classify-by", "qc_pass", expect=0)
    props = [f["properties"] for f in _read(out)["features"]]
    columns = [c for c in MEASURED_COLUMNS if c in demo_adata.obs]
    assert list(props[1]["measurements"]) == ["GENE3", "GENE1", *columns]
    assert {p["classification"]["name"] for p in props} <= {"qc_pass True", "qc_pass False"}
    x = demo_adata[:, ["GENE3", "GENE1"]].X
    np.testing.assert_allclose([[p["measurements"]["GENE3"], p["measurements"]["GENE1"]] for p in props], x, rtol=1e-6)
    r = run_cli("--demo", "--model", tiny_bundle, "-o", tmp_path / "demo.h5ad", "--genes", "GENE1", expect=2)
    assert r.stderr.strip().splitlines()[-1] == ("error: --genes only applies with a .geojson output "
                                                 "(-o OUT.geojson, or --format geojson in a batch)")
    r = run_cli("--demo", "--model", tiny_bundle, "-o", tmp_path / "x.geojson", "--genes", "NOTAGENE", expect=2)
    assert "--genes: gene(s) NOTAGENE not predicted by the model" in r.stderr and not (tmp_path / "x.geojson").exists()
    with pytest.raises(UserError, match=r"^genes= only applies with a \.geojson output"):
        mm.write(demo_adata, tmp_path / "api.h5ad", genes=["GENE1"])
    written = mm.write(demo_adata, tmp_path / "api.geojson", genes="all", classify_by="mmap_cluster")
    assert len(_read(written)["features"][0]["properties"]["measurements"]) >= demo_adata.n_vars
    image, coords, _ = sample_paths()
    (tmp_path / "slides.csv").write_text(f"slide,coords,id\n{image},{coords},b4\n")
    run_cli("--manifest", tmp_path / "slides.csv", "-o", tmp_path / "batch", "--model", tiny_bundle,
            "--format", "geojson", "--genes", "GENE2", expect=0)
    assert [p.name for p in (tmp_path / "batch").iterdir()] == ["b4.geojson"]
    assert list(_read(tmp_path / "batch" / "b4.geojson")["features"][0]["properties"]["measurements"])[0] == "GENE2"
