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
    """Log1p-normalised reference cells on the selected genes, with their types (what the network is fit on)."""

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
        """(T, G) per-type, per-gene variance of the residual (floored), via segment sums."""
        t = len(self.cell_types)
        r = self.residual.astype(np.float64)
        counts = np.bincount(self.type_idx, minlength=t).astype(np.float64)
        ind = sp.csr_matrix((np.ones(len(r)), (self.type_idx, np.arange(len(r)))), shape=(t, len(r)))
        ss = np.asarray(ind @ (r * r))
        return np.maximum(ss / np.maximum(counts, 1)[:, None], _VAR_FLOOR).astype(np.float32)

    def zero_inflated_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(T, G) per type and gene: fraction of cells with zero expression, mean and variance (floored) of the
        residual of the expressing cells (segment sums; types without expressing cells get mean 0, floor var)."""
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
        """The per-type tables the network is built with (type means, variances, zero-inflation statistics)."""
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
    """sha256 over the reference's shape, genes, cell-type labels and count-matrix data."""
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
    """log1p of ``reference`` normalised per cell (over all its genes) to ``target_sum``, on ``genes`` (dense)."""
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
    """Select cells (<= max_cells_per_type per type, seeded) and genes, normalise, log1p, compute type means.

    Genes: ``genes`` if given, else the reference's boolean ``var['Marker']`` column when present, else the
    ``params.n_genes`` most highly variable genes (scanpy, flavor 'seurat', on the log data), capped at the number
    of genes. Each cell is normalised over all of its genes to ``target_sum`` (default: the median library size of
    the selected cells, as scanpy's ``normalize_total``), then restricted to the genes and log1p-transformed.
    Cells with a missing label or an empty library are dropped.
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
