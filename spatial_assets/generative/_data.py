"""Training data of the score model: reference marker genes, log1p of per-cell-normalised counts, type means."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from ..params import ScoreModelParams

LOG_INPUT_MAX = 30.0  # METHODS.md input-scale rule: max < 30 -> the matrix holds log1p data


_VAR_FLOOR = 1e-6


@dataclass
class TrainingData:
    """Log1p-normalised reference cells on the selected genes, with their types (what the network is fit on).

    Built by :func:`prepare_training_data`.

    Attributes
    ----------
    x : numpy.ndarray
        ``(n, G)`` float32 log1p of the per-cell-normalised counts.
    type_idx : numpy.ndarray
        ``(n,)`` int64 index of each cell's type into ``cell_types``.
    genes : list of str
        The ``G`` selected genes, in the reference's order.
    cell_types : list of str
        The ``T`` cell types, sorted.
    cell_type_key : str
        Column of the reference's ``obs`` the types came from.
    type_means : numpy.ndarray
        ``(T, G)`` float32 mean of ``x`` per type.
    target_sum : float
        Library size every cell was normalised to (over all its genes).
    ref_library_size : float
        Mean library size of the cells on the selected genes (linear scale, after normalisation).
    fingerprint : str
        :func:`reference_fingerprint` of the reference.
    seed : int
        Seed of the per-type cell subsample.
    input_was_log : bool, default False
        Whether the reference held log1p data (maximum below :data:`LOG_INPUT_MAX`), exponentiated back.
    gene_selection : str, default "all"
        How the genes were chosen: ``"marker"`` (``var['Marker']``), ``"hvg"``, ``"all"`` or ``"given"``.
    cell_names : numpy.ndarray
        ``(n,)`` obs names of the cells kept (empty when unknown).
    """

    x: np.ndarray  # (n, G) float32, log1p(normalised counts)
    type_idx: np.ndarray  # (n,) int64 into cell_types
    genes: list[str]
    cell_types: list[str]
    cell_type_key: str
    type_means: np.ndarray  # (T, G) float32, mean of x per type
    target_sum: float
    ref_library_size: float
    fingerprint: str
    seed: int
    input_was_log: bool = False
    gene_selection: str = "all"  # "marker" | "hvg" | "all" | "given"
    cell_names: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))

    @property
    def residual(self) -> np.ndarray:
        """x minus each cell's type mean (what the score network models)."""
        return self.x - self.type_means[self.type_idx]

    def type_variances(self) -> np.ndarray:
        """Per-type, per-gene variance of the residual ``x - type_means[type_idx]``, via segment sums.

        Returns
        -------
        numpy.ndarray
            ``(T, G)`` float32 variances, floored at 1e-6.
        """
        t = len(self.cell_types)
        r = self.residual.astype(np.float64)
        counts = np.bincount(self.type_idx, minlength=t).astype(np.float64)
        ind = sp.csr_matrix((np.ones(len(r)), (self.type_idx, np.arange(len(r)))), shape=(t, len(r)))
        ss = np.asarray(ind @ (r * r))
        return np.maximum(ss / np.maximum(counts, 1)[:, None], _VAR_FLOOR).astype(np.float32)

    def zero_inflated_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-type, per-gene statistics of a zero-inflated model of the residual.

        Segment sums over cells; types without expressing cells get mean 0 and the floor variance.

        Returns
        -------
        pi : numpy.ndarray
            ``(T, G)`` float32 fraction of cells with zero expression.
        mean : numpy.ndarray
            ``(T, G)`` float32 mean of the residual of the expressing cells.
        var : numpy.ndarray
            ``(T, G)`` float32 variance of the residual of the expressing cells, floored at 1e-6.
        """
        t = len(self.cell_types)
        ind = sp.csr_matrix((np.ones(len(self.x)), (self.type_idx, np.arange(len(self.x)))), shape=(t, len(self.x)))
        counts = np.bincount(self.type_idx, minlength=t).astype(np.float64)[:, None]
        nz = (self.x != 0).astype(np.float64)
        r = self.residual.astype(np.float64) * nz
        n_nz = np.asarray(ind @ nz)
        mean = np.asarray(ind @ r) / np.maximum(n_nz, 1)
        var = np.asarray(ind @ (r * r)) / np.maximum(n_nz, 1) - mean**2
        pi = 1 - n_nz / np.maximum(counts, 1)
        return (pi.astype(np.float32), mean.astype(np.float32), np.maximum(var, _VAR_FLOOR).astype(np.float32))

    def net_stats(self) -> dict[str, torch.Tensor]:
        """The per-type tables the network is built with.

        Returns
        -------
        dict of str to torch.Tensor
            ``type_means``, ``type_var`` (:meth:`type_variances`), ``zi_pi``, ``zi_mean``, ``zi_var``
            (:meth:`zero_inflated_stats`), each ``(T, G)``.
        """
        pi, m, v = self.zero_inflated_stats()
        return {
            "type_means": torch.from_numpy(self.type_means),
            "type_var": torch.from_numpy(self.type_variances()),
            "zi_pi": torch.from_numpy(pi),
            "zi_mean": torch.from_numpy(m),
            "zi_var": torch.from_numpy(v),
        }


def _matrix_hash(x) -> str:
    h = hashlib.sha256()
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        for arr in (x.data, x.indices, x.indptr):
            h.update(np.ascontiguousarray(arr).tobytes())
    else:
        h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
    return h.hexdigest()


def _type_labels(reference: AnnData, cell_type_key: str, what: str = "reference") -> pd.Series:
    if cell_type_key not in reference.obs.columns:
        raise ValueError(
            f"{what}.obs has no cell-type column '{cell_type_key}' (columns: {list(reference.obs.columns)})"
        )
    return reference.obs[cell_type_key]


def reference_fingerprint(reference: AnnData, cell_type_key: str) -> str:
    """sha256 over the reference's shape, genes, cell-type labels and count-matrix data.

    A checkpoint records it, so a model trained on another reference is detected.

    Parameters
    ----------
    reference : anndata.AnnData
        Cells x genes reference.
    cell_type_key : str
        Column of ``reference.obs`` with the cell types.

    Returns
    -------
    str
        Hex digest.

    Raises
    ------
    ValueError
        If ``cell_type_key`` is not a column of ``reference.obs``.
    """
    labels = _type_labels(reference, cell_type_key)
    h = hashlib.sha256()
    h.update(f"shape={reference.shape[0]}x{reference.shape[1]}\n".encode())
    h.update(("genes=" + "\x1f".join(map(str, reference.var_names)) + "\n").encode())
    h.update(f"key={cell_type_key}\n".encode())
    h.update(("types=" + "\x1f".join(labels.astype(str).tolist()) + "\n").encode())
    h.update(("X=" + _matrix_hash(reference.X)).encode())
    return h.hexdigest()


def _as_csr(x) -> sp.csr_matrix:
    return sp.csr_matrix(x, dtype=np.float64) if sp.issparse(x) else sp.csr_matrix(np.asarray(x, dtype=np.float64))


def _linear_counts(reference: AnnData) -> tuple[sp.csr_matrix, bool]:
    """Reference X on the linear scale (METHODS.md rule: max < 30 means log1p data, exponentiated back)."""
    x = _as_csr(reference.X)
    if x.nnz and not np.all(np.isfinite(x.data)):
        raise ValueError("reference.X contains non-finite values (NaN / inf); expected counts or log1p data")
    if x.nnz and x.data.min() < 0:
        raise ValueError(f"reference.X has negative values (min {x.data.min():.3g}); expected counts or log1p data")
    was_log = bool(x.nnz == 0 or x.data.max() < LOG_INPUT_MAX)
    if was_log:
        x = x.copy()
        x.data = np.expm1(x.data)
    return x, was_log


def _normalise_log(lin: sp.csr_matrix, target_sum: float) -> sp.csr_matrix:
    lib = np.asarray(lin.sum(1)).ravel()
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    out = sp.diags(scale) @ lin
    out = sp.csr_matrix(out)
    out.data = np.log1p(out.data)
    return out


def log_normalise(reference: AnnData, genes: Sequence[str], target_sum: float) -> np.ndarray:
    """log1p of the reference normalised per cell (over all its genes) to ``target_sum``, on ``genes``.

    Log1p input (maximum below :data:`LOG_INPUT_MAX`) is exponentiated back first, as in
    :func:`prepare_training_data`.

    Parameters
    ----------
    reference : anndata.AnnData
        Cells x genes counts (or log1p data).
    genes : sequence of str
        Genes to return, in this order.
    target_sum : float
        Library size each cell is normalised to.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, len(genes))`` dense float32 array.

    Raises
    ------
    ValueError
        If genes are missing from the reference, or ``X`` holds negative or non-finite values.
    """
    missing = [g for g in genes if g not in set(reference.var_names)]
    if missing:
        raise ValueError(f"reference lacks {len(missing)} of the {len(genes)} genes: {missing[:10]}")
    lin, _ = _linear_counts(reference)
    logx = _normalise_log(lin, target_sum)
    cols = reference.var_names.get_indexer(list(genes))
    return np.asarray(logx[:, cols].toarray(), dtype=np.float32)


def _subsample_per_type(codes: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Indices (sorted) of at most ``cap`` random cells per type code; vectorised via a permutation + cumcount."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(codes))
    rank = pd.Series(codes[perm]).groupby(codes[perm]).cumcount().to_numpy()
    return np.sort(perm[rank < cap])


def prepare_training_data(
    reference: AnnData,
    cell_type_key: str,
    params: ScoreModelParams,
    *,
    target_sum: float | None = None,
    genes: Sequence[str] | None = None,
) -> TrainingData:
    """Select cells and genes of a reference, normalise, log1p, and compute the type means.

    Cells: at most ``params.max_cells_per_type`` per type (seeded subsample); cells with a missing label or an
    empty library are dropped. Genes: ``genes`` if given, else the reference's boolean ``var['Marker']`` column
    when present, else the ``params.n_genes`` most highly variable genes (scanpy, flavor "seurat", on the log data;
    all genes when there are no more than ``n_genes``). Each cell is normalised over all of its genes to
    ``target_sum``, then restricted to the genes and log1p-transformed. Log1p input (maximum below
    :data:`LOG_INPUT_MAX`) is exponentiated back first.

    Parameters
    ----------
    reference : anndata.AnnData
        Cells x genes raw counts (or log1p data) with the types in ``obs``.
    cell_type_key : str
        Column of ``reference.obs`` with the cell types.
    params : spatial_assets.params.ScoreModelParams
        Uses ``max_cells_per_type``, ``n_genes`` and ``seed``.
    target_sum : float, optional
        Library size each cell is normalised to; default the median library size of the selected cells (as
        scanpy's ``normalize_total``).
    genes : sequence of str, optional
        Use exactly these genes.

    Returns
    -------
    TrainingData
        The training cells, genes, types and type means.

    Raises
    ------
    ValueError
        If the reference is empty or has no usable cell, the type column is missing, ``X`` holds negative or
        non-finite values, given genes are missing, ``var['Marker']`` is not boolean or marks fewer than 2 genes,
        or ``target_sum`` is not positive.
    """
    if reference.n_obs == 0 or reference.n_vars == 0:
        raise ValueError(f"reference is empty: shape {reference.shape}, expected cells x genes")
    labels = _type_labels(reference, cell_type_key)
    fingerprint = reference_fingerprint(reference, cell_type_key)
    lin, was_log = _linear_counts(reference)
    lib = np.asarray(lin.sum(1)).ravel()
    ok = labels.notna().to_numpy() & (lib > 0)
    if not ok.any():
        raise ValueError(f"reference has no usable cells: every cell lacks a '{cell_type_key}' label or has 0 counts")
    lab = labels.astype(str).to_numpy()
    cell_types = sorted(set(lab[ok]))
    codes_all = pd.Categorical(lab, categories=cell_types).codes.astype(np.int64)
    ok_idx = np.flatnonzero(ok)
    keep = ok_idx[_subsample_per_type(codes_all[ok_idx], params.max_cells_per_type, params.seed)]
    lin = lin[keep]
    if target_sum is None:
        target_sum = float(np.median(lib[keep]))
    if not target_sum > 0:
        raise ValueError(f"target_sum must be > 0, got {target_sum}")
    logx = _normalise_log(lin, target_sum)  # cells x all genes

    var_names = reference.var_names.astype(str)
    if genes is not None:
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in set(var_names)]
        if missing:
            raise ValueError(f"genes: {len(missing)} of {len(genes)} not in reference.var_names: {missing[:10]}")
        cols, selection = var_names.get_indexer(genes), "given"
    elif "Marker" in reference.var.columns:
        marker = reference.var["Marker"].to_numpy()
        if marker.dtype != bool:
            raise ValueError(f"reference.var['Marker'] must be boolean, found dtype {marker.dtype}")
        if marker.sum() < 2:
            raise ValueError(f"reference.var['Marker'] marks {int(marker.sum())} genes; expected at least 2")
        cols, selection = np.flatnonzero(marker), "marker"
    elif params.n_genes >= reference.n_vars:
        cols, selection = np.arange(reference.n_vars), "all"
    else:
        import scanpy as sc

        tmp = AnnData(logx.astype(np.float32))
        tmp.var_names = var_names
        hv = sc.pp.highly_variable_genes(tmp, n_top_genes=params.n_genes, flavor="seurat", inplace=False)
        disp = np.nan_to_num(hv["dispersions_norm"].to_numpy(dtype=float), nan=-np.inf)
        # exactly n_genes (scanpy may return more on ties), kept in the reference's gene order
        cols, selection = np.sort(np.argsort(-disp, kind="stable")[: params.n_genes]), "hvg"
    x = np.asarray(logx[:, cols].toarray(), dtype=np.float32)
    type_idx = codes_all[keep]
    t = len(cell_types)
    counts = np.bincount(type_idx, minlength=t)
    ind = sp.csr_matrix((np.ones(len(x)), (type_idx, np.arange(len(x)))), shape=(t, len(x)))
    type_means = (np.asarray(ind @ x.astype(np.float64)) / counts[:, None]).astype(np.float32)
    ref_library_size = float(np.expm1(x.astype(np.float64)).sum(1).mean())
    return TrainingData(
        x=x,
        type_idx=type_idx,
        genes=[str(g) for g in var_names[cols]],
        cell_types=cell_types,
        cell_type_key=cell_type_key,
        type_means=type_means,
        target_sum=float(target_sum),
        ref_library_size=ref_library_size,
        fingerprint=fingerprint,
        seed=params.seed,
        input_was_log=was_log,
        gene_selection=selection,
        cell_names=np.asarray(reference.obs_names[keep]),
    )
