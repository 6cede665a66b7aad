"""Predict the built-in demo slide from Python, then map one gene with scanpy.

    python docs/examples/predict_demo.py [OUT.png]

Needs scanpy (`pip install scanpy`, which brings matplotlib); runs offline
in well under a minute on 2 cores. tests/test_api.py runs this script and
checks that its predictions are those `mmap-predict --demo` writes, bit for bit.
"""

import sys

import matplotlib

matplotlib.use("Agg")  # no display needed: the map goes to a PNG

import matplotlib.pyplot as plt
import scanpy as sc

import mmap_deploy as mm

out_png = sys.argv[1] if len(sys.argv) > 1 else "predict_demo.png"

# The demo: a crop of her2st section B4 (120 spots) and the built-in demo model,
# a tiny model for trying the tool (not for research).
demo = mm.demo_paths()

# One call for one slide. For many slides, load the model once:
#     with mm.Predictor(model="bundle/") as predictor:
#         adata = predictor.predict(slide, coords)
adata = mm.predict(demo.slide, demo.coords)
print(adata)  # 120 spots x 785 genes; obsm['spatial'], uns['spatial'] as scanpy expects

# The AnnData carries the slide's thumbnail and scale factors: scanpy plots it as it is.
sc.pl.spatial(adata, color="FASN", show=False)
plt.savefig(out_png, dpi=100, bbox_inches="tight")
plt.close("all")
print(f"wrote {out_png}")

# Write it as mmap-predict does (atomically; .h5ad, or SpatialData for .zarr):
#     mm.write(adata, "demo.h5ad")
