"""Denoising score matching over a geometric noise schedule, with periodic resumable saves."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from anndata import AnnData
from safetensors import safe_open
from safetensors.torch import load_file

from ..params import ScoreModelParams
from ..progress import Progress
from ._data import TrainingData, prepare_training_data
from ._model import _TRAIN_KEYS, STATE_FILE, ScoreModel, _atomic_save_safetensors, _geometric_sigmas, _model_config
from ._network import ScoreNet


def _step_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (2**63 - 1)


def _train_signature(data: TrainingData, params: ScoreModelParams, arch: dict, loss: str) -> dict:
    return {
        "fingerprint": data.fingerprint,
        "cell_type_key": data.cell_type_key,
        "genes_sha256": hashlib.sha256("\x1f".join(data.genes).encode()).hexdigest(),
        "target_sum": data.target_sum,
        "loss": loss,
        **arch,
        **{k: getattr(params, k) for k in _TRAIN_KEYS},
    }


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


def _deterministic(fn):
    """Run ``fn`` with PyTorch's deterministic algorithms: multi-threaded CPU backward passes (scatter / index
    reductions) otherwise sum in a thread-dependent order, so two trainings of one config differed at ~1e-11."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.use_deterministic_algorithms(before)

    return wrapped


@_deterministic
def fit_score_model(
    data: TrainingData,
    params: ScoreModelParams,
    out_dir=None,
    device="cpu",
    log: Callable[[str], None] = print,
    max_steps: int | None = None,
    *,
    loss: Literal["l1", "l2"] = "l2",
    n_fourier: int = 16,
    skip: Literal["gaussian", "zi_gaussian"] = "gaussian",
    log_every: int = 200,
    progress_every: float = 10.0,
    on_step: Callable[[int, float], None] | None = None,
) -> ScoreModel:
    """Train the score network on prepared data by denoising score matching (see :func:`train_score_model`).

    Each step draws a batch of cells, noise levels from the geometric schedule (``params.sigma_begin`` ..
    ``params.sigma_end``, ``params.n_sigmas`` levels) and Gaussian noise, all from a generator seeded by
    ``(params.seed, step)``; the loss is the L2 (or L1) distance between the network's ``sigma * score`` of the
    noised residual and ``-noise`` (NCSN, Song & Ermon 2019). Adam, gradient clipping, an EMA of the weights (the
    model returned), mixed precision on CUDA only, PyTorch's deterministic algorithms. With ``out_dir`` the
    training state is saved atomically every ``params.save_every`` steps and training resumes from it when its
    signature (reference fingerprint, genes, target sum, architecture, loss and training parameters) matches.

    Parameters
    ----------
    data : TrainingData
        Prepared training data (:func:`prepare_training_data`).
    params : spatial_assets.params.ScoreModelParams
        Schedule, architecture and optimisation parameters.
    out_dir : str or os.PathLike, optional
        Checkpoint folder (``model.safetensors``, ``config.json``, ``train_state.safetensors``); None trains in
        memory only.
    device : str or torch.device, default "cpu"
        Training device.
    log : callable, default print
        Receives progress lines.
    max_steps : int, optional
        Stop at this step (at most ``params.train_steps``); a later call resumes.
    loss : {"l2", "l1"}, default "l2"
        L2 estimates the score; SpatialScope's L1 form estimates a median instead.
    n_fourier : int, default 16
        Fourier features of the noise level.
    skip : {"gaussian", "zi_gaussian"}, default "gaussian"
        Analytic part of the network (:class:`ScoreNet`).
    log_every : int, default 200
        Steps between loss lines.
    progress_every : float, default 10.0
        Seconds between ``done/total`` progress lines with the time left (:class:`spatial_assets.progress.Progress`).
    on_step : callable, optional
        Called as ``on_step(step, loss)`` after every step.

    Returns
    -------
    ScoreModel
        The EMA model at the last step (also saved in ``out_dir`` when given).

    Raises
    ------
    ValueError
        If ``loss`` is unknown or ``params.sigma_end >= params.sigma_begin``.
    """
    if loss not in ("l1", "l2"):
        raise ValueError(f"loss must be 'l1' or 'l2', found {loss!r}")
    if params.sigma_end >= params.sigma_begin:
        raise ValueError(f"sigma_end ({params.sigma_end}) must be < sigma_begin ({params.sigma_begin})")
    device = torch.device(device)
    arch = {
        "kind": "residual_mlp_film",
        "hidden": params.hidden,
        "n_blocks": params.n_blocks,
        "n_fourier": n_fourier,
        "skip": skip,
        "n_genes": len(data.genes),
        "n_types": len(data.cell_types),
    }
    stats = data.net_stats()
    torch.manual_seed(params.seed)  # initial weights
    net = ScoreNet(
        stats,
        params.sigma_begin,
        params.sigma_end,
        hidden=params.hidden,
        n_blocks=params.n_blocks,
        n_fourier=n_fourier,
        skip=skip,
    ).to(device)
    ema = ScoreNet(
        stats,
        params.sigma_begin,
        params.sigma_end,
        hidden=params.hidden,
        n_blocks=params.n_blocks,
        n_fourier=n_fourier,
        skip=skip,
    ).to(device)
    ema.load_state_dict(net.state_dict())
    ema.eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=params.lr)
    n_params = sum(p.numel() for p in net.parameters())
    signature = _train_signature(data, params, arch, loss)

    step = 0
    es_state: dict = {"best": None, "best_step": None, "since": 0, "history": [], "stop_reason": None}
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
            es_state.update(json.loads(meta.get("early_stop", "{}")))
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

    # held-out cells for the stop rule (seeded split; a fixed set of noise draws so evaluations are comparable)
    train_idx = torch.arange(n, device=device)
    val = None
    if params.early_stop_patience is not None and n >= 20:
        gv = torch.Generator(device="cpu").manual_seed(_step_seed(params.seed, -1))
        perm = torch.randperm(n, generator=gv)
        n_val = max(1, int(round(params.holdout_fraction * n)))
        vi = perm[:n_val][:4096]
        train_idx = perm[n_val:].to(device)
        v_lev = torch.randint(len(sigmas), (len(vi),), generator=gv).to(device)
        v_e = torch.randn(len(vi), n_genes, generator=gv).to(device)
        val = (vi.to(device), v_lev, v_e, n_val)

    def val_loss() -> float:
        vi, v_lev, v_e, _ = val
        tot = 0.0
        with torch.no_grad():
            for a in range(0, len(vi), 1024):
                sl = slice(a, a + 1024)
                sig = sigmas[v_lev[sl]]
                out = ema(x_all[vi[sl]] + sig[:, None] * v_e[sl], t_all[vi[sl]], sig)
                r = out.float() + v_e[sl]
                tot += float((r.abs() if loss == "l1" else r * r).mean(1).sum())
        return tot / len(vi)

    def stopping(at_step: int) -> dict:
        return {
            "steps": at_step,
            "stop_reason": es_state["stop_reason"] or ("max_steps" if at_step < params.train_steps else "train_steps"),
            "early_stop_patience": params.early_stop_patience,
            "early_stop_min_delta": params.early_stop_min_delta,
            "eval_every": params.eval_every,
            "holdout_cells": int(val[3]) if val is not None else 0,
            "best_heldout_loss": es_state["best"],
            "best_step": es_state["best_step"],
            "heldout_loss_history": es_state["history"],
        }

    def save_all(at_step: int) -> ScoreModel:
        config = _model_config(data, params, arch, loss, at_step, n_params, stopping(at_step))
        model = ScoreModel(_clone_net(ema), config, device)
        if out_dir is not None:
            tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
            tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
            tensors |= _opt_tensors(opt)
            _atomic_save_safetensors(
                tensors,
                state_path,
                {
                    "step": str(at_step),
                    "signature": json.dumps(signature, sort_keys=True),
                    "early_stop": json.dumps(es_state),
                },
            )
            model.save(out_dir)
        return model

    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    net.train()
    t0, run_loss, n_run, start_step = time.perf_counter(), 0.0, 0, step
    prog = Progress(stop, "score model training steps", log, progress_every, start=min(step, stop))
    while step < stop and es_state["stop_reason"] is None:
        g = torch.Generator(device=device).manual_seed(_step_seed(params.seed, step))
        idx = train_idx[torch.randint(len(train_idx), (params.batch_size,), generator=g, device=device)]
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
        prog.set(step)
        if step % log_every == 0 or step == stop:
            rate = (step - start_step) / max(time.perf_counter() - t0, 1e-9)
            log(f"score model: step {step}/{params.train_steps} loss {run_loss / n_run:.4f} ({rate:.1f} steps/s)")
            run_loss, n_run = 0.0, 0
        if val is not None and step % params.eval_every == 0:
            vl = val_loss()
            es_state["history"].append([step, vl])
            best = es_state["best"]
            if best is None or vl < best * (1 - params.early_stop_min_delta):
                es_state.update(best=vl, best_step=step, since=0)
            else:
                es_state["since"] += 1
            if es_state["since"] >= params.early_stop_patience:
                es_state["stop_reason"] = (
                    f"early_stop: held-out denoising loss did not improve by {params.early_stop_min_delta:g} "
                    f"(relative) in {params.early_stop_patience} evaluations every {params.eval_every} steps "
                    f"(best {es_state['best']:.4f} at step {es_state['best_step']})"
                )
                log(f"score model: stopping at step {step}: {es_state['stop_reason']}")
        if out_dir is not None and step % params.save_every == 0 and step < stop and es_state["stop_reason"] is None:
            save_all(step)
    prog.close(es_state["stop_reason"] or "")
    return save_all(step)


