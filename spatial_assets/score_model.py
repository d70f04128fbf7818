"""Cell-type-conditioned score model of a single-cell reference (SpatialScope's generative prior).

The network models the residual ``x = log1p(normalised expression) - mu_type`` of a cell of a given type, and is
trained by denoising score matching over a geometric noise schedule (NCSN). It returns ``sigma * score`` (the
noise-conditional parameterisation); :meth:`ScoreModel.score` divides by sigma.

Architecture (replaces SpatialScope's 56 M-parameter 1-D U-Net): a residual MLP over genes,

- input preconditioning ``x / sqrt(v_type + sigma^2)`` with ``v_type`` the per-type, per-gene residual variance;
- FiLM conditioning (scale / shift per block) on Fourier features of log sigma + a learned type embedding + a
  linear projection of ``mu_type``;
- an analytic skip: the output is the exact ``sigma * score`` of a per-type model with independent genes plus the
  network's correction (zero-initialised), so training starts at that model and learns the rest. Default
  "gaussian": the per-type diagonal Gaussian N(0, v_type). Option "zi_gaussian": a zero-inflated Gaussian per gene
  (a point mass at zero expression + a Gaussian for the expressing cells), which removes most negative samples
  but gave worse two-sample AUCs on MOp at equal training (benchmarks/bench_score_model.py).

Loss: L2 denoising score matching by default (the estimator of the score; SpatialScope's L1 form estimates a
median instead, and was worse on MOp at equal training), ``loss="l1"`` available.

Checkpoints: ``model.safetensors`` (EMA weights + buffers, no pickle) and ``config.json`` (metadata). Training
state (weights, EMA, Adam moments, step) sits in ``train_state.safetensors`` in the same folder, written atomically
every ``save_every`` steps; :func:`train_score_model` resumes from it. Per-step random numbers come from a
generator seeded by ``(seed, step)``, so a resumed run reproduces an uninterrupted one exactly (on CPU).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .params import ScoreModelParams

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.safetensors"
LOG_INPUT_MAX = 30.0  # METHODS.md input-scale rule: max < 30 -> the matrix holds log1p data
_VAR_FLOOR = 1e-6

# Parameters that change what training computes (a saved training state is resumed only if they all match).
_TRAIN_KEYS = ("n_genes", "max_cells_per_type", "sigma_begin", "sigma_end", "n_sigmas", "hidden", "n_blocks",
               "lr", "batch_size", "grad_clip", "ema_decay", "seed")


class CheckpointMismatch(ValueError):
    """A score checkpoint does not match the reference / genes / cell-type column it is used with."""


# ----------------------------------------------------------------------------------------------------------------
# Data preparation
# ----------------------------------------------------------------------------------------------------------------


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
        return (pi.astype(np.float32), mean.astype(np.float32),
                np.maximum(var, _VAR_FLOOR).astype(np.float32))

    def net_stats(self) -> dict[str, torch.Tensor]:
        """The per-type tables the network is built with (type means, variances, zero-inflation statistics)."""
        pi, m, v = self.zero_inflated_stats()
        return {"type_means": torch.from_numpy(self.type_means), "type_var": torch.from_numpy(self.type_variances()),
                "zi_pi": torch.from_numpy(pi), "zi_mean": torch.from_numpy(m), "zi_var": torch.from_numpy(v)}


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
        raise ValueError(f"{what}.obs has no cell-type column '{cell_type_key}' "
                         f"(columns: {list(reference.obs.columns)})")
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


def prepare_training_data(reference: AnnData, cell_type_key: str, params: ScoreModelParams, *,
                          target_sum: float | None = None, genes: Sequence[str] | None = None) -> TrainingData:
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
    return TrainingData(x=x, type_idx=type_idx, genes=[str(g) for g in var_names[cols]], cell_types=cell_types,
                        cell_type_key=cell_type_key, type_means=type_means, target_sum=float(target_sum),
                        ref_library_size=ref_library_size, fingerprint=fingerprint, seed=params.seed,
                        input_was_log=was_log, gene_selection=selection,
                        cell_names=np.asarray(reference.obs_names[keep]))


# ----------------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(hidden, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        scale, shift = film.chunk(2, dim=-1)
        z = torch.addcmul(shift, self.norm(h), 1 + scale)
        return h + self.fc2(self.act(self.fc1(self.act(z))))


class ScoreNet(nn.Module):
    """Residual MLP s(x, sigma, type) returning sigma * score (see the module docstring)."""

    STATS = ("type_means", "type_var", "zi_pi", "zi_mean", "zi_var")

    def __init__(self, stats: dict[str, torch.Tensor], sigma_begin: float, sigma_end: float, hidden: int = 512,
                 n_blocks: int = 3, n_fourier: int = 16, skip: Literal["gaussian", "zi_gaussian"] = "gaussian"):
        super().__init__()
        if skip not in ("zi_gaussian", "gaussian"):
            raise ValueError(f"skip must be 'zi_gaussian' or 'gaussian', found {skip!r}")
        self.skip = skip
        n_types, n_genes = stats["type_means"].shape
        for k in self.STATS:
            if tuple(stats[k].shape) != (n_types, n_genes):
                raise ValueError(f"stats['{k}'] must have shape {(n_types, n_genes)}, found {tuple(stats[k].shape)}")
            self.register_buffer(k, stats[k].detach().clone().float())
        self.register_buffer("log_sigma_range", torch.tensor([math.log(sigma_begin), math.log(sigma_end)]))
        self.register_buffer("freqs", math.pi * torch.arange(1, n_fourier + 1, dtype=torch.float32))
        self.inp = nn.Linear(n_genes, hidden)
        self.sigma_mlp = nn.Sequential(nn.Linear(2 * n_fourier + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.type_emb = nn.Embedding(n_types, hidden)
        nn.init.normal_(self.type_emb.weight, std=0.02)
        self.mu_proj = nn.Linear(n_genes, hidden)
        self.blocks = nn.ModuleList([_Block(hidden) for _ in range(n_blocks)])
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, n_genes)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.act = nn.SiLU()

    def _cond(self, sig: torch.Tensor, type_rows: torch.Tensor | None) -> torch.Tensor:
        """Conditioning vectors for sigma (m, 1) and type rows (m,) (None = all types, sig of one row)."""
        lo, hi = self.log_sigma_range[1], self.log_sigma_range[0]
        u = 2 * (torch.log(sig) - lo) / (hi - lo) - 1  # log sigma mapped to [-1, 1] over the schedule
        feats = torch.cat([u, torch.sin(u * self.freqs), torch.cos(u * self.freqs)], dim=1)
        type_h = self.type_emb.weight + self.mu_proj(self.type_means)  # (T, H)
        if type_rows is not None:
            type_h = type_h[type_rows]
        return self.act(self.sigma_mlp(feats) + type_h)

    def forward(self, x: torch.Tensor, type_idx: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x (n, G) residual, type_idx (n,) long, sigma (n,) or a scalar (one level) -> (n, G) sigma * score.

        With a scalar sigma the conditioning (and every FiLM scale / shift and preconditioner) depends on the type
        only: it is computed once per type and gathered, which saves the per-cell FiLM matmuls.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.numel() == 1:  # tables per type, then gathered
            sig = sigma.reshape(1, 1)
            c_in = torch.rsqrt(self.type_var + sig * sig).index_select(0, type_idx)
            cond = self._cond(sig, None)  # (T, H)
            films = [blk.film(cond).index_select(0, type_idx) for blk in self.blocks]
            per_type = True
        else:
            sig = sigma.reshape(-1, 1)
            c_in = torch.rsqrt(self.type_var.index_select(0, type_idx) + sig * sig)
            cond = self._cond(sig, type_idx)
            films = [blk.film(cond) for blk in self.blocks]
            per_type = False
        h = self.inp(x * c_in)
        for blk, film in zip(self.blocks, films):
            h = blk(h, film)
        corr = self.out(self.act(self.out_norm(h))).float()
        return self._add_skip(corr, x, type_idx, sig, per_type)

    def _add_skip(self, out: torch.Tensor, x: torch.Tensor, type_idx: torch.Tensor, sig: torch.Tensor,
                  per_type: bool, chunk: int = 256) -> torch.Tensor:
        """Add sigma * the exact score of the noised per-type, per-gene model (independent genes) to ``out``.

        "gaussian": N(0, type_var). "zi_gaussian": a mixture of a point mass at zero expression (residual
        -mu_type, weight zi_pi) and N(zi_mean, zi_var) for the expressing cells; after adding N(0, sigma^2) noise
        the score is the responsibility-weighted sum of the two Gaussian scores. The elementwise work runs in row
        chunks on reused buffers (it is memory-bound; fresh large temporaries cost more than the arithmetic).
        ``sig``: (1, 1) if per_type else (n, 1).
        """
        s2 = sig * sig
        if self.skip == "gaussian":
            tab = (sig / (self.type_var + s2)).index_select(0, type_idx) if per_type else \
                sig / (self.type_var.index_select(0, type_idx) + s2)
            return out.addcmul_(x, tab, value=-1.0)
        pi = self.zi_pi.clamp(1e-6, 1 - 1e-6)
        logit_pi = torch.log(pi) - torch.log1p(-pi)
        neg_mu = -self.type_means
        if per_type:  # (T, G) tables for this sigma
            ivb_t = 1 / (self.zi_var + s2)
            c_t = logit_pi - 0.5 * torch.log(ivb_t * s2)
        n, g = x.shape
        c = max(1, min(chunk, n))
        key = (c, g, x.device, x.dtype)
        if getattr(self, "_work_key", None) != key:
            self._work_key, self._work = key, torch.empty(5, c, g, device=x.device, dtype=x.dtype)
        for i in range(0, n, c):
            k = min(c, n - i)
            ti, xi = type_idx[i:i + k], x[i:i + k]
            da, db, w, logit, tmp = (b[:k] for b in self._work)
            si, s2i = (sig, s2) if per_type else (sig[i:i + k], s2[i:i + k])
            if per_type:
                torch.index_select(ivb_t, 0, ti, out=w)
                torch.index_select(c_t, 0, ti, out=logit)
            else:
                torch.index_select(self.zi_var, 0, ti, out=w)
                w.add_(s2i).reciprocal_()
                torch.index_select(logit_pi, 0, ti, out=logit)
                logit.add_(torch.log(w * s2i), alpha=-0.5)
            torch.index_select(neg_mu, 0, ti, out=da).sub_(xi)  # zero mass at residual -mu
            torch.index_select(self.zi_mean, 0, ti, out=db).sub_(xi)
            logit.sub_(torch.mul(da, da, out=tmp).div_(2 * s2i))
            logit.add_(torch.mul(db, db, out=tmp).mul_(w), alpha=0.5)
            r = logit.clamp_(-30.0, 30.0).sigmoid_()  # responsibility of the zero mass (clamped: no denormals)
            db.mul_(w)
            da.div_(s2i).sub_(db)
            out[i:i + k].add_(torch.addcmul(db, r, da, out=tmp).mul_(si))
        return out


def _geometric_sigmas(begin: float, end: float, n: int) -> torch.Tensor:
    return torch.tensor(np.exp(np.linspace(np.log(begin), np.log(end), n)), dtype=torch.float32)


def _decomposition_step(params: ScoreModelParams) -> float:
    if params.decomposition_step is not None:
        return float(params.decomposition_step)
    return 1e-5 if params.sigma_begin > 70 else 1e-6


def _step_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (2**63 - 1)


# ----------------------------------------------------------------------------------------------------------------
# Model (inference object + checkpoint I/O)
# ----------------------------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class ScoreModel:
    """A trained score network with its reference metadata; inference uses the EMA weights in eval mode."""

    def __init__(self, net: ScoreNet, config: dict, device: str | torch.device = "cpu"):
        self.net = net.eval()
        self.config = config
        self.genes: list[str] = list(config["genes"])
        self.cell_types: list[str] = list(config["cell_types"])
        self.cell_type_key: str = config["cell_type_key"]
        sched = config["schedule"]
        self.sampling_step = float(sched["sampling_step"])
        self.decomposition_step = float(sched["decomposition_step"])
        self.steps_per_level = int(sched["steps_per_level"])
        self.target_sum = float(config["target_sum"])
        self.ref_library_size = float(config["ref_library_size"])
        self.fingerprint: str = config["fingerprint"]
        self.train_step = int(config["train_step"])
        self.seed = int(config["seed"])
        self._sigmas_cpu = _geometric_sigmas(sched["sigma_begin"], sched["sigma_end"], sched["n_sigmas"])
        self.autocast_dtype: torch.dtype | None = None
        self.to(device)

    def set_precision(self, dtype: Literal["float32", "bfloat16", "float16"] = "float32") -> "ScoreModel":
        """Run the network's matmuls under ``torch.autocast`` in ``dtype`` ("float32" = off). bfloat16 is ~2x
        faster on CPUs with AVX512-BF16 / AMX and on GPUs; the analytic Gaussian part stays float32."""
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', found {dtype!r}")
        self.autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
        return self

    # -- basic -------------------------------------------------------------------------------------------------
    def to(self, device) -> "ScoreModel":
        self.device = torch.device(device)
        self.net.to(self.device)
        self.type_means = self.net.type_means
        self.sigmas = self._sigmas_cpu.to(self.device)
        return self

    def __repr__(self) -> str:
        return (f"ScoreModel({len(self.genes)} genes, {len(self.cell_types)} types of '{self.cell_type_key}', "
                f"step {self.train_step}, device {self.device})")

    def _check_inputs(self, x: torch.Tensor | None, type_idx: torch.Tensor) -> torch.Tensor:
        type_idx = torch.as_tensor(type_idx, device=self.device).long().reshape(-1)
        if x is not None and (x.ndim != 2 or x.shape[1] != len(self.genes) or x.shape[0] != type_idx.shape[0]):
            raise ValueError(f"x must have shape (n, {len(self.genes)}) with n = len(type_idx) = "
                             f"{type_idx.shape[0]}, found {tuple(x.shape)}")
        if type_idx.numel() and (int(type_idx.min()) < 0 or int(type_idx.max()) >= len(self.cell_types)):
            raise ValueError(f"type_idx must lie in [0, {len(self.cell_types)}), found "
                             f"[{int(type_idx.min())}, {int(type_idx.max())}]")
        return type_idx

    def score(self, x: torch.Tensor, type_idx: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Score (grad log p_sigma(x | type)) of residuals x (n, G); sigma scalar or (n,). No grad, EMA weights."""
        x = torch.as_tensor(x, device=self.device, dtype=torch.float32)
        type_idx = self._check_inputs(x, type_idx)
        sig = torch.as_tensor(sigma, device=self.device, dtype=torch.float32)
        if sig.numel() == 1:
            sig = sig.reshape(())
            div = sig
        elif sig.numel() == x.shape[0]:
            sig = sig.reshape(-1)
            div = sig[:, None]
        else:
            raise ValueError(f"sigma must be a scalar or have n = {x.shape[0]} entries, found {sig.numel()}")
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                             enabled=self.autocast_dtype is not None):
            return self.net(x, type_idx, sig) / div

    def sample(self, type_idx: torch.Tensor, seed: int = 0, level_stride: int = 1, *,
               steps_per_level: int | None = None, step: float | None = None,
               batch_size: int = 20_000) -> torch.Tensor:
        """Annealed Langevin pseudo-cells of the given types: (n, G) log1p expression (residual + mu_type).

        Per level sigma (every ``level_stride``-th of the schedule): eta = step (sigma / sigma_end)^2, then
        ``steps_per_level`` times x += eta score + sqrt(2 eta) noise; finally x += sigma_end^2 score. x starts at
        N(0, I) as in SpatialScope. Seeded: the same seed and inputs give the same output on the same device.
        """
        type_idx = self._check_inputs(None, type_idx)
        if level_stride < 1:
            raise ValueError(f"level_stride must be >= 1, found {level_stride}")
        n_steps = self.steps_per_level if steps_per_level is None else int(steps_per_level)
        step = self.sampling_step if step is None else float(step)
        sigmas = self._sigmas_cpu[::level_stride].tolist()
        sigma_end = float(self._sigmas_cpu[-1])
        g = torch.Generator(device=self.device).manual_seed(int(seed))
        out = []
        for start in range(0, type_idx.shape[0], batch_size):
            t = type_idx[start:start + batch_size]
            x = torch.randn(t.shape[0], len(self.genes), generator=g, device=self.device)
            for sigma in sigmas:
                eta = step * (sigma / sigma_end) ** 2
                for _ in range(n_steps):
                    noise = torch.randn(x.shape, generator=g, device=self.device)
                    x = x + eta * self.score(x, t, sigma) + math.sqrt(2 * eta) * noise
            x = x + sigma_end**2 * self.score(x, t, sigma_end)
            out.append(x + self.type_means[t])
        if not out:
            return torch.empty(0, len(self.genes), device=self.device)
        return torch.cat(out)

    # -- checkpoint I/O ----------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write ``path/model.safetensors`` (EMA weights, type means, type variances) and ``path/config.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": "spatial_assets.score_model", "format_version": str(FORMAT_VERSION),
                "train_step": str(self.train_step), "fingerprint": self.fingerprint}
        _atomic_save_safetensors(self.net.state_dict(), path / MODEL_FILE, meta)
        _atomic_write_bytes(path / CONFIG_FILE, json.dumps(self.config, indent=2).encode())

    @classmethod
    def load(cls, path, device="cpu") -> "ScoreModel":
        """Load a folder written by :meth:`save` (safetensors + JSON only; nothing is unpickled)."""
        path = Path(path)
        for f in (MODEL_FILE, CONFIG_FILE):
            if not (path / f).is_file():
                raise FileNotFoundError(f"score checkpoint {path} lacks {f} (expected {MODEL_FILE} + {CONFIG_FILE})")
        config = json.loads((path / CONFIG_FILE).read_text())
        if config.get("format") != "spatial_assets.score_model":
            raise ValueError(f"{path / CONFIG_FILE}: format is {config.get('format')!r}, "
                             "expected 'spatial_assets.score_model'")
        with safe_open(str(path / MODEL_FILE), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("train_step") != str(config["train_step"]) or meta.get("fingerprint") != config["fingerprint"]:
            raise ValueError(f"{path}: {MODEL_FILE} (step {meta.get('train_step')}) and {CONFIG_FILE} (step "
                             f"{config['train_step']}) belong to different saves")
        state = load_file(str(path / MODEL_FILE), device="cpu")
        net = _build_net(config, {k: state[k] for k in ScoreNet.STATS})
        net.load_state_dict(state)
        return cls(net, config, device=device)

    # -- compatibility -----------------------------------------------------------------------------------------
    def check_compatible(self, reference: AnnData | None = None, cell_type_key: str | None = None,
                         genes: Sequence[str] | None = None) -> None:
        """Raise :class:`CheckpointMismatch` naming every difference with the given reference / column / genes.

        ``genes``: the genes the caller feeds, in order; they must equal the checkpoint's genes.
        ``reference``: must contain the checkpoint's genes, its cell-type column with the same set of types, and
        have the fingerprint the checkpoint was trained on.
        """
        problems: list[str] = []
        key = self.cell_type_key if cell_type_key is None else cell_type_key
        if key != self.cell_type_key:
            problems.append(f"cell-type column differs: checkpoint uses '{self.cell_type_key}', given '{key}'")
        if genes is not None:
            genes = [str(g) for g in genes]
            miss = [g for g in self.genes if g not in set(genes)]
            extra = [g for g in genes if g not in set(self.genes)]
            if miss or extra:
                problems.append(f"checkpoint has {len(self.genes)} genes, given genes has {len(genes)}: "
                                f"missing from given genes: {_short(miss)}; extra in given genes: {_short(extra)}")
            elif genes != self.genes:
                i = next(i for i, (a, b) in enumerate(zip(self.genes, genes)) if a != b)
                problems.append(f"genes are the checkpoint's but in a different order (first difference at "
                                f"position {i}: checkpoint '{self.genes[i]}', given '{genes[i]}')")
        if reference is not None:
            ref_genes = set(map(str, reference.var_names))
            miss = [g for g in self.genes if g not in ref_genes]
            if miss:
                problems.append(f"checkpoint has {len(self.genes)} genes, reference has "
                                f"{len(self.genes) - len(miss)} of them: missing from reference: {_short(miss)}")
            if self.cell_type_key not in reference.obs.columns:
                problems.append(f"reference.obs has no cell-type column '{self.cell_type_key}'")
            else:
                ref_types = set(reference.obs[self.cell_type_key].dropna().astype(str))
                only_ck = sorted(set(self.cell_types) - ref_types)
                only_ref = sorted(ref_types - set(self.cell_types))
                if only_ck or only_ref:
                    problems.append(f"cell types differ: only in checkpoint {_short(only_ck)}, "
                                    f"only in reference {_short(only_ref)}")
                fp = reference_fingerprint(reference, self.cell_type_key)
                if fp != self.fingerprint:
                    problems.append(f"fingerprint differs: checkpoint trained on a different reference "
                                    f"(checkpoint {self.fingerprint[:12]}, reference {fp[:12]})")
        if problems:
            raise CheckpointMismatch("; ".join(problems))


def _short(items: Sequence[str], k: int = 20) -> str:
    items = list(items)
    return str(items) if len(items) <= k else str(items[:k])[:-1] + f", ... ({len(items)} in all)]"


def _build_net(config: dict, stats: dict[str, torch.Tensor]) -> ScoreNet:
    arch, sched = config["architecture"], config["schedule"]
    return ScoreNet(stats, sched["sigma_begin"], sched["sigma_end"], hidden=arch["hidden"],
                    n_blocks=arch["n_blocks"], n_fourier=arch["n_fourier"], skip=arch["skip"])


def _model_config(data: TrainingData, params: ScoreModelParams, arch: dict, loss: str, step: int,
                  n_params: int) -> dict:
    return {
        "format": "spatial_assets.score_model", "format_version": FORMAT_VERSION,
        "genes": data.genes, "cell_types": data.cell_types, "cell_type_key": data.cell_type_key,
        "n_cells_per_type": np.bincount(data.type_idx, minlength=len(data.cell_types)).tolist(),
        "gene_selection": data.gene_selection, "input_was_log": data.input_was_log,
        "target_sum": data.target_sum, "ref_library_size": data.ref_library_size, "fingerprint": data.fingerprint,
        "schedule": {"sigma_begin": params.sigma_begin, "sigma_end": params.sigma_end, "n_sigmas": params.n_sigmas,
                     "sampling_step": params.sampling_step, "decomposition_step": _decomposition_step(params),
                     "steps_per_level": params.steps_per_level},
        "architecture": {**arch, "n_params": n_params, "output": "sigma * score"},
        "training": {k: getattr(params, k) for k in _TRAIN_KEYS} | {"loss": loss, "train_steps": params.train_steps},
        "train_step": step, "seed": params.seed,
    }


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def _train_signature(data: TrainingData, params: ScoreModelParams, arch: dict, loss: str) -> dict:
    return {"fingerprint": data.fingerprint, "cell_type_key": data.cell_type_key,
            "genes_sha256": hashlib.sha256("\x1f".join(data.genes).encode()).hexdigest(),
            "target_sum": data.target_sum, "loss": loss, **arch,
            **{k: getattr(params, k) for k in _TRAIN_KEYS}}


def _opt_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            out[f"opt.{i}.{name}"] = torch.as_tensor(v)
    return out


def _load_opt(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def fit_score_model(data: TrainingData, params: ScoreModelParams, out_dir=None, device="cpu",
                    log: Callable[[str], None] = print, max_steps: int | None = None, *,
                    loss: Literal["l1", "l2"] = "l2", n_fourier: int = 16,
                    skip: Literal["gaussian", "zi_gaussian"] = "gaussian", log_every: int = 200,
                    on_step: Callable[[int, float], None] | None = None) -> ScoreModel:
    """Denoising score matching on prepared data (see :func:`train_score_model`)."""
    if loss not in ("l1", "l2"):
        raise ValueError(f"loss must be 'l1' or 'l2', found {loss!r}")
    if params.sigma_end >= params.sigma_begin:
        raise ValueError(f"sigma_end ({params.sigma_end}) must be < sigma_begin ({params.sigma_begin})")
    device = torch.device(device)
    arch = {"kind": "residual_mlp_film", "hidden": params.hidden, "n_blocks": params.n_blocks,
            "n_fourier": n_fourier, "skip": skip, "n_genes": len(data.genes), "n_types": len(data.cell_types)}
    stats = data.net_stats()
    torch.manual_seed(params.seed)  # initial weights
    net = ScoreNet(stats, params.sigma_begin, params.sigma_end, hidden=params.hidden, n_blocks=params.n_blocks,
                   n_fourier=n_fourier, skip=skip).to(device)
    ema = ScoreNet(stats, params.sigma_begin, params.sigma_end, hidden=params.hidden, n_blocks=params.n_blocks,
                   n_fourier=n_fourier, skip=skip).to(device)
    ema.load_state_dict(net.state_dict())
    ema.eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=params.lr)
    n_params = sum(p.numel() for p in net.parameters())
    signature = _train_signature(data, params, arch, loss)

    step = 0
    state_path = Path(out_dir) / STATE_FILE if out_dir is not None else None
    if state_path is not None and state_path.is_file():
        with safe_open(str(state_path), framework="pt") as fh:
            meta = fh.metadata() or {}
        saved = json.loads(meta.get("signature", "{}"))
        if saved == signature:
            tensors = load_file(str(state_path), device="cpu")  # load_state_dict moves them to the params
            net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            _load_opt(opt, tensors)
            step = int(meta["step"])
            log(f"score model: resuming from step {step} saved in {state_path}")
        else:
            diff = sorted(k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k))
            log(f"score model: ignoring the training state in {state_path} (it differs in {diff}); starting over")

    sigmas = _geometric_sigmas(params.sigma_begin, params.sigma_end, params.n_sigmas).to(device)
    x_all = torch.from_numpy(data.residual.astype(np.float32)).to(device)
    t_all = torch.from_numpy(data.type_idx.astype(np.int64)).to(device)
    n, n_genes = x_all.shape
    stop = params.train_steps if max_steps is None else min(params.train_steps, int(max_steps))
    use_amp = params.mixed_precision and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    ema_params, net_params = list(ema.parameters()), list(net.parameters())

    def save_all(at_step: int) -> ScoreModel:
        model = ScoreModel(_clone_net(ema), _model_config(data, params, arch, loss, at_step, n_params), device)
        if out_dir is not None:
            tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
            tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
            tensors |= _opt_tensors(opt)
            _atomic_save_safetensors(tensors, state_path, {"step": str(at_step),
                                                           "signature": json.dumps(signature, sort_keys=True)})
            model.save(out_dir)
        return model

    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    net.train()
    t0, run_loss, n_run, start_step = time.perf_counter(), 0.0, 0, step
    while step < stop:
        g = torch.Generator(device=device).manual_seed(_step_seed(params.seed, step))
        idx = torch.randint(n, (params.batch_size,), generator=g, device=device)
        lev = torch.randint(len(sigmas), (params.batch_size,), generator=g, device=device)
        e = torch.randn(params.batch_size, n_genes, generator=g, device=device)
        sig = sigmas[lev]
        x = x_all[idx]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            out = net(x + sig[:, None] * e, t_all[idx], sig)
        r = out.float() + e
        loss_v = r.abs().mean() if loss == "l1" else (r * r).mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss_v).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net_params, params.grad_clip)
        scaler.step(opt)
        scaler.update()
        step += 1
        decay = min(params.ema_decay, (1 + step) / (10 + step))  # warm-up so short runs are not stuck at init
        with torch.no_grad():
            for pe, p in zip(ema_params, net_params):
                pe.lerp_(p, 1 - decay)
        lv = float(loss_v.detach())
        run_loss, n_run = run_loss + lv, n_run + 1
        if on_step is not None:
            on_step(step, lv)
        if step % log_every == 0 or step == stop:
            rate = (step - start_step) / max(time.perf_counter() - t0, 1e-9)
            log(f"score model: step {step}/{params.train_steps} loss {run_loss / n_run:.4f} ({rate:.1f} steps/s)")
            run_loss, n_run = 0.0, 0
        if out_dir is not None and step % params.save_every == 0 and step < stop:
            save_all(step)
    return save_all(step)


