# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # spatial_assets in a notebook: the demo slide through the API, without Dagster
#
# `import spatial_assets as sa`, then `sa.io` (read / validate / write), `sa.seg` (nuclei -> cells per spot),
# `sa.tl` (cell types, decomposition, soScope enhancement) and `sa.pl` (figures). Every `sa.tl` output is
# scanpy-ready (`obsm['spatial']`, `uns['spatial']`, `layers['counts']`), and `sa.io.to_spatialdata` gathers a
# sample into one SpatialData store.
#
# This file is jupytext "percent" format: open it as a notebook (`jupytext --to ipynb docs/tutorial.py`) or run
# it as a script (`python docs/tutorial.py`). The test suite runs it (`tests/test_tutorial.py`). Outputs go to
# `$SA_TUTORIAL_OUT` (default: a temporary folder).

# %%
import os
import tempfile
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc

import spatial_assets as sa
from spatial_assets.params import CellTypingParams, SegmentationParams, SoScopeParams

out = Path(os.environ.get("SA_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="sa_tutorial_"))
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. Data: a small window of the demo (real osmFISH cells, Visium-like spots, an H&E-like image)
# For your own slide use `sa.io.load_slide("spaceranger/outs", "visium", "tissue.tif")` (see docs/OWN_SLIDE.md).

# %%
demo = sa.datasets.build_demo(out / "demo", seed=0, crop_um=(0.0, 1200.0, 900.0, 2100.0))
inputs = sa.io.load_slide(demo.slide, "visium", demo.image, name="demo")
reference = sa.io.load_reference(demo.reference, "cell_type")
print(inputs.slide, "\nimage", inputs.image.shape, "\nreference", reference.shape)

# %% [markdown]
# ## 2. Nuclei segmentation (the StarDist model bundled with the package) and cells per spot

# %%
seg = sa.seg.segment_sample(
    inputs.slide, inputs.image, "visium", SegmentationParams(model="bundled:stardist_nuclei", min_umi=20)
)
print(len(seg.cells), "cells;", seg.summary)

# %% [markdown]
# ## 3. Cell types: RCTD spot proportions, a type per cell (Potts prior)
# `typed.spots` is a spots x types AnnData over every input barcode; `obs['typing_status']` says why a spot
# was not typed.

# %%
typed = sa.tl.cell_types(
    inputs.slide,
    reference,
    "cell_type",
    seg,
    CellTypingParams(min_cells_per_type=5, sigma_fit_min_umi=50, small_types="drop"),
)
print(typed.spots.obs["typing_status"].value_counts())
fig = sa.pl.cell_types(typed.cells)
fig.savefig(out / "cell_types.png")

# %% [markdown]
# ## 4. Decomposition of each spot into its cells
# Without a trained score model `sa.tl.decompose` uses the analytic per-type Gaussian prior (fast); train the
# full score model with `sa.generative.train_score_model` and pass `model=`.

# %%
cells = sa.tl.decompose(inputs.slide, typed, reference, "cell_type")
print(cells)
print(cells.uns["X_description"])
print("spot reconstruction error:", round(cells.uns["decomposition"]["reconstruction_rel_error"], 4))

# %% [markdown]
# Scanpy-ready: `sc.pl.spatial` works as is (the H&E under the cells).

# %%
sc.pl.spatial(cells, color="cell_type", spot_size=20, show=False)
plt.savefig(out / "decomposed_cells_spatial.png")
plt.close("all")

# %% [markdown]
# ## 5. soScope: sub-spots (few epochs here, to stay quick; the default is 400)

# %%
sub = sa.tl.enhance(inputs.slide, SoScopeParams(epochs=10, vgae_epochs=10, image_features="none"), nuclei=seg.cells)
gene = sub.var_names[int(np.argmax(np.asarray(sub.X).sum(0)))]
sc.pl.spatial(sub, color=gene, spot_size=15, show=False)
plt.savefig(out / "subspots_spatial.png")
plt.close("all")

# %% [markdown]
# ## 6. One SpatialData store for the sample, rendered with spatialdata-plot

# %%
import spatialdata as sd  # noqa: E402
import spatialdata_plot  # noqa: E402, F401

sdata = sa.io.to_spatialdata(
    inputs.slide,
    image=np.asarray(inputs.image),
    labels=np.asarray(seg.labels),
    cells=typed.cells,
    decomposed=cells,
    spot_weights=typed.spots,
    subspots=sub,
    sample="demo",
)
path = sa.io.write_spatialdata(sdata, out / "demo_spatialdata.zarr")
sdata = sd.read_zarr(path)
print(sdata)
sdata.pl.render_images("demo_he").pl.render_shapes("cells", color="cell_type", table_name="typed_cells").pl.show(
    coordinate_systems="global"
)
plt.savefig(out / "spatialdata.png")
plt.close("all")
print("outputs in", out)
