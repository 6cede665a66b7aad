"""`kmeans` rows: the runtime's numpy k-means against scikit-learn on the same data, same init count."""

from __future__ import annotations

import time

import numpy as np
from harness import Report, Suite


def kmeans_data(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    """A mixture of k Gaussians of unequal sizes and spreads: stand-in for one slide's features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    weights = rng.dirichlet(np.full(k, 2.0))
    labels = rng.choice(k, size=n, p=weights)
    spread = rng.uniform(0.8, 1.6, size=k).astype(np.float32)
    return (centres[labels] + spread[labels, None] * rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float32)


def kmeans_rows(report: Report, suite: Suite) -> None:
    """numpy (the runtime's) vs scikit-learn k-means, same data and init count, at two thread settings:
    the libraries' defaults (all cores) and one thread (what the pipeline uses below 20k spots)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from mmap_deploy.model.prototypes import kmeans

    x = kmeans_data(suite.kmeans_n, suite.kmeans_dim, suite.kmeans_k)
    common = {"name": "kmeans", "n": suite.kmeans_n, "dim": suite.kmeans_dim, "k": suite.kmeans_k,
              "n_init": suite.kmeans_n_init, "data": "gaussian mixture (seed 0)"}
    runs = {
        "numpy": lambda: kmeans(x, suite.kmeans_k, seed=0, n_init=suite.kmeans_n_init),
        "sklearn": lambda: KMeans(suite.kmeans_k, init="k-means++", n_init=suite.kmeans_n_init, random_state=0,
                                  algorithm="lloyd").fit(x),
    }
    for threads in ("default", 1):
        best: dict[str, dict] = {}
        for _ in range(2):  # two interleaved rounds: the faster of each
            for impl, fn in runs.items():
                with threadpool_limits(limits=None if threads == "default" else threads):
                    t = time.perf_counter()
                    res = fn()
                    sec = time.perf_counter() - t
                inertia = float(res.inertia if impl == "numpy" else res.inertia_)
                iters = int(res.n_iter if impl == "numpy" else res.n_iter_)
                if impl not in best or sec < best[impl]["seconds"]:
                    best[impl] = dict(common, impl=impl, threads=threads, seconds=round(sec, 3), inertia=inertia,
                                      n_iter=iters)
        for row in best.values():
            report.add(row)
