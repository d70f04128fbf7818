"""An analytic per-type Gaussian prior with the score-model interface (exact score; network-free)."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch


# ----------------------------------------------------------------------------------------------------------------
# An analytic score model (exact score), used by tests, benchmarks and as a network-free prior
# ----------------------------------------------------------------------------------------------------------------
class GaussianScoreModel:
    """Analytic prior with the score-model interface: log1p expression of a type-t cell = mu_t + N(0, diag(s_t^2)).

    The score of the residual perturbed with noise sigma is exact: ``-x / (s_t^2 + sigma^2)``. Used by tests,
    benchmarks and usable as a network-free prior of the decomposition (same attributes as :class:`ScoreModel`:
    ``genes``, ``cell_types``, ``cell_type_key``, ``type_means``, ``sigmas``, ``sampling_step``,
    ``decomposition_step``, ``steps_per_level``, ``ref_library_size``, ``target_sum``).

    Parameters
    ----------
    genes : sequence of str
        The ``G`` genes.
    cell_types : sequence of str
        The ``T`` cell types.
    type_means : array-like
        ``(T, G)`` per-type mean of log1p expression.
    type_sd : array-like
        Standard deviations: a scalar, ``(T,)`` per type, or ``(T, G)``.
    sigmas : array-like, optional
        Noise levels of the schedule, largest first; default 232 geometric levels from 100 to 0.01.
    cell_type_key : str, default "cell_type"
        Reference column the types come from.
    ref_library_size : float, optional
        Mean library size of the reference on the genes; default from the type means (sum of ``expm1``).
    target_sum : float, optional
        Library size the reference was normalised to; default ``ref_library_size``.
    decomposition_step : float, optional
        Langevin step size of the decomposition; default 1e-5 when the largest sigma exceeds 70, else 1e-6 (as
        for :class:`ScoreModel`).
    sampling_step : float, default 6.6e-6
        Langevin step size of unconditional sampling.
    steps_per_level : int, default 5
        Langevin steps per noise level.
    device : str or torch.device, default "cpu"
        Device of the tensors.

    Raises
    ------
    ValueError
        If ``type_means`` / ``type_sd`` do not broadcast to ``(T, G)``.
    """

    def __init__(
        self,
        genes: Sequence[str],
        cell_types: Sequence[str],
        type_means,
        type_sd,
        *,
        sigmas=None,
        cell_type_key: str = "cell_type",
        ref_library_size: float | None = None,
        target_sum: float | None = None,
        decomposition_step: float | None = None,
        sampling_step: float = 6.6e-6,
        steps_per_level: int = 5,
        device: str | torch.device = "cpu",
    ):
        self.genes = [str(g) for g in genes]
        self.cell_types = [str(t) for t in cell_types]
        self.cell_type_key = cell_type_key
        self.device = torch.device(device)
        self.type_means = torch.as_tensor(np.asarray(type_means), dtype=torch.float32, device=self.device)
        sd = torch.as_tensor(np.asarray(type_sd), dtype=torch.float32, device=self.device)
        if sd.ndim == 0:
            sd = sd.expand_as(self.type_means)
        elif sd.ndim == 1:
            sd = sd[:, None].expand_as(self.type_means)
        if self.type_means.shape != (len(self.cell_types), len(self.genes)) or sd.shape != self.type_means.shape:
            raise ValueError(
                f"GaussianScoreModel: type_means / type_sd must be (n_types={len(self.cell_types)}, "
                f"n_genes={len(self.genes)}), got {tuple(self.type_means.shape)} / {tuple(sd.shape)}"
            )
        self.type_var = (sd**2).contiguous()
        if sigmas is None:
            sigmas = np.geomspace(100.0, 0.01, 232)
        self.sigmas = torch.as_tensor(np.asarray(sigmas), dtype=torch.float32, device=self.device)
        self.sampling_step = float(sampling_step)
        if decomposition_step is None:
            decomposition_step = 1e-5 if float(self.sigmas[0]) > 70 else 1e-6
        self.decomposition_step = float(decomposition_step)
        self.steps_per_level = int(steps_per_level)
        lib = torch.expm1(self.type_means).clamp_min(0).sum(1).mean().item()
        self.ref_library_size = float(ref_library_size if ref_library_size is not None else lib)
        self.target_sum = float(target_sum if target_sum is not None else self.ref_library_size)

    def score(self, x: torch.Tensor, type_idx: torch.Tensor, sigma: float) -> torch.Tensor:
        """Exact score of the noised residual: ``-x / (s_type^2 + sigma^2)``.

        Parameters
        ----------
        x : torch.Tensor
            ``(n, G)`` residuals (log1p expression minus the type mean).
        type_idx : torch.Tensor
            ``(n,)`` long type index of each row.
        sigma : float
            Noise level.

        Returns
        -------
        torch.Tensor
            ``(n, G)`` score.
        """
        return x / self.type_var.index_select(0, type_idx).add(float(sigma) ** 2).neg_()

    def check_compatible(self, reference=None, cell_type_key=None, genes=None) -> None:
        """Check that this model fits a reference, a cell-type column and a gene list.

        Parameters
        ----------
        reference : anndata.AnnData, optional
            Must have the type column and no type the model lacks.
        cell_type_key : str, optional
            Must equal the model's ``cell_type_key``.
        genes : sequence of str, optional
            Must contain every gene of the model.

        Raises
        ------
        ValueError
            Naming what differs.
        """
        if cell_type_key is not None and cell_type_key != self.cell_type_key:
            raise ValueError(f"score model: cell-type column is '{self.cell_type_key}', asked for '{cell_type_key}'")
        if genes is not None:
            missing = [g for g in self.genes if g not in set(map(str, genes))]
            if missing:
                raise ValueError(f"score model: {len(missing)} of its genes are missing, e.g. {missing[:5]}")
        if reference is not None:
            key = cell_type_key or self.cell_type_key
            if key not in reference.obs:
                raise ValueError(f"reference.obs has no column '{key}'")
            absent = sorted(set(reference.obs[key].astype(str)) - set(self.cell_types))
            if absent:
                raise ValueError(f"score model: reference types absent from the model: {absent[:10]}")

    @classmethod
    def from_reference(
        cls,
        reference: ad.AnnData,
        cell_type_key: str = "cell_type",
        *,
        genes: Sequence[str] | None = None,
        target_sum: float | None = None,
        min_sd: float = 0.05,
        **kwargs,
    ) -> GaussianScoreModel:
        """Fit per-type means and per-gene standard deviations of log1p(normalised counts) of a reference.

        Standard deviations are unbiased (n - 1) and floored at ``min_sd``.

        Parameters
        ----------
        reference : anndata.AnnData
            Cells x genes raw counts with the types in ``obs``.
        cell_type_key : str, default "cell_type"
            Column of ``reference.obs`` with the cell types.
        genes : sequence of str, optional
            Restrict to these genes (default: all).
        target_sum : float, optional
            Normalise each cell to this total before log1p; None keeps raw counts (log1p of counts).
        min_sd : float, default 0.05
            Floor of the standard deviations.
        **kwargs
            Passed on to the constructor (``sigmas``, step sizes, ``device``, ...).

        Returns
        -------
        GaussianScoreModel
            The fitted model.

        Raises
        ------
        ValueError
            If ``cell_type_key`` is not a column of ``reference.obs``.
        """
        if cell_type_key not in reference.obs:
            raise ValueError(f"reference.obs has no column '{cell_type_key}' (columns: {list(reference.obs)})")
        ref = reference if genes is None else reference[:, list(genes)]
        X = ref.X.toarray() if sp.issparse(ref.X) else np.asarray(ref.X, dtype=float)
        X = X.astype(np.float64)
        if target_sum is not None:
            lib = X.sum(1, keepdims=True)
            X = X / np.where(lib > 0, lib, 1) * target_sum
        L = np.log1p(X)
        codes, types = pd.factorize(ref.obs[cell_type_key].astype(str), sort=True)
        n = np.bincount(codes, minlength=len(types)).astype(float)
        onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(types), len(codes)))
        mean = (onehot @ L) / n[:, None]
        var = (onehot @ L**2) / n[:, None] - mean**2
        sd = np.sqrt(np.clip(var, 0, None) * n[:, None] / np.maximum(n[:, None] - 1, 1))
        sd = np.maximum(sd, min_sd)
        return cls(
            list(ref.var_names),
            list(types),
            mean,
            sd,
            cell_type_key=cell_type_key,
            ref_library_size=float(np.expm1(L).sum(1).mean()),
            target_sum=target_sum,
            **kwargs,
        )
