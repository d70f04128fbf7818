"""Gene identifiers of a slide against its reference: too few shared genes is explained (Ensembl IDs vs symbols,
another species' case, a var column that would match), before any stage runs. No dagster import here."""

from __future__ import annotations

import re
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ._readers import InputError

_ENSEMBL = re.compile(r"^ENS[A-Z]{0,6}G\d{6,}(\.\d+)?$")


def id_kind(genes: Sequence[str]) -> str:
    """The kind of gene identifiers in ``genes``, by majority.

    Parameters
    ----------
    genes : sequence of str
        Gene identifiers (e.g. ``var_names``).

    Returns
    -------
    str
        ``'ensembl'`` (more than half match an Ensembl gene ID), ``'symbol (human-like case)'`` (``GFAP``: over
        80% of the names with letters are upper-case), ``'symbol (mouse-like case)'`` (``Gfap``: over 60% are
        title-case), ``'symbol'`` otherwise, or ``'empty'`` when ``genes`` is empty.
    """
    g = pd.Index(np.asarray(genes, dtype=str))
    if len(g) == 0:
        return "empty"
    if np.mean([bool(_ENSEMBL.match(x)) for x in g]) > 0.5:
        return "ensembl"
    letters = g[g.str.contains(r"[A-Za-z]{2,}", regex=True)]
    if len(letters) == 0:
        return "symbol"
    upper = float(np.mean(letters.str.upper() == letters))
    title = float(np.mean(letters.str[:1].str.isupper() & (letters.str[1:].str.lower() == letters.str[1:])))
    if upper > 0.8:
        return "symbol (human-like case)"
    if title > 0.6:
        return "symbol (mouse-like case)"
    return "symbol"


def check_gene_ids(
    slide: ad.AnnData,
    reference_genes: Sequence[str] | pd.Index,
    *,
    slide_source: str = "slide",
    reference_source: str = "reference",
    min_shared: int = 10,
) -> dict:
    """Check that slide and reference share genes; when they do not, say why.

    Parameters
    ----------
    slide : anndata.AnnData
        The slide (``var_names`` and ``var`` columns such as ``gene_ids`` are inspected).
    reference_genes : sequence of str or pandas.Index
        The reference's ``var_names``.
    slide_source, reference_source : str
        Names (files) used in the message.
    min_shared : int
        Fewest shared genes accepted (as cell typing's ``min_shared_genes``).

    Returns
    -------
    dict
        ``shared``, ``slide_ids``, ``reference_ids`` (the kinds of identifiers found).

    Raises
    ------
    InputError
        Fewer than ``min_shared`` genes are shared; the message names both kinds of identifiers, a case-insensitive
        match count when it is higher (another species' naming), and any ``var`` column of the slide that matches.
    """
    ref = pd.Index(np.asarray(reference_genes, dtype=str))
    sg = pd.Index(slide.var_names.astype(str))
    shared = int(sg.isin(ref).sum())
    info = {"shared": shared, "slide_ids": id_kind(sg), "reference_ids": id_kind(ref)}
    if shared >= min_shared:
        return info
    hints = []
    if info["slide_ids"] != info["reference_ids"]:
        hints.append(f"the slide's var_names are {info['slide_ids']}, the reference's are {info['reference_ids']}")
    ci = int(sg.str.upper().isin(ref.str.upper()).sum())
    if ci > shared and ci >= min_shared:
        i = int(np.flatnonzero(sg.str.upper().isin(ref.str.upper()) & ~sg.isin(ref))[0])
        match = ref[ref.str.upper() == sg[i].upper()][0]
        hints.append(
            f"{ci} genes match ignoring case (e.g. slide '{sg[i]}' vs reference '{match}'): a reference of "
            "another species, or names in another case; use a reference of the slide's species (or map orthologs)"
        )
    for col in slide.var.columns:
        vals = pd.Index(slide.var[col].astype(str))
        n = int(vals.isin(ref).sum())
        if n >= min_shared and n > shared:
            hints.append(f"slide var['{col}'] shares {n} genes with the reference: use it as var_names")
    raise InputError(
        f"{slide_source} and {reference_source} share {shared} genes (var_names); expected at least {min_shared}. "
        + ("; ".join(hints) if hints else f"e.g. slide {list(sg[:3])}, reference {list(ref[:3])}")
    )


def reference_gene_names(path) -> pd.Index:
    """The ``var_names`` of a reference ``.h5ad`` without reading its counts.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.h5ad`` file.

    Returns
    -------
    pandas.Index
        The gene names, as strings.
    """
    import h5py

    with h5py.File(path, "r") as f:
        return pd.Index(ad.io.read_elem(f["var"]).index.astype(str))