def _clone_net(net: ScoreNet) -> ScoreNet:
    clone = ScoreNet(
        {k: getattr(net, k) for k in ScoreNet.STATS},
        1.0,
        0.5,
        hidden=net.out.in_features,
        n_blocks=len(net.blocks),
        n_fourier=net.freqs.numel(),
        skip=net.skip,
    )
    clone.load_state_dict(net.state_dict())
    return clone.to(net.type_means.device).eval().requires_grad_(False)


def train_score_model(
    reference: AnnData,
    cell_type_key: str,
    params: ScoreModelParams,
    out_dir,
    device="cpu",
    log: Callable[[str], None] = print,
    max_steps: int | None = None,
    **kwargs,
) -> ScoreModel:
    """Prepare the reference and train (or resume training of) its score model into ``out_dir``.

    SpatialScope's generative prior: a cell-type-conditioned score model of log1p(normalised expression) fitted by
    denoising score matching (:func:`prepare_training_data`, then :func:`fit_score_model`). Resumes from
    ``out_dir/train_state.safetensors`` when it was written for the same reference fingerprint and training
    configuration; stops after ``params.train_steps`` steps in all (or at step ``max_steps`` if given, resumable
    later).

    Parameters
    ----------
    reference : anndata.AnnData
        Cells x genes raw counts with the types in ``obs``.
    cell_type_key : str
        Column of ``reference.obs`` with the cell types.
    params : spatial_assets.params.ScoreModelParams
        Training parameters.
    out_dir : str or os.PathLike or None
        Checkpoint folder; None trains in memory only.
    device : str or torch.device, default "cpu"
        Training device.
    log : callable, default print
        Receives progress lines.
    max_steps : int, optional
        Stop at this step.
    **kwargs
        ``target_sum``, ``genes`` (:func:`prepare_training_data`) and ``loss``, ``n_fourier``, ``skip``,
        ``log_every``, ``on_step`` (:func:`fit_score_model`).

    Returns
    -------
    ScoreModel
        The trained model.

    Raises
    ------
    ValueError
        On a bad reference (see :func:`prepare_training_data`) or bad training options.

    Examples
    --------
    >>> import numpy as np, anndata as ad
    >>> from spatial_assets.generative import train_score_model
    >>> from spatial_assets.params import ScoreModelParams
    >>> rng = np.random.default_rng(0)
    >>> ref = ad.AnnData(rng.poisson(5.0, (200, 20)).astype(np.float32))
    >>> ref.obs["cell_type"] = np.repeat(["a", "b"], 100)
    >>> params = ScoreModelParams(train_steps=20, hidden=16, n_blocks=1, batch_size=32, n_sigmas=10)
    >>> model = train_score_model(ref, "cell_type", params, None, log=lambda line: None)
    >>> model.sample(np.array([0, 1]), seed=0).shape
    torch.Size([2, 20])
    """
    prep_kw = {k: kwargs.pop(k) for k in ("target_sum", "genes") if k in kwargs}
    data = prepare_training_data(reference, cell_type_key, params, **prep_kw)
    log(
        f"score model: {len(data.x)} cells, {len(data.genes)} genes ({data.gene_selection}), "
        f"{len(data.cell_types)} types of '{cell_type_key}', target sum {data.target_sum:g}"
    )
    return fit_score_model(data, params, out_dir, device=device, log=log, max_steps=max_steps, **kwargs)
