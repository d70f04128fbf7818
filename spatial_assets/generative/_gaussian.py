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

    The score of the residual perturbed with noise sigma is exact: ``-x / (s_t^2 + sigma^2)``.
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
        """Exact score of the noised residual: ``-x / (s_type^2 + sigma^2)``."""
        return x / self.type_var.index_select(0, type_idx).add(float(sigma) ** 2).neg_()

    def check_compatible(self, reference=None, cell_type_key=None, genes=None) -> None:
        """Raise ValueError naming what differs between this model and a reference / key / gene list."""
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

        ``target_sum`` None keeps raw counts (log1p of counts); else each cell is normalised to that total first.
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
