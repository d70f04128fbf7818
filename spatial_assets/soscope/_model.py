"""soScope networks and losses (torch): graph encoder, sub-spot decoder, spot likelihoods, sparse image regulariser.

Shapes: N spots, K sub-spots per spot (spot-major), G features, F image features, E edges.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch_geometric.nn import TransformerConv


class SmallCNN(nn.Module):
    """Small patch CNN (3 conv blocks -> global average pool -> 64-d), the layout expected of ``cnn_weights``."""

    def __init__(self, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


class Encoder(nn.Module):
    """3 TransformerConv layers (ReLU between) over the spot graph -> mean and softplus scale of z per spot."""

    def __init__(self, n_in: int, hidden: int = 128, z_dim: int = 128, heads: int = 1):
        super().__init__()
        self.conv1 = TransformerConv(n_in, hidden, heads=heads, edge_dim=1)
        self.conv2 = TransformerConv(hidden * heads, hidden, heads=heads, edge_dim=1)
        self.conv3 = TransformerConv(hidden * heads, 2 * z_dim, heads=heads, concat=False, edge_dim=1)
        self.z_dim = z_dim

    def forward(self, x, edge_index, edge_weight):
        ea = edge_weight[:, None]
        h = F.relu(self.conv1(x, edge_index, ea))
        h = F.relu(self.conv2(h, edge_index, ea))
        h = self.conv3(h, edge_index, ea)
        mu, s = h[:, : self.z_dim], h[:, self.z_dim :]
        return mu, F.softplus(s) + 1e-4


class ResBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + F.relu(self.l2(F.relu(self.l1(x))))


class Decoder(nn.Module):
    """Per sub-spot [z_parent / K, (2 - 1/K) y] -> Linear(hidden) -> 2 residual blocks -> G outputs.

    ``offset`` (G,) is added to the output (log of a per-gene baseline rate for count likelihoods, the
    baseline mean for Gaussian), so an untrained decoder predicts that baseline.
    """

    def __init__(self, z_dim: int, n_feat: int, n_out: int, hidden: int = 128):
        super().__init__()
        self.inp = nn.Linear(z_dim + n_feat, hidden)
        self.blocks = nn.Sequential(ResBlock(hidden), ResBlock(hidden))
        self.out = nn.Linear(hidden, n_out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z_parent, y, k: int, offset):
        h = torch.cat([z_parent / k, (2.0 - 1.0 / k) * y], 1)
        h = self.blocks(F.relu(self.inp(h)))
        return self.out(h) + offset


class SoScopeNet(nn.Module):
    """Encoder + decoder + per-feature likelihood parameters (NB dispersion, Gaussian noise scale).

    Parameters
    ----------
    n_genes : int
        Features per spot (G): the encoder's input and the decoder's output width.
    n_feat : int
        Image features per sub-spot (F).
    hidden : int
        Hidden width of the encoder and decoder.
    z_dim : int
        Latent dimension per spot.
    heads : int
        Attention heads of the encoder's TransformerConv layers.
    """

    def __init__(self, n_genes: int, n_feat: int, hidden: int, z_dim: int, heads: int):
        super().__init__()
        self.encoder = Encoder(n_genes, hidden, z_dim, heads)
        self.decoder = Decoder(z_dim, n_feat, n_genes, hidden)
        self.log_theta = nn.Parameter(torch.full((n_genes,), math.log(10.0)))


# --------------------------------------------------------------------------------------------------------------
# likelihoods of the spot = sum of its sub-spots
# --------------------------------------------------------------------------------------------------------------


def nb_nll(x, mu, theta):
    """Negative log-likelihood of NB(mean mu, total count theta), elementwise."""
    eps = 1e-8
    log_t_mu = torch.log(theta + mu + eps)
    return -(
        torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
        + theta * (torch.log(theta + eps) - log_t_mu)
        + x * (torch.log(mu + eps) - log_t_mu)
    )


def poisson_nll(x, mu):
    return mu - x * torch.log(mu + 1e-8) + torch.lgamma(x + 1)


def spot_nll(x, spot_mean, kind, theta, gaussian_scale: float):
    """Elementwise NLL of the spot profile ``x`` under mean ``spot_mean`` and per-feature ``kind`` codes.

    kind: 0 = NB (moment-matched: summed sub-spot means, shared per-gene dispersion), 1 = Poisson (exact for sums),
    2 = Gaussian (squared error / ``gaussian_scale``).
    """
    out = torch.zeros_like(x)
    nb, po, ga = kind == 0, kind == 1, kind == 2
    if nb.any():
        out[:, nb] = nb_nll(x[:, nb], spot_mean[:, nb], theta[nb])
    if po.any():
        out[:, po] = poisson_nll(x[:, po], spot_mean[:, po])
    if ga.any():
        out[:, ga] = (x[:, ga] - spot_mean[:, ga]) ** 2 / gaussian_scale
    return out


def subspot_mean(out, kind):
    """Likelihood mean per sub-spot: exp of the log-rate for counts (non-negative), identity for Gaussian."""
    counts = kind != 2
    if bool(counts.all()):
        return torch.exp(out.clamp(max=30.0))
    return torch.where(counts[None, :], torch.exp(out.clamp(max=30.0)), out)


# --------------------------------------------------------------------------------------------------------------
# sparse image regulariser
# --------------------------------------------------------------------------------------------------------------


class _EdgeDot(torch.autograd.Function):
    """Row inner products <r[src_e], r[dst_e]> for edge lists, in chunks: never stores an (E, G) tensor."""

    @staticmethod
    def forward(ctx, r, src, dst, chunk):
        out = torch.empty(len(src), dtype=r.dtype, device=r.device)
        for s in range(0, len(src), chunk):
            out[s : s + chunk] = (r[src[s : s + chunk]] * r[dst[s : s + chunk]]).sum(1)
        ctx.save_for_backward(r, src, dst)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        r, src, dst = ctx.saved_tensors
        grad = torch.zeros_like(r)
        for s in range(0, len(src), ctx.chunk):
            gs, a, b = g[s : s + ctx.chunk, None], src[s : s + ctx.chunk], dst[s : s + ctx.chunk]
            grad.index_add_(0, a, gs * r[b])
            grad.index_add_(0, b, gs * r[a])
        return grad, None, None, None


def edge_dot(r: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Inner products of rows ``src`` and ``dst`` of ``r``; memory O(chunk x G) beyond ``r`` itself."""
    return _EdgeDot.apply(r, src, dst, chunk)


def image_regulariser(resid, edges, weights, neg_src, neg_dst, temperature: float):
    """Sum of BCE(sigmoid(t cos(r_i, r_j)), w_ij) over W's edges and sampled non-edges (target 0)."""
    rn = resid / (resid.norm(dim=1, keepdim=True) + 1e-6)
    src = torch.cat([edges[:, 0], neg_src])
    dst = torch.cat([edges[:, 1], neg_dst])
    target = torch.cat([weights, torch.zeros(len(neg_src), dtype=weights.dtype, device=weights.device)])
    logits = temperature * edge_dot(rn, src, dst)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum")


def exp_schedule(t: int, n: int, start: float, end: float, start_frac: float = 0.5) -> float:
    """Exponential schedule: ``start`` until ``start_frac`` x n, then geometric to ``end`` at t = n."""
    t0 = start_frac * n
    if n <= t0 or t <= t0:
        return float(start)
    p = min(1.0, (t - t0) / (n - t0))
    return float(start * (end / start) ** p)
