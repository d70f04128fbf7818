"""soScope's Spatial-CITE-seq human skin data (10 proteins + 5 genes per spot, square grid)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd


def read_soscope_humanskin(folder, counts_file: str = "original_count.csv") -> ad.AnnData:
    """Spots x features AnnData of soScope's human-skin Spatial-CITE-seq files (square grid, no image).

    Proteins are the ADT features (name ends with a 15-nt barcode, e.g. ``CD71.CCGTGTTCCTCATTA``); the rest are
    genes.

    Parameters
    ----------
    folder : str or pathlib.Path
        Folder holding ``counts_file`` and ``position_with_center.csv`` (soScope's layout).
    counts_file : str, default "original_count.csv"
        Spots x features counts CSV (first column: spot barcode).

    Returns
    -------
    anndata.AnnData
        Spots x features (float32 ``X``), ``obs`` ``row`` / ``col`` (grid indices), ``var['feature_type']``
        ("protein" / "rna"), ``var['name']`` (barcode suffix removed), ``obsm['spatial']`` = (imagecol,
        imagerow) pixels.

    Raises
    ------
    ValueError
        If spots of the counts file have no position (the message names the position file).
    """
    from pathlib import Path

    folder = Path(folder)
    counts = pd.read_csv(folder / counts_file, index_col=0)
    pos = pd.read_csv(folder / "position_with_center.csv").set_index("barcode")
    missing = counts.index.difference(pos.index)
    if len(missing):
        raise ValueError(
            f"{folder / 'position_with_center.csv'}: no position for {len(missing)} spots of "
            f"{counts_file} (e.g. {list(missing[:3])})"
        )
    pos = pos.loc[counts.index]
    names = counts.columns.astype(str)
    is_prot = names.str.contains(r"\.[ACGT]{15}$", regex=True)
    var = pd.DataFrame(
        {
            "feature_type": np.where(is_prot, "protein", "rna"),
            "name": names.str.replace(r"\.[ACGT]{15}$", "", regex=True),
        },
        index=names,
    )
    a = ad.AnnData(X=counts.to_numpy(np.float32), obs=pos[["row", "col"]].copy(), var=var)
    a.obsm["spatial"] = pos[["imagecol", "imagerow"]].to_numpy(np.float64)
    return a