def _clone_net(net: ScoreNet) -> ScoreNet:
    clone = ScoreNet({k: getattr(net, k) for k in ScoreNet.STATS}, 1.0, 0.5, hidden=net.out.in_features,
                     n_blocks=len(net.blocks), n_fourier=net.freqs.numel(), skip=net.skip)
    clone.load_state_dict(net.state_dict())
    return clone.to(net.type_means.device).eval().requires_grad_(False)


def train_score_model(reference: AnnData, cell_type_key: str, params: ScoreModelParams, out_dir,
                      device="cpu", log: Callable[[str], None] = print, max_steps: int | None = None,
                      **kwargs) -> ScoreModel:
    """Prepare the reference and train (or resume training of) its score model into ``out_dir``.

    Resumes from ``out_dir/train_state.safetensors`` when it was written for the same reference fingerprint and
    training configuration; stops after ``params.train_steps`` steps in all (or at step ``max_steps`` if given,
    resumable later). Keyword arguments: ``target_sum``, ``genes`` (see :func:`prepare_training_data`) and
    ``loss``, ``n_fourier``, ``skip``, ``log_every``, ``on_step`` (see :func:`fit_score_model`).
    """
    prep_kw = {k: kwargs.pop(k) for k in ("target_sum", "genes") if k in kwargs}
    data = prepare_training_data(reference, cell_type_key, params, **prep_kw)
    log(f"score model: {len(data.x)} cells, {len(data.genes)} genes ({data.gene_selection}), "
        f"{len(data.cell_types)} types of '{cell_type_key}', target sum {data.target_sum:g}")
    return fit_score_model(data, params, out_dir, device=device, log=log, max_steps=max_steps, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def heldout_log_data(model: ScoreModel, reference: AnnData) -> tuple[np.ndarray, np.ndarray]:
    """Held-out reference cells as the model sees them: (log1p data on model genes, type index; -1 = unknown)."""
    labels = _type_labels(reference, model.cell_type_key).astype(str).to_numpy()
    x = log_normalise(reference, model.genes, model.target_sum)
    idx = pd.Categorical(labels, categories=model.cell_types).codes.astype(np.int64)
    return x, idx


def diagonal_gaussian_samples(data: TrainingData, type_idx: np.ndarray, seed: int = 0) -> np.ndarray:
    """Baseline pseudo-cells: per-type, per-gene Gaussian fit on the training data, clipped at 0 (log1p scale)."""
    rng = np.random.default_rng(seed)
    sd = np.sqrt(data.type_variances())
    z = rng.standard_normal((len(type_idx), data.x.shape[1])).astype(np.float32)
    return np.maximum(data.type_means[type_idx] + z * sd[type_idx], 0)


def zero_inflated_samples(data: TrainingData, type_idx: np.ndarray, seed: int = 0) -> np.ndarray:
    """Baseline pseudo-cells with independent genes: per type and gene, zero with the observed dropout fraction,
    else Gaussian with the expressing cells' mean and variance (clipped at 0)."""
    rng = np.random.default_rng(seed)
    pi, m, v = data.zero_inflated_stats()
    shape = (len(type_idx), data.x.shape[1])
    expr = data.type_means[type_idx] + m[type_idx] + rng.standard_normal(shape) * np.sqrt(v[type_idx])
    return np.where(rng.random(shape) < pi[type_idx], 0.0, np.maximum(expr, 0)).astype(np.float32)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def two_sample_auc(real: np.ndarray, fake: np.ndarray, k: int = 15, seed: int = 0, folds: int = 5) -> float:
    """Cross-validated kNN classifier AUC of real vs fake rows (0.5 = indistinguishable, 1 = separable)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    z = np.vstack([real, fake])
    y = np.r_[np.zeros(len(real)), np.ones(len(fake))]
    folds = int(min(folds, len(real), len(fake)))
    if folds < 2:
        raise ValueError(f"two_sample_auc needs >= 2 rows per sample, found {len(real)} real, {len(fake)} fake")
    k = int(min(k, len(z) * (folds - 1) // folds - 1))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    p = cross_val_predict(KNeighborsClassifier(k), z, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))


def _compare(real: np.ndarray, real_t: np.ndarray, fake: np.ndarray, fake_t: np.ndarray, types: list[str],
             pca, seed: int) -> dict:
    per_type, w = {}, []
    for t in np.unique(real_t):
        r, f = real[real_t == t], fake[fake_t == t]
        per_type[types[t]] = {
            "n": int(len(r)),
            "mean_corr": _pearson(r.mean(0), f.mean(0)),
            "var_corr": _pearson(r.var(0), f.var(0)),
            "auc": two_sample_auc(pca.transform(r), pca.transform(f), seed=seed),
        }
        w.append(len(r))
    w = np.asarray(w, float) / np.sum(w)
    summary = {m: float(np.nansum(w * np.array([v[m] for v in per_type.values()])))
               for m in ("mean_corr", "var_corr", "auc")}
    return summary | {"per_type": per_type}


def evaluate_samples(model: ScoreModel, heldout_x, heldout_type_idx=None, *, n_per_type: int = 200, seed: int = 0,
                     level_stride: int = 1, train_data: TrainingData | None = None, min_cells: int = 10,
                     n_pcs: int = 30, return_samples: bool = False) -> dict:
    """Compare generated pseudo-cells with held-out reference cells, per type.

    ``heldout_x``: an AnnData of held-out reference cells (raw counts / log1p, normalised as the model's
    reference), or a (n, G) log1p array on the model's genes with ``heldout_type_idx``. For each type with at least
    ``min_cells`` held-out cells, up to ``n_per_type`` of them are compared with as many samples: Pearson
    correlation over genes of the means and of the variances, and a kNN two-sample classifier AUC in the PCA space
    (``n_pcs``, fit on the held-out cells). Summaries are weighted by the held-out counts. With ``train_data``
    the same metrics are given for two baselines with independent genes (``diag_gaussian``: per-type diagonal
    Gaussian, the default network's analytic part; ``zi_independent``: zero-inflated per gene) and for real
    training cells (``train_cells``: the floor of what is achievable with that many cells). ``return_samples``
    adds the arrays ``samples`` (generated), ``real`` (the compared held-out cells) and ``type_idx`` (their
    types).
    """
    from sklearn.decomposition import PCA

    if isinstance(heldout_x, AnnData):
        x, tidx = heldout_log_data(model, heldout_x)
    else:
        if heldout_type_idx is None:
            raise ValueError("heldout_type_idx is required when heldout_x is an array")
        x, tidx = np.asarray(heldout_x, dtype=np.float32), np.asarray(heldout_type_idx, dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != len(model.genes) or len(tidx) != len(x):
        raise ValueError(f"heldout_x must be (n, {len(model.genes)}) with n type indices, found {x.shape} and "
                         f"{len(tidx)} type indices")
    rng = np.random.default_rng(seed)
    counts = np.bincount(tidx[tidx >= 0], minlength=len(model.cell_types))
    sel_types = np.flatnonzero(counts >= min_cells)
    if len(sel_types) == 0:
        raise ValueError(f"no cell type has >= {min_cells} held-out cells (counts {counts.tolist()})")
    rows = []
    for t in sel_types:  # loop over types (not cells) to pick a per-type subsample
        ix = np.flatnonzero(tidx == t)
        rows.append(rng.choice(ix, size=min(n_per_type, len(ix)), replace=False))
    rows = np.concatenate(rows)
    real, real_t = x[rows], tidx[rows]
    pca = PCA(n_components=int(min(n_pcs, x.shape[1], len(real) - 1)), random_state=seed).fit(real)
    t0 = time.perf_counter()
    fake = model.sample(torch.from_numpy(real_t), seed=seed, level_stride=level_stride).cpu().numpy()
    sample_s = time.perf_counter() - t0
    finite = np.isfinite(fake).all(1)
    fake = np.where(finite[:, None], fake, 0.0).astype(np.float32)
    out = {"model": _compare(real, real_t, fake, real_t, model.cell_types, pca, seed),
           "n_cells": int(len(real)), "n_types": int(len(sel_types)), "nonfinite_fraction": float(1 - finite.mean()),
           "sample_seconds": sample_s, "seed": seed, "level_stride": level_stride}
    if train_data is not None:
        if train_data.genes != model.genes or train_data.cell_types != model.cell_types:
            raise ValueError("train_data must have the model's genes and cell types")
        base = diagonal_gaussian_samples(train_data, real_t, seed=seed + 1)
        out["diag_gaussian"] = _compare(real, real_t, base, real_t, model.cell_types, pca, seed)
        zi = zero_inflated_samples(train_data, real_t, seed=seed + 2)
        out["zi_independent"] = _compare(real, real_t, zi, real_t, model.cell_types, pca, seed)
        tr_rows = []
        for t in sel_types:
            ix = np.flatnonzero(train_data.type_idx == t)
            tr_rows.append(rng.choice(ix, size=min(int((real_t == t).sum()), len(ix)), replace=False))
        tr_rows = np.concatenate(tr_rows)
        out["train_cells"] = _compare(real, real_t, train_data.x[tr_rows], train_data.type_idx[tr_rows],
                                      model.cell_types, pca, seed)
    if return_samples:
        out |= {"samples": fake, "real": real, "type_idx": real_t}
    return out
