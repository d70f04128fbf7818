"""The score network: a residual MLP with FiLM conditioning on the noise level and the cell type."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn


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
    """Residual MLP ``s(x, sigma, type)`` returning ``sigma * score`` (see :mod:`spatial_assets.generative`).

    Input preconditioning ``x / sqrt(v_type + sigma^2)``, FiLM conditioning of every block on Fourier features of
    log sigma (mapped to [-1, 1] over the schedule) + a learned type embedding + a projection of the type mean, and
    an analytic skip: the output is the exact ``sigma * score`` of a per-type model with independent genes plus the
    network's zero-initialised correction.

    Parameters
    ----------
    stats : dict of str to torch.Tensor
        Per-type tables, each ``(T, G)``: ``type_means``, ``type_var``, ``zi_pi``, ``zi_mean``, ``zi_var``
        (:meth:`TrainingData.net_stats`); stored as buffers.
    sigma_begin : float
        Largest noise level of the schedule.
    sigma_end : float
        Smallest noise level of the schedule.
    hidden : int, default 512
        Width of the MLP.
    n_blocks : int, default 3
        Number of residual FiLM blocks.
    n_fourier : int, default 16
        Fourier frequencies of the noise-level features.
    skip : {"gaussian", "zi_gaussian"}, default "gaussian"
        Analytic part: the per-type diagonal Gaussian N(0, type_var), or a zero-inflated Gaussian per gene.

    Raises
    ------
    ValueError
        If ``skip`` is unknown or a table does not have shape ``(T, G)``.
    """

    STATS = ("type_means", "type_var", "zi_pi", "zi_mean", "zi_var")

    def __init__(
        self,
        stats: dict[str, torch.Tensor],
        sigma_begin: float,
        sigma_end: float,
        hidden: int = 512,
        n_blocks: int = 3,
        n_fourier: int = 16,
        skip: Literal["gaussian", "zi_gaussian"] = "gaussian",
    ):
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
        """``sigma * score`` of residuals at one or per-row noise levels.

        With a scalar sigma the conditioning (and every FiLM scale / shift and preconditioner) depends on the type
        only: it is computed once per type and gathered, which saves the per-cell FiLM matmuls.

        Parameters
        ----------
        x : torch.Tensor
            ``(n, G)`` residuals.
        type_idx : torch.Tensor
            ``(n,)`` long type index of each row.
        sigma : torch.Tensor or float
            A scalar (one level for all rows) or ``(n,)`` per-row levels.

        Returns
        -------
        torch.Tensor
            ``(n, G)`` float32 ``sigma * score``.
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

    def _add_skip(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        type_idx: torch.Tensor,
        sig: torch.Tensor,
        per_type: bool,
        chunk: int = 256,
    ) -> torch.Tensor:
        """Add sigma * the exact score of the noised per-type, per-gene model (independent genes) to ``out``.

        "gaussian": N(0, type_var). "zi_gaussian": a mixture of a point mass at zero expression (residual
        -mu_type, weight zi_pi) and N(zi_mean, zi_var) for the expressing cells; after adding N(0, sigma^2) noise
        the score is the responsibility-weighted sum of the two Gaussian scores. The elementwise work runs in row
        chunks on reused buffers (it is memory-bound; fresh large temporaries cost more than the arithmetic).
        ``sig``: (1, 1) if per_type else (n, 1).
        """
        s2 = sig * sig
        if self.skip == "gaussian":
            tab = (
                (sig / (self.type_var + s2)).index_select(0, type_idx)
                if per_type
                else sig / (self.type_var.index_select(0, type_idx) + s2)
            )
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
            ti, xi = type_idx[i : i + k], x[i : i + k]
            da, db, w, logit, tmp = (b[:k] for b in self._work)
            si, s2i = (sig, s2) if per_type else (sig[i : i + k], s2[i : i + k])
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
            out[i : i + k].add_(torch.addcmul(db, r, da, out=tmp).mul_(si))
        return out
