"""soScope: each spot as the sum of its sub-spots, enhanced by a graph-transformer VAE (Li et al. 2024)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..constants import Platform
from ..metrics import pearson_columns as pearson_per_gene  # this module's public name for it
from ..params import SoScopeParams
from ..progress import Progress
from . import _features as _ft
from . import _geometry as _geo
from ._model import Decoder, SoScopeNet, exp_schedule, image_regulariser, spot_nll, subspot_mean

RNA_NAMES = {"rna", "gene", "genes", "gene expression", "gene_expression", "mrna", "transcript", "transcripts"}


PROTEIN_NAMES = {"protein", "proteins", "adt", "antibody capture", "antibody_capture"}


KIND_CODE = {"nb": 0, "poisson": 1, "gaussian": 2}


@dataclass
class EnhancementResult:
    """Sub-spot AnnData (X enhanced profiles; obs spot, subspot, x, y; obsm['spatial']) and the run's info.

    Attributes
    ----------
    adata : anndata.AnnData
        Sub-spots x features: X the enhanced profiles; obs spot, subspot, x, y; obsm['spatial'].
    info : dict
        The run's summary (settings, features, losses, timings, ...).
    """

    adata: ad.AnnData
    info: dict = field(default_factory=dict)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def feature_kinds(slide: ad.AnnData, params: SoScopeParams) -> np.ndarray:
    """Per-feature likelihood code (0 NB, 1 Poisson, 2 Gaussian); 'joint' reads var[params.modality_key].

    Parameters
    ----------
    slide : anndata.AnnData
        The spots x features.
    params : SoScopeParams
        ``likelihood`` ('nb', 'poisson', 'gaussian' or 'joint'), and for 'joint' ``modality_key`` and
        ``protein_likelihood`` (RNA features get NB).

    Returns
    -------
    numpy.ndarray
        (G,) int64 likelihood code of each feature.

    Raises
    ------
    ValueError
        With 'joint', if ``slide.var`` lacks ``params.modality_key`` or holds an unknown modality.
    """
    g = slide.n_vars
    if params.likelihood != "joint":
        return np.full(g, KIND_CODE[params.likelihood], np.int64)
    key = params.modality_key
    if key not in slide.var.columns:
        raise ValueError(
            f"slide.var['{key}']: missing; likelihood 'joint' needs the modality of every feature "
            f"(columns found: {list(slide.var.columns)})"
        )
    mod = slide.var[key].astype(str).str.strip().str.lower().to_numpy()
    is_rna, is_prot = np.isin(mod, list(RNA_NAMES)), np.isin(mod, list(PROTEIN_NAMES))
    unknown = sorted(set(mod[~(is_rna | is_prot)]))
    if unknown:
        raise ValueError(
            f"slide.var['{key}']: unknown modality value(s) {unknown}; expected RNA "
            f"({sorted(RNA_NAMES)}) or protein ({sorted(PROTEIN_NAMES)})"
        )
    return np.where(is_rna, 0, KIND_CODE[params.protein_likelihood]).astype(np.int64)


def check_values(x: np.ndarray, kinds: np.ndarray, likelihood: str, name: str = "slide.X") -> None:
    """Raise if ``x`` has NaN/inf, or count likelihoods meet negative or non-integer values.

    Parameters
    ----------
    x : numpy.ndarray
        (N, G) spot values.
    kinds : numpy.ndarray
        (G,) likelihood code of each feature (see :func:`feature_kinds`); codes other than 2 are counts.
    likelihood : str
        The configured likelihood, for the error message.
    name : str
        Name of ``x`` in error messages.

    Raises
    ------
    ValueError
        If ``x`` has NaN / inf values, or count features have negative or non-integer values.
    """
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(
            f"{name}: {int(bad.sum())} NaN/inf values in {int(bad.any(1).sum())} spots; expected finite values"
        )
    counts = kinds != 2
    if counts.any():
        xc = x[:, counts]
        neg = xc < 0
        frac = np.abs(xc - np.round(xc)) > 1e-6
        if neg.any() or frac.any():
            what = []
            if neg.any():
                what.append(f"{int(neg.sum())} negative values (min {xc.min():.4g})")
            if frac.any():
                what.append(f"{int(frac.sum())} non-integer values (e.g. {xc[frac][0]:.4g})")
            raise ValueError(
                f"{name}: likelihood '{likelihood}' needs non-negative integer counts for its count "
                f"features, found {' and '.join(what)}; use likelihood 'gaussian' for normalised "
                "or continuous data"
            )


def select_genes(x: np.ndarray, n_genes: int | None) -> np.ndarray:
    """Indices of the ``n_genes`` most variable features (variance of log1p of library-normalised values).

    Parameters
    ----------
    x : numpy.ndarray
        (N, G) spot values.
    n_genes : int or None
        Features to keep; all when None or at least G.

    Returns
    -------
    numpy.ndarray
        Sorted indices of the features kept.
    """
    g = x.shape[1]
    if n_genes is None or n_genes >= g:
        return np.arange(g)
    lib = x.sum(1, keepdims=True)
    norm = np.log1p(x / np.where(lib > 0, lib, 1) * np.median(lib[lib > 0]) if (lib > 0).any() else x)
    return np.sort(np.argsort(-norm.var(0), kind="stable")[:n_genes])


def _uns_safe(d):
    """A copy of ``d`` writable to h5ad / zarr: None -> 'None', tuples -> lists."""
    if isinstance(d, dict):
        return {str(k): _uns_safe(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        if any(isinstance(v, (dict, list, tuple)) or v is None for v in d):
            return {str(i): _uns_safe(v) for i, v in enumerate(d)}
        return np.asarray(d) if len(d) else np.zeros(0)
    return "None" if d is None else d


def conserve_spot_sums(m: np.ndarray, x: np.ndarray, k: int, counts) -> np.ndarray:
    """Make every spot's K sub-spots sum exactly to the observed spot, keeping the model's split.

    Count features: each sub-spot gets the observed spot value times its share of the model's spot sum (an even
    split where the model predicts zero for the whole spot). Continuous (Gaussian) features: the spot's residual is
    spread evenly. ``m``: (N*K, G) model means, spot-major; ``x``: (N, G) observed spots; ``counts``: (G,) bool.

    Parameters
    ----------
    m : numpy.ndarray
        (N K, G) model means, spot-major.
    x : numpy.ndarray
        (N, G) observed spots.
    k : int
        Sub-spots per spot (K).
    counts : array-like of bool
        (G,) True for count features, False for continuous ones.

    Returns
    -------
    numpy.ndarray
        (N K, G) float32 sub-spot values whose spot sums equal ``x``.
    """
    n, g = x.shape
    mm = m.reshape(n, k, g).astype(np.float64)
    tot = mm.sum(1, keepdims=True)
    share = np.where(tot > 0, mm / np.where(tot > 0, tot, 1.0), 1.0 / k)
    counts = np.broadcast_to(np.asarray(counts, bool).reshape(1, 1, -1), mm.shape)
    out = np.where(counts, share * x[:, None, :], mm + (x[:, None, :] - tot) / k)
    return out.reshape(n * k, g).astype(np.float32)


def _use_typed_prior(params: SoScopeParams, nuclei, type_profiles, geom) -> tuple[bool, str]:
    """Whether the typed-cell prior applies, and why (or why not)."""
    if params.typed_prior == "off" or type_profiles is None or nuclei is None:
        return False, "off" if params.typed_prior == "off" else "no typed nuclei / type profiles given"
    if not params.nuclei_offset:
        return False, "nuclei_offset is off"
    col = params.type_column
    if col not in nuclei.columns:
        raise ValueError(
            f"nuclei['{col}']: missing; type_profiles were given for the typed-cell prior, which needs a type per "
            f"nucleus (columns found: {list(nuclei.columns)}); pass typed nuclei or no type_profiles"
        )
    if params.typed_prior == "auto" and "potts_type" in nuclei.columns:
        inside = _ft.nuclei_subspots(nuclei, geom) >= 0
        lab = nuclei[col].astype(str).to_numpy()[inside]
        if len(lab) and (lab == nuclei["potts_type"].astype(str).to_numpy()[inside]).all():
            # typing without morphology: the labels follow the spot mixture and the Potts smoothing only, they do
            # not tell which nucleus of a spot is which type (on the benchmark that split loses to the nuclei split)
            return False, "auto: the labels are the Potts labels (typing used no nucleus morphology)"
    return True, "on" if params.typed_prior == "on" else "auto: labels given"


def _prior_shares(counts: np.ndarray | None, n: int, k: int, pseudocount: float) -> np.ndarray:
    """(N K,) prior share of each sub-spot in its spot: (count + pseudocount) / spot total, or 1 / K without counts."""
    if counts is None:
        return np.full(n * k, 1.0 / k)
    c = np.asarray(counts, dtype=np.float64).reshape(n, k) + pseudocount
    return (c / c.sum(1, keepdims=True)).ravel()


def enhance(
    slide: ad.AnnData,
    params: SoScopeParams | None = None,
    platform: str = Platform.VISIUM,
    image=None,
    nuclei: pd.DataFrame | None = None,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    *,
    grid_subdivision: int = 3,
    spot_diameter_px: float | None = None,
    features: np.ndarray | None = None,
    subspot_counts: np.ndarray | None = None,
    raw_image_features: np.ndarray | None = None,
    type_profiles: pd.DataFrame | None = None,
    n_jobs: int = 1,
    n_threads: int | None = None,
    log_every: int = 50,
) -> EnhancementResult:
    """Enhance ``slide`` (spots x features) to sub-spot resolution with soScope.

    Every hyper-parameter comes from ``params`` (:class:`~spatial_assets.params.SoScopeParams`, the
    ``parameters.soscope`` section of ``dagster_project.yaml``); the keyword arguments are data and compute only.

    With nuclei (``params.nuclei_offset``, default), a sub-spot's expression is offset by the log of its prior
    share ``(count + params.nuclei_pseudocount) / spot total``: the untrained model is the nuclei split and
    training refines the per-gene shares from the image features and the spot latent.

    With typed nuclei (a type per nucleus in ``nuclei[params.type_column]``) and ``type_profiles``
    (``params.typed_prior``, default), the prior share becomes per gene: a sub-spot's share of the spot's
    ``sum over its nuclei of the type-mean profile`` (:func:`~spatial_assets.soscope.typed_subspot_profiles`), so
    the untrained model is the typed-nuclei split (``layers['prior_split']``, its same-input baseline).

    Parameters
    ----------
    slide
        Spots x features; ``obsm['spatial']`` spot centres (full-res px); counts for NB / Poisson likelihoods.
    params
        soScope settings (None: defaults).
    platform
        ``visium`` (7 sub-spots) or ``square_grid`` (4 or 9).
    image
        H&E (H, W, 3) in the slide's full-resolution pixel frame, or None.
    nuclei
        Segmented nuclei: columns x, y (full-res px) and area (px^2), or None.
    device
        torch device.
    log
        Progress callback (e.g. ``context.log.info``).
    grid_subdivision
        Square grids: 2 (2 x 2) or 3 (3 x 3) sub-spots per side.
    spot_diameter_px
        Spot diameter (default: ``uns['spatial'][lib]['scalefactors']['spot_diameter_fullres']``, else the pitch).
    features
        Precomputed sub-spot features (N K, F) replacing image and nuclei features (z-scored as they are).
    subspot_counts
        (N K,) cells per sub-spot for the size-factor offset, replacing the counts of ``nuclei``.
    raw_image_features
        Precomputed raw image features (N K, F) (e.g. cached :func:`squidpy_features`), reduced and weighted
        like computed ones.
    type_profiles
        Types x genes mean counts of one cell of each type (:func:`~spatial_assets.soscope.type_profiles` of the
        reference); with typed ``nuclei`` and ``params.typed_prior`` the prior is the typed-nuclei split.
    n_jobs
        squidpy worker processes.
    n_threads
        torch CPU threads for this call (restored afterwards); None keeps the current setting.
    log_every
        Log the losses every this many epochs (0: never).

    Returns
    -------
    EnhancementResult
        ``adata``: sub-spots x features, spot-major (sub-spot ``i * K + k``), ``obs`` spot, subspot,
        spot_index, x, y (and n_nuclei with nuclei), ``obsm['spatial']``; its matrices:

        - ``layers['conserved']``: the model's per-gene split of each spot, rescaled so that every spot's K
          sub-spots sum exactly to the observed spot (counts: observed spot x the model's share; Gaussian
          features: the residual spread evenly). ``X`` is this layer when ``params.conserve`` (default).
        - ``layers['model_mean']``: the likelihood mean of each sub-spot (soScope's own output, denoised; its
          spot sums only approximate the spot). ``X`` is this layer when ``params.conserve`` is False.
        - ``layers['prior_split']``: the split the model starts from: the typed-nuclei split (spot x per-gene
          typed share) with typed nuclei and ``type_profiles``, else the nuclei split (spot x prior share) with
          nuclei and ``params.nuclei_offset``, else spot / K. The same-input baseline of ``conserved``.

        ``info``: settings, feature description, losses, timings (also in ``adata.uns['soscope']``).

    Raises
    ------
    ValueError
        On bad input (naming the field and what was expected).
    """
    if n_threads is None:
        return _enhance(**locals())
    before = torch.get_num_threads()
    torch.set_num_threads(int(n_threads))
    try:
        return _enhance(**locals())
    finally:
        torch.set_num_threads(before)


def _enhance(
    slide,
    params,
    platform,
    image,
    nuclei,
    device,
    log,
    *,
    grid_subdivision,
    spot_diameter_px,
    features,
    subspot_counts,
    raw_image_features,
    type_profiles,
    n_jobs,
    n_threads,
    log_every,
    **_,
) -> EnhancementResult:
    params = SoScopeParams() if params is None else params
    if not isinstance(params, SoScopeParams):
        raise ValueError(f"params: expected SoScopeParams, found {type(params).__name__}")
    if not isinstance(slide, ad.AnnData):
        raise ValueError(f"slide: expected an AnnData (spots x features), found {type(slide).__name__}")
    if slide.n_obs < 2 or slide.n_vars < 1:
        raise ValueError(f"slide: expected >= 2 spots and >= 1 feature, found {slide.n_obs} x {slide.n_vars}")
    say = log or (lambda m: None)
    t_start = time.perf_counter()

    kinds_all = feature_kinds(slide, params)
    x_all = _dense(slide.X)
    check_values(x_all, kinds_all, params.likelihood)
    gidx = select_genes(x_all, params.n_genes)
    x_np, kinds = x_all[:, gidx], kinds_all[gidx]
    var = slide.var.iloc[gidx].copy()

    geom = _geo.build_subspots(slide, platform, grid_subdivision, spot_diameter_px, n_subspots=params.n_subspots)
    isolated = _geo.check_spot_graph(geom.spot_edges, geom.n_spots, platform, geom.spot_pitch_px)
    if len(isolated):
        say(f"soScope: {len(isolated)} isolated spot(s) without neighbours (encoded from their own profile only)")
    n, k, g = geom.n_spots, geom.n_sub, x_np.shape[1]
    nk = n * k

    typed, typed_note = _use_typed_prior(params, nuclei, type_profiles, geom)
    # pooled nucleus morphology: "auto" uses it only without typed nuclei (with them the morphology is already in
    # the typed prior, or the typing found it carries no type; see docs/ACCURACY.md)
    morph = params.nuclei_morphology == "on" or (params.nuclei_morphology == "auto" and type_profiles is None)
    feat_params = params if morph else params.model_copy(update={"nuclei_morphology_features": []})

    # sub-spot features Y and similarity graph W
    if features is not None:
        y_np = np.asarray(features, dtype=np.float64)
        if y_np.ndim != 2 or y_np.shape[0] != nk:
            raise ValueError(
                f"features: expected ({nk}, F) = one row per sub-spot ({n} spots x {k}), found shape {y_np.shape}"
            )
        y_np = _ft.standardise(y_np, "features")
        fdesc = {"image": "precomputed features", "nuclei": False, "n_features": int(y_np.shape[1])}
        counts_np = _ft.nuclei_features(nuclei, geom)[:, 0] if nuclei is not None else None
    else:
        y_np, fdesc, counts_np = _ft.image_features(
            image, geom, nuclei, feat_params, n_jobs=n_jobs, raw_image_features=raw_image_features
        )
    if subspot_counts is not None:
        counts_np = np.asarray(subspot_counts, dtype=np.float64).ravel()
        if counts_np.shape != (nk,) or not np.isfinite(counts_np).all() or (counts_np < 0).any():
            raise ValueError(
                f"subspot_counts: expected {nk} finite non-negative cell counts (one per sub-spot), "
                f"found shape {np.shape(subspot_counts)}"
            )
    if typed:  # (N K, G) per-gene shares: each sub-spot's part of the spot's sum of its nuclei's type means
        conf_col = params.type_confidence_column
        expected = _ft.typed_subspot_profiles(
            nuclei,
            geom,
            type_profiles,
            var.index,
            params.type_column,
            params.nuclei_pseudocount,
            confidence_column=conf_col if conf_col and conf_col in nuclei.columns else None,
        )
        share0 = _ft.typed_shares(expected, k)
        del expected
    else:
        share0 = _prior_shares(counts_np if params.nuclei_offset else None, n, k, params.nuclei_pseudocount)[:, None]
    uses_image = fdesc["image"] != "none (positional encoding of sub-spot offsets)" or fdesc["nuclei"]
    w_edges = _geo.subspot_graph(geom, params.subspot_radius)
    w_dist = _geo.edge_distances(y_np if uses_image else geom.positions, w_edges)
    w_weight = _geo.kernel_weights(w_dist, params.scale_kernel)

    # spot graph A: kernel of expression distance between neighbouring spots
    enc_np = np.where(kinds[None, :] != 2, np.log1p(np.maximum(x_np, 0)), x_np)
    a_weight = _geo.kernel_weights(_geo.edge_distances(enc_np, geom.spot_edges), params.scale_kernel)

    # ---- tensors ----------------------------------------------------------------------------------------------
    torch.manual_seed(params.seed)
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(params.seed)
    f32 = torch.float32
    x = torch.as_tensor(x_np, dtype=f32, device=dev)
    enc_in = torch.as_tensor(enc_np, dtype=f32, device=dev)
    y = torch.as_tensor(y_np, dtype=f32, device=dev)
    y_spot = y.view(n, k, -1).mean(1)
    kind_t = torch.as_tensor(kinds, device=dev)
    e = torch.as_tensor(geom.spot_edges.T, dtype=torch.long, device=dev)
    edge_index = torch.cat([e, e.flip(0)], 1)
    a_w = torch.as_tensor(np.concatenate([a_weight, a_weight]), dtype=f32, device=dev)
    w_e = torch.as_tensor(w_edges, dtype=torch.long, device=dev)
    w_w = torch.as_tensor(w_weight, dtype=f32, device=dev)
    parent = torch.as_tensor(geom.parent, dtype=torch.long, device=dev)

    gmean = x.mean(0)
    counts = kind_t != 2

    # offsets: log of a per-gene baseline rate (counts) or the baseline mean (Gaussian). Sub-spots start from
    # their prior share of the spot (nuclei split, or 1 / K): the untrained decoder reproduces that split.
    share_t = torch.as_tensor(share0, dtype=f32, device=dev).reshape(nk, -1)  # (NK, 1), or (NK, G) typed
    off1 = torch.where(counts, torch.log(torch.clamp(gmean, min=1e-4)), gmean)
    offk = torch.where(
        counts[None, :], torch.log(torch.clamp(gmean[None, :] * share_t, min=1e-6)), gmean[None, :] * share_t
    )  # (NK, G)
    net = SoScopeNet(g, y.shape[1], params.hidden, params.z_dim, params.heads).to(dev)
    vgae_decoder = Decoder(params.z_dim, y.shape[1], g, params.hidden).to(dev)

    def encode(sample: bool):
        mu, s = net.encoder(enc_in, edge_index, a_w)
        z = mu + s * torch.randn(mu.shape, generator=gen, device=dev) if sample else mu
        kl = 0.5 * (mu**2 + s**2 - 1.0 - 2.0 * torch.log(s)).sum(1).mean()
        return z, kl

    def theta():
        return torch.nn.functional.softplus(net.log_theta) + 1e-4

    history: dict[str, list] = {"vgae_loss": [], "loss": [], "recon": [], "kl": [], "reg": []}

    # ---- stage 1: spot-level variational graph autoencoder (K = 1) --------------------------------------------
    opt = torch.optim.Adam(list(net.parameters()) + list(vgae_decoder.parameters()), lr=params.lr_vgae)
    t0 = time.perf_counter()
    prog = Progress(params.vgae_epochs, "soScope stage 1 (spot VGAE) epochs", log)
    for ep in range(params.vgae_epochs):
        opt.zero_grad(set_to_none=True)
        z, kl = encode(True)
        mean = subspot_mean(vgae_decoder(z, y_spot, 1, off1), kind_t)
        recon = spot_nll(x, mean, kind_t, theta(), params.gaussian_scale_vgae).sum(1).mean()
        beta = exp_schedule(ep, params.vgae_epochs, params.beta_start, params.beta_end, params.schedule_start_frac)
        loss = recon + beta * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), params.grad_clip)
        opt.step()
        history["vgae_loss"].append(float(loss.detach()))
        if log_every and (ep + 1) % log_every == 0:
            say(f"soScope VGAE epoch {ep + 1}/{params.vgae_epochs}: loss {float(loss.detach()):.4g}")
        prog.update()
    sec_vgae = (time.perf_counter() - t0) / max(params.vgae_epochs, 1)

    # ---- stage 2: soScope (sub-spots), encoder (and optionally decoder) initialised by the VGAE ---------------
    if params.init_decoder_from_vgae and params.vgae_epochs > 0:
        net.decoder.load_state_dict(vgae_decoder.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=params.lr)
    n_w = len(w_edges)
    n_neg = params.negative_edges_per_edge * n_w
    t0, c0 = time.perf_counter(), time.process_time()
    prog = Progress(params.epochs, "soScope stage 2 (sub-spots) epochs", log)
    for ep in range(params.epochs):
        opt.zero_grad(set_to_none=True)
        z, kl = encode(True)
        m = subspot_mean(net.decoder(z[parent], y, k, offk), kind_t)  # (NK, G)
        spot_mean = m.view(n, k, g).sum(1)  # block sum as a reshape
        recon = spot_nll(x, spot_mean, kind_t, theta(), params.gaussian_scale).sum(1).mean()
        beta = exp_schedule(ep, params.epochs, params.beta_start, params.beta_end, params.schedule_start_frac)
        gamma = exp_schedule(ep, params.epochs, params.gamma_start, params.gamma_end, params.schedule_start_frac)
        loss = recon + beta * kl
        reg = torch.zeros((), device=dev)
        if n_w and params.image_weight > 0:
            prior = x[:, None, :] * share_t.view(n, k, -1)  # the parent spot split by the prior shares
            if bool(counts.all()):
                resid = torch.log1p(m).view(n, k, g) - torch.log1p(prior)
            else:
                base = torch.where(counts, torch.log1p(prior.clamp(min=0)), prior)
                resid = torch.where(counts, torch.log1p(m.clamp(min=0)), m).view(n, k, g) - base
            neg = torch.randint(0, nk, (2, n_neg), generator=gen, device=dev)
            reg = image_regulariser(resid.reshape(nk, g), w_e, w_w, neg[0], neg[1], params.reg_temperature) / n
            loss = loss + params.image_weight * gamma * reg
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), params.grad_clip)
        opt.step()
        history["loss"].append(float(loss.detach()))
        history["recon"].append(float(recon.detach()))
        history["kl"].append(float(kl.detach()))
        history["reg"].append(float(reg.detach()))
        if log_every and (ep + 1) % log_every == 0:
            say(
                f"soScope epoch {ep + 1}/{params.epochs}: loss {float(loss.detach()):.4g} (recon {float(recon.detach()):.4g}, "
                f"kl {float(kl.detach()):.4g}, image {float(reg.detach()):.4g}) {time.perf_counter() - t0:.1f}s"
            )
        prog.update()
    sec_main = (time.perf_counter() - t0) / max(params.epochs, 1)
    cpu_main = (time.process_time() - c0) / max(params.epochs, 1)

    # ---- inference: posterior mean z, likelihood mean per sub-spot --------------------------------------------
    net.eval()
    with torch.no_grad():
        z, _ = encode(False)
        m = subspot_mean(net.decoder(z[parent], y, k, offk), kind_t)
        m = torch.where(counts, m.clamp(min=0), m)
    m_np = m.cpu().numpy().astype(np.float32)
    spot_sum = m_np.reshape(n, k, g).sum(1).astype(np.float64)
    rel_err = float(np.abs(spot_sum - x_np).sum() / max(np.abs(x_np).sum(), 1e-12))
    r_spot = pearson_per_gene(spot_sum, x_np)
    conserved = conserve_spot_sums(m_np, x_np, k, counts.cpu().numpy())

    obs = pd.DataFrame(
        {
            "spot": geom.spot_names[geom.parent],
            "subspot": geom.k.astype(np.int64),
            "spot_index": geom.parent.astype(np.int64),
            "x": geom.positions[:, 0],
            "y": geom.positions[:, 1],
        },
        index=pd.Index([f"{s}_{j}" for s, j in zip(geom.spot_names[geom.parent], geom.k)]),
    )
    # X: layers['conserved'] when params.conserve (default) else layers['model_mean'] (see enhance's docstring)
    prior_np = (np.repeat(x_np, k, axis=0) * share0).astype(np.float32)
    del share0
    out = ad.AnnData(X=conserved if params.conserve else m_np, obs=obs, var=var)
    out.layers["model_mean"] = m_np
    out.layers["conserved"] = conserved
    out.layers["prior_split"] = prior_np
    if counts_np is not None:
        out.obs["n_nuclei"] = counts_np.astype(np.float64)
    out.obsm["spatial"] = geom.positions.copy()
    every = max(1, max(params.epochs, params.vgae_epochs) // 200)
    info = {
        "method": "soScope",
        "seed": params.seed,
        "params": params.model_dump(),
        "platform": platform,
        "likelihood": params.likelihood,
        "n_spots": n,
        "subspots_per_spot": k,
        "n_subspots": nk,
        "n_features": g,
        "feature_likelihoods": {nm: int((kinds == c).sum()) for nm, c in KIND_CODE.items()},
        "image_features_used": bool(uses_image),
        "features": fdesc,
        "w_graph": {
            "edges": int(n_w),
            "negatives_per_epoch": int(n_neg),
            "weights_from": "sub-spot feature distance" if uses_image else "physical distance (no image)",
        },
        "spot_graph_edges": int(len(geom.spot_edges)),
        "isolated_spots": int(len(isolated)),
        "isolated_spot_names": geom.spot_names[isolated][:50].tolist(),
        "spot_diameter_px": geom.spot_diameter_px,
        "spot_pitch_px": geom.spot_pitch_px,
        "vgae_epochs": params.vgae_epochs,
        "epochs": params.epochs,
        "seconds_per_epoch_vgae": sec_vgae,
        "seconds_per_epoch": sec_main,
        "cpu_seconds_per_epoch": cpu_main,
        "seconds_total": time.perf_counter() - t_start,
        "final_loss": {kk_: (v[-1] if v else None) for kk_, v in history.items()},
        "loss_history_every": every,
        "loss_history": {kk_: v[::every] for kk_, v in history.items()},
        "spot_reconstruction_rel_l1": rel_err,
        "conserved_spot_sums": bool(params.conserve),
        "x_layer": "conserved" if params.conserve else "model_mean",
        "typed_prior": typed_note,
        "prior": "typed-nuclei split"
        if typed
        else ("nuclei split" if (params.nuclei_offset and counts_np is not None) else "even split (spot / K)"),
        "spot_reconstruction_median_gene_r": float(np.nanmedian(r_spot)) if np.isfinite(r_spot).any() else None,
        "schedules": {
            "beta": [params.beta_start, params.beta_end],
            "gamma_image": [params.gamma_start, params.gamma_end],
            "start_frac": params.schedule_start_frac,
        },
        "image_weight": params.image_weight,
        "reg_temperature": params.reg_temperature,
        "gaussian_scale": [params.gaussian_scale_vgae, params.gaussian_scale],
        "device": str(dev),
    }
    out.uns["soscope"] = _uns_safe(info)
    say(f"soScope: {nk} sub-spots x {g} features, spot reconstruction rel. L1 {rel_err:.3f}, {sec_main:.3f} s/epoch")
    return EnhancementResult(adata=out, info=info)
