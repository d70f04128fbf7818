"""Validation of inputs when they are registered: every error names the file, the field and what was expected.

Pure functions over AnnData / numpy / paths (no dagster). The input assets (``reference_data``,
``slide_inputs``) and the config loader call them, so bad data is refused before any training:

* :func:`check_name`: the one check for every name that becomes a path (samples, references, slices groups,
  landing folders);
* :func:`read_h5ad_file`: an ``.h5ad`` read whose failures (missing, a folder, truncated, not HDF5) name the path;
* :func:`check_unique_names`, :func:`check_raw_counts`, :func:`check_not_empty`, :func:`zero_count_spots`,
  :func:`check_shared_genes`: the checks on counts and names;
* :func:`ensure_storage_root`: a storage root that cannot be created names itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ._readers import InputError

_BAD_NAME_CHARS = '/\\|:*?"<> \t\n'
_ENSEMBL = re.compile(r"^ENS[A-Z]*[GTP]\d{6,}(\.\d+)?$")


class UnsafeNameError(InputError):
    """A name that would become a path is unsafe."""


def check_name(v: object, what: str = "name") -> str:
    """A name that becomes a folder or file name under ``storage_root``.

    Parameters
    ----------
    v : object
        The name (a sample, reference, slices group or landing sub-folder).
    what : str
        What the name is, for the message (e.g. ``"sample name"``).

    Returns
    -------
    str
        ``v`` unchanged.

    Raises
    ------
    UnsafeNameError
        (an :class:`InputError`, so a ``ValueError``) ``v`` is not a string, is longer than 200 characters, is
        empty, ``.`` / ``..``, starts with ``.``, holds a path separator, a drive colon, a wildcard, quotes,
        ``<`` / ``>``, whitespace or a non-printable character, or is absolute.
    """
    if (
        not isinstance(v, str)
        or not v
        or v in (".", "..")
        or v.startswith(".")
        or any(c in v for c in _BAD_NAME_CHARS)
        or not v.isprintable()
        or os.path.isabs(v)
        or len(v) > 200
    ):
        raise UnsafeNameError(
            f"{what} {v!r}: must be a non-empty printable name of at most 200 characters, without '/', '\\', '|', "
            "':', '*', '?', quotes, '<', '>', spaces or a leading '.' (it becomes a folder name under storage_root)"
        )
    return v


def read_h5ad_file(path: str | os.PathLike, what: str = "AnnData") -> ad.AnnData:
    """Read an ``.h5ad`` file; every failure names the path.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    what : str
        What the file holds, for the message (e.g. ``"reference"``).

    Returns
    -------
    anndata.AnnData

    Raises
    ------
    InputError
        The path does not exist, is a folder, or cannot be read as an AnnData ``.h5ad`` (truncated, not HDF5).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} file not found; expected an AnnData .h5ad file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected the {what} as an AnnData .h5ad file")
    try:
        return ad.read_h5ad(path)
    except Exception as e:
        raise InputError(
            f"{path}: could not be read as an AnnData .h5ad {what} file (truncated or not HDF5?) "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from None


def check_unique_names(names: Sequence[str], source: str, field: str) -> None:
    """``names`` must be unique (checked before anndata would silently rename duplicates to ``name-1``).

    Parameters
    ----------
    names : sequence of str
        The names (e.g. ``var_names`` or ``obs_names``); compared as strings.
    source : str
        The file, for the message.
    field : str
        What the names are, for the message (e.g. ``"var_names (genes)"``).

    Raises
    ------
    InputError
        Naming ``source``, ``field``, how many names repeat and a few of them.
    """
    idx = np.asarray(list(map(str, names)), dtype=object)
    if idx.size == 0:
        return
    uniq, counts = np.unique(idx, return_counts=True)
    dup = uniq[counts > 1]
    if dup.size:
        ex = ", ".join(f"'{d}' x{int(c)}" for d, c in zip(dup[:5], counts[counts > 1][:5]))
        raise InputError(
            f"{source}: {field} has {dup.size} duplicated name(s) (e.g. {ex}); expected unique names "
            "(duplicates are not renamed or merged silently: aggregate or rename them first)"
        )


def check_not_empty(adata: ad.AnnData, source: str, what: str = "spots") -> None:
    """At least one observation and one gene.

    Parameters
    ----------
    adata : anndata.AnnData
        Spots or cells x genes.
    source : str
        The file, for the message.
    what : str
        What the observations are, for the message (e.g. ``"spots"``, ``"cells"``).

    Raises
    ------
    InputError
        ``adata`` has no observations (``what``) or no genes.
    """
    if adata.n_obs == 0:
        raise InputError(f"{source}: X has 0 {what}; expected at least one (is the file empty?)")
    if adata.n_vars == 0:
        raise InputError(f"{source}: var has 0 genes; expected at least one gene")


def _values(X) -> np.ndarray:
    return np.asarray(X.data if sp.issparse(X) else np.asarray(X).ravel(), dtype=np.float64)


def check_raw_counts(adata: ad.AnnData, source: str, *, layer: str | None = None) -> None:
    """Counts must be finite, non-negative integers; log-normalised or scaled data is named with examples.

    Parameters
    ----------
    adata : anndata.AnnData
        Spots or cells x genes.
    source : str
        The file, for the message.
    layer : str, optional
        A layer instead of ``X``.

    Raises
    ------
    InputError
        Non-finite, negative or non-integer values; the message gives example values, the maximum and whether
        the matrix looks log1p-transformed (max < 30) or scaled to a fixed total per row.
    """
    X = adata.layers[layer] if layer else adata.X
    field = f"layers['{layer}']" if layer else "X"
    data = _values(X)
    if data.size == 0:
        return
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(f"{source}: {field} has {int(bad.sum())} NaN or infinite values; expected raw integer counts")
    mn = float(data.min())
    if mn < 0:
        raise InputError(
            f"{source}: {field} has negative values (min {mn:g}); expected raw integer counts "
            "(scaled / centred data cannot be used)"
        )
    frac = np.abs(data - np.round(data)) > 1e-6
    if not frac.any():
        return
    ex = ", ".join(f"{v:.4g}" for v in data[frac][:3])
    mx = float(data.max())
    if mx < 30:
        kind = "it looks log-normalised (log1p, max < 30)"
    else:
        sums = np.asarray(X.sum(1)).ravel()
        sums = sums[sums > 0]
        same = sums.size > 1 and float(sums.std() / max(sums.mean(), 1e-12)) < 1e-3
        kind = f"it looks scaled to {float(np.median(sums)):g} per row" if same else "it looks normalised or scaled"
    raise InputError(
        f"{source}: {field} has non-integer values (e.g. {ex}; max {mx:g}; {int(frac.sum())} of {data.size} "
        f"stored values): {kind}; expected raw integer counts (use the raw counts, e.g. layers['counts'] or .raw)"
    )


def zero_count_spots(adata: ad.AnnData) -> np.ndarray:
    """Boolean mask of the observations whose counts sum to zero.

    Parameters
    ----------
    adata : anndata.AnnData
        Spots or cells x genes (``X`` is summed per row).

    Returns
    -------
    numpy.ndarray
        Boolean, one entry per observation: ``True`` where the row's counts sum to zero (or less).
    """
    return np.asarray(adata.X.sum(1)).ravel() <= 0


def _looks_ensembl(names: Sequence[str]) -> bool:
    names = list(names)[:200]
    return bool(names) and sum(bool(_ENSEMBL.match(str(n))) for n in names) > 0.5 * len(names)


def _case(names: Sequence[str]) -> str:
    names = [str(n) for n in list(names)[:200] if any(c.isalpha() for c in str(n))]
    if not names:
        return "other"
    upper = sum(n == n.upper() for n in names) / len(names)
    title = sum(n[:1].isupper() and n[1:] == n[1:].lower() for n in names) / len(names)
    return "upper" if upper > 0.8 else "title" if title > 0.8 else "mixed"


def check_shared_genes(
    slide_genes: Sequence[str],
    reference_genes: Sequence[str],
    slide_source: str,
    reference_source: str,
    min_shared: int,
) -> int:
    """Slide and reference must share at least ``min_shared`` gene names.

    Parameters
    ----------
    slide_genes, reference_genes : sequence of str
        The two ``var_names``.
    slide_source, reference_source : str
        The files, for the message.
    min_shared : int
        Fewest shared genes accepted (``parameters.cell_typing.min_shared_genes``).

    Returns
    -------
    int
        The number of shared genes.

    Raises
    ------
    InputError
        Fewer shared genes; the message shows examples of each side's names and a hint when one side looks like
        Ensembl IDs or when the two sides use another case (another species' convention, e.g. GAD2 vs Gad2).
    """
    s, r = [str(g) for g in slide_genes], [str(g) for g in reference_genes]
    shared = len(set(s) & set(r))
    if shared >= min_shared:
        return shared
    hints = []
    for side, names in (("slide", s), ("reference", r)):
        if _looks_ensembl(names):
            hints.append(f"the {side}'s var_names look like Ensembl IDs: map them to gene symbols")
    cs, cr = _case(s), _case(r)
    if cs != cr and "other" not in (cs, cr):
        upper_shared = len({g.upper() for g in s} & {g.upper() for g in r})
        hints.append(
            f"the slide's names are {cs}-case and the reference's {cr}-case ({upper_shared} match ignoring case): "
            "human symbols are upper-case (GAD2), mouse ones title-case (Gad2); is one side another species?"
        )
    raise InputError(
        f"{slide_source} var_names and {reference_source} var_names share {shared} genes; expected at least "
        f"{min_shared} (parameters.cell_typing.min_shared_genes). Slide genes e.g. {s[:5]}; reference genes e.g. "
        f"{r[:5]}" + (f". Hint: {'; '.join(hints)}" if hints else "")
    )


def ensure_storage_root(root: str | os.PathLike) -> Path:
    """Create ``root`` (and parents) if needed.

    Parameters
    ----------
    root : str or os.PathLike
        The storage root folder.

    Returns
    -------
    pathlib.Path
        ``root``, existing, a folder and writable.

    Raises
    ------
    InputError
        The folder cannot be created or written (the message names it and the reason).
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(
            f"storage_root {root}: cannot be created ({type(e).__name__}: {e.strerror or e}); expected a writable folder"
        ) from None
    if not root.is_dir():
        raise InputError(f"storage_root {root}: exists but is not a folder; expected a writable folder")
    if not os.access(root, os.W_OK):
        raise InputError(f"storage_root {root}: is not writable; expected a writable folder")
    return root


def gene_names(path: str | os.PathLike) -> list[str]:
    """The ``var_names`` of an ``.h5ad`` file, without reading its count matrix.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.h5ad`` file.

    Returns
    -------
    list of str
        The gene names, in the file's order.

    Raises
    ------
    InputError
        The file cannot be read (the message names it).
    """
    path = Path(path)
    if path.is_dir() or not path.exists():
        return [str(g) for g in read_h5ad_file(path).var_names]  # raises, naming the path
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return [str(g) for g in ad.io.read_elem(f["var"]).index]
    except Exception as e:
        raise InputError(
            f"{path}: could not read var (gene names) of the .h5ad file ({type(e).__name__}: {str(e)[:200]})"
        ) from None


def check_cell_types(adata: ad.AnnData, cell_type_key: str, min_cells_per_type: int, source: str) -> dict[str, int]:
    """At least 2 cell types with at least ``min_cells_per_type`` cells each (after the small-types policy).

    Parameters
    ----------
    adata : anndata.AnnData
        The reference (cells x genes).
    cell_type_key : str
        The ``obs`` column of cell types (missing values are ignored).
    min_cells_per_type : int
        Fewest cells for a type to count as usable (``cell_typing.min_cells_per_type``).
    source : str
        The file, for the message.

    Returns
    -------
    dict
        Cells per usable type.

    Raises
    ------
    InputError
        Fewer than 2 usable types; the message gives the cells per type.
    """
    counts = adata.obs[cell_type_key].dropna().astype(str).value_counts()
    usable = counts[counts >= min_cells_per_type]
    if len(usable) < 2:
        raise InputError(
            f"{source}: obs['{cell_type_key}'] has {len(usable)} type(s) with at least {min_cells_per_type} cells "
            f"(cell_typing.min_cells_per_type); expected at least 2 such types (cells per type: "
            f"{dict(counts.head(10))})"
        )
    return {str(k): int(v) for k, v in usable.items()}


MIN_SPOTS_WITH_NUCLEI = 0.5


def spots_with_nuclei_problem(
    n_cells_per_spot, sample: str, min_fraction: float = MIN_SPOTS_WITH_NUCLEI
) -> tuple[float, str | None]:
    """The fraction of spots holding a segmented nucleus, and a message when it is below ``min_fraction``.

    On a slide whose spots cover tissue nearly every spot holds nuclei; far fewer means the coordinates put the
    spots off the tissue of the image (x / y swapped, another image's pixels or scale).

    Parameters
    ----------
    n_cells_per_spot : array-like
        Number of segmented nuclei in each spot.
    sample : str
        The sample's name, for the message.
    min_fraction : float
        Fewest fraction of spots with at least one nucleus accepted (default :data:`MIN_SPOTS_WITH_NUCLEI`).

    Returns
    -------
    (float, str or None)
        The fraction, and ``None`` or the message (naming the sample, ``obsm['spatial']`` and the expectation).
    """
    n = np.asarray(n_cells_per_spot, dtype=float).ravel()
    frac = float((n > 0).mean()) if n.size else 0.0
    if frac >= min_fraction:
        return frac, None
    return frac, (
        f"sample '{sample}': nuclei found in {frac:.0%} of the spots; expected at least {min_fraction:.0%}. Are "
        "obsm['spatial'] coordinates (x, y) in full-resolution pixels of this image, or are x and y swapped?"
    )
