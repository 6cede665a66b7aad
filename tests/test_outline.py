"""Masks to outlines and back on the pixel grid: the convention (pixel (i, j) covers [j, j+1) x [i, i+1)).

Tracing follows pixel edges and filling takes the pixels whose centres are
inside, so a mask traced and filled comes back bit for bit; shapely, where the
test environment has it, is the reference for "centre inside".
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmap_deploy.inputs import outline as O
from mmap_deploy.inputs.tissue_mask import label_pieces


def _square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def test_trace_rings_holes_and_corners():
    m = np.zeros((8, 9), bool)
    m[1:6, 1:6] = True
    m[2:4, 2:4] = False  # a hole
    m[6, 6] = True  # touches the square at a corner only: the same 8-connected piece
    labels, n = label_pieces(m)
    assert n == 1
    rings = O.outline(labels, 1.0, 1.0)
    assert [(r.piece, r.hole) for r in rings] == [(1, False), (1, True)]
    traced = O.trace(m)  # before simplification: exact pixel edges
    assert sorted(O.shoelace(r) for r in traced) == [-26.0, 4.0]  # 25 + the corner pixel; the hole
    assert [len(r) for r in traced] == [8, 4]
    outline = O.outline(labels, 0.5, 0.25)  # to level-0 pixels
    assert outline[1].xy.tolist() == [[4.0, 8.0], [8.0, 8.0], [8.0, 16.0], [4.0, 16.0]]


def test_trace_then_fill_gives_the_mask_back():
    """Random masks (holes, pixels joined at a corner only, pieces on the border): traced, filled, the same."""
    rng = np.random.default_rng(3)
    for k in range(60):
        h, w = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < rng.uniform(0.05, 0.95)
        if k % 3 == 0:  # blobs rather than noise
            m = np.kron(m[: max(1, h // 4), : max(1, w // 4)], np.ones((4, 4), bool))
        rings = O.trace(m)
        assert -sum(O.shoelace(r) for r in rings) == m.sum()  # outer rings negative, holes positive
        for r in rings:
            assert r.dtype == np.int64 and len(r) >= 4
            assert not np.any(np.all(np.diff(np.vstack([r, r[:1]]), axis=0) == 0, axis=1))  # no repeated vertex
        back = O.fill_rings([r.astype(float) for r in rings], *m.shape)
        assert np.array_equal(back, m), k


def test_fill_rings_takes_the_pixels_whose_centres_are_inside():
    # edges on pixel edges: exactly the pixels covered
    assert np.array_equal(np.argwhere(O.fill_rings([_square(2, 3, 5, 7)], 10, 10)),
                          np.argwhere(np.pad(np.ones((4, 3), bool), ((3, 3), (2, 5)))))
    # edges through pixel centres: half-open, the left/top centres in and the right/bottom ones out,
    # so a 10 x 10 px square takes 100 pixels wherever it lies
    for shift in (0.0, 0.25, 0.5, 0.75):
        m = O.fill_rings([_square(10.5 + shift, 10.5 + shift, 20.5 + shift, 20.5 + shift)], 40, 40)
        assert m.sum() == 100
    m = O.fill_rings([_square(10.5, 10.5, 20.5, 20.5)], 40, 40)
    assert m[10, 10] and m[19, 19] and not m[20, 20] and not m[9, 9]
    # a hole cuts its centres out (even-odd); closed or not, the same
    ring = _square(1.2, 1.2, 30.8, 30.8)
    hole = _square(10.1, 10.1, 19.9, 19.9)
    m = O.fill_rings([ring, hole], 32, 32)
    assert m.sum() == 30 * 30 - 10 * 10
    assert np.array_equal(O.fill_rings([np.vstack([ring, ring[:1]]), hole], 32, 32), m)
    # symmetric: a mirrored polygon gives the mirrored mask (no half-pixel lean to one side)
    rng = np.random.default_rng(5)
    a = np.sort(rng.uniform(0, 2 * math.pi, 60))
    star = np.column_stack([20 + rng.uniform(5, 18, 60) * np.cos(a), 20 + rng.uniform(5, 18, 60) * np.sin(a)])
    m = O.fill_rings([star], 40, 40)
    assert np.array_equal(O.fill_rings([np.column_stack([40 - star[:, 0], star[:, 1]])], 40, 40), m[:, ::-1])
    assert np.array_equal(O.fill_rings([np.column_stack([star[:, 0], 40 - star[:, 1]])], 40, 40), m[::-1])
    # outside the mask: clipped; narrower than a pixel row's centre line: nothing
    assert O.fill_rings([_square(-5, -5, 3, 3)], 10, 10).sum() == 9
    assert not O.fill_rings([_square(2, 2.6, 8, 3.4)], 10, 10).any()


def test_fill_rings_is_shapely_at_pixel_centres():
    """Off the edges, a pixel is filled exactly when shapely says its centre is inside the polygon."""
    import shapely
    rng = np.random.default_rng(11)
    for k in range(20):
        n = int(rng.integers(3, 80))
        a = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(10, 60, n)
        outer = np.column_stack([64 + r * np.cos(a), 64 + r * np.sin(a)]) + rng.uniform(-0.5, 0.5)
        hole = _square(*(64 + rng.uniform(-6, -2, 2)), *(64 + rng.uniform(2, 6, 2)))
        rings = [outer, hole] if shapely.Polygon(outer).contains(shapely.Polygon(hole)) else [outer]
        poly = shapely.Polygon(rings[0], rings[1:])
        yy, xx = np.mgrid[:128, :128] + 0.5
        want = shapely.contains_xy(poly, xx, yy)
        on_edge = shapely.distance(poly.boundary, shapely.points(xx, yy)) < 1e-9
        got = O.fill_rings(rings, 128, 128)
        assert not np.any((got != want) & ~on_edge), k


def test_simplify_keeps_the_shape():
    # a staircase (a diagonal traced along pixel edges) becomes its diagonal within the tolerance
    steps = [(i, -i) for i in range(20)] + [(i + 1, -i) for i in range(20)]
    stair = np.array(sorted(steps, key=lambda p: (p[0], -p[1])) + [(20, 0)], float)
    out = O.simplify(stair, 0.75)
    assert len(out) == 3 and out.dtype == np.float64
    assert O.simplify(stair, 0.0) is stair and len(O.simplify(stair, 0.1)) == len(stair)
    # the vertices kept are the ring's own, in order
    idx = [int(np.flatnonzero((stair == v).all(axis=1))[0]) for v in O.simplify(stair, 2.0)]
    assert idx == sorted(idx)


def test_outline_keeps_to_the_vertex_budget():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:600, :600] - 300.0
    ragged = 150 + 40 * rng.random(720)  # a radius per half degree: a jagged edge
    m = np.hypot(xx, yy) < ragged[(np.degrees(np.arctan2(yy, xx)) * 2).astype(int) % 720]
    m[250:350, 250:350] = False  # a hole
    m[20:40, 20:40] = True  # a second piece
    labels, n = label_pieces(m)
    assert n == 2 and sum(len(r) for r in O.trace(m)) > O.MAX_OUTLINE_VERTICES  # the budget binds
    rings = O.outline(labels, 0.5, 0.5)
    assert sum(len(r.xy) for r in rings) <= O.MAX_OUTLINE_VERTICES
    kinds = [(r.piece, r.hole) for r in rings]
    assert kinds == sorted(kinds) and [k for k in kinds if not k[1]] == [(1, False), (2, False)]  # outer first
    assert [500.0, 500.0] in [r.xy.min(axis=0).tolist() for r in rings if r.hole]  # level-0 px: mask px / 0.5
    assert all(r.xy.dtype == np.float64 and len(r.xy) >= 3 for r in rings)
