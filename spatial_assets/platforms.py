"""Platforms without an H&E image (Slide-seq beads, MERFISH-like imaging): every spot / bead is a cell.

No dagster import here.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd


def cells_from_spots(slide: ad.AnnData, platform: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """One cell per spot at the spot's position (cell id ``<spot>_0``): the cells table of image-free platforms.

    Slide-seq doublets are split into two cells later, by cell typing's doublet mode.
    """
    xy = np.asarray(slide.obsm["spatial"], dtype=float)[:, :2]
    names = slide.obs_names.astype(str)
    cells = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "area": np.nan, "label": np.arange(1, len(names) + 1),
                          "spot": names, "spot_distance": 0.0}, index=pd.Index(names + "_0", name="cell_id"))
    umi = np.asarray(slide.X.sum(1)).ravel()
    spots = pd.DataFrame({"n_cells": 1, "n_cells_raw": 1, "total_umi": umi, "qc_pass": umi > 0},
                         index=pd.Index(names, name="spot"))
    summary = {"cells_kept": len(cells), "cells_outside_spots": 0, "spots_filtered": int((umi <= 0).sum()),
               "platform": platform}
    return cells, spots, summary
