"""A trained score model (checkpoint = safetensors weights + JSON config): loading, scores, sampling."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from anndata import AnnData
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..params import ScoreModelParams
from ..progress import Progress
from ._data import TrainingData, reference_fingerprint
from ._network import ScoreNet

FORMAT_VERSION = 1


MODEL_FILE = "model.safetensors"


CONFIG_FILE = "config.json"


STATE_FILE = "train_state.safetensors"


# Parameters that change what training computes (a saved training state is resumed only if they all match).
_TRAIN_KEYS = (
    "n_genes",
    "max_cells_per_type",
    "sigma_begin",
    "sigma_end",
    "n_sigmas",
    "hidden",
    "n_blocks",
    "lr",
    "batch_size",
    "grad_clip",
    "ema_decay",
    "seed",
    "early_stop_patience",
    "holdout_fraction",
)


class CheckpointFileError(ValueError):
    """A score checkpoint's file is corrupt, truncated, of the wrong kind (a pickle) or from another save."""


class CheckpointMismatch(ValueError):
    """A score checkpoint does not match the reference / genes / cell-type column it is used with."""


def _geometric_sigmas(begin: float, end: float, n: int) -> torch.Tensor:
    return torch.tensor(np.exp(np.linspace(np.log(begin), np.log(end), n)), dtype=torch.float32)


def _decomposition_step(params: ScoreModelParams) -> float:
    if params.decomposition_step is not None:
        return float(params.decomposition_step)
    return 1e-5 if params.sigma_begin > 70 else 1e-6


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
    """A trained score network with its reference metadata; inference uses the EMA weights in eval mode.

    Usually obtained from :func:`train_score_model` or :meth:`ScoreModel.load`. Attributes read from the config:
    ``genes``, ``cell_types``, ``cell_type_key``, ``sampling_step``, ``decomposition_step``, ``steps_per_level``,
    ``target_sum``, ``ref_library_size``, ``fingerprint``, ``train_step``, ``seed``; ``sigmas`` is the geometric
    noise schedule and ``type_means`` the per-type means (on ``device``).

    Parameters
    ----------
    net : ScoreNet
        The network (put in eval mode).
    config : dict
        The checkpoint's ``config.json`` content (genes, cell types, schedule, architecture, training, ...).
    device : str or torch.device, default "cpu"
        Device to run on.
    """

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

    def set_precision(self, dtype: Literal["float32", "bfloat16", "float16"] = "float32") -> ScoreModel:
        """Run the network's matmuls under ``torch.autocast`` in ``dtype``.

        bfloat16 is ~2x faster on CPUs with AVX512-BF16 / AMX and on GPUs; the analytic Gaussian part stays float32.

        Parameters
        ----------
        dtype : {"float32", "bfloat16", "float16"}, default "float32"
            Autocast precision; "float32" turns autocast off.

        Returns
        -------
        ScoreModel
            ``self``.

        Raises
        ------
        ValueError
            If ``dtype`` is not one of the three.
        """
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', found {dtype!r}")
        self.autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
        return self

    # -- basic -------------------------------------------------------------------------------------------------
    def to(self, device) -> ScoreModel:
        """Move the network and the schedule to a device.

        Parameters
        ----------
        device : str or torch.device
            Target device.

        Returns
        -------
        ScoreModel
            ``self``.
        """
        self.device = torch.device(device)
        self.net.to(self.device)
        self.type_means = self.net.type_means
        self.sigmas = self._sigmas_cpu.to(self.device)
        return self

    def __repr__(self) -> str:
        return (
            f"ScoreModel({len(self.genes)} genes, {len(self.cell_types)} types of '{self.cell_type_key}', "
            f"step {self.train_step}, device {self.device})"
        )

    def _check_inputs(self, x: torch.Tensor | None, type_idx: torch.Tensor) -> torch.Tensor:
        type_idx = torch.as_tensor(type_idx, device=self.device).long().reshape(-1)
        if x is not None and (x.ndim != 2 or x.shape[1] != len(self.genes) or x.shape[0] != type_idx.shape[0]):
            raise ValueError(
                f"x must have shape (n, {len(self.genes)}) with n = len(type_idx) = "
                f"{type_idx.shape[0]}, found {tuple(x.shape)}"
            )
        if type_idx.numel() and (int(type_idx.min()) < 0 or int(type_idx.max()) >= len(self.cell_types)):
            raise ValueError(
                f"type_idx must lie in [0, {len(self.cell_types)}), found "
                f"[{int(type_idx.min())}, {int(type_idx.max())}]"
            )
        return type_idx

    def score(self, x: torch.Tensor, type_idx: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Score (grad log p_sigma(x | type)) of residuals; no gradient, EMA weights.

        Parameters
        ----------
        x : torch.Tensor
            ``(n, G)`` residuals (log1p expression minus the type mean) on the model's genes.
        type_idx : torch.Tensor
            ``(n,)`` type index into ``cell_types``.
        sigma : float or torch.Tensor
            A scalar noise level, or ``(n,)`` per-row levels.

        Returns
        -------
        torch.Tensor
            ``(n, G)`` score (the network's ``sigma * score`` divided by sigma).

        Raises
        ------
        ValueError
            If shapes disagree, a type index is out of range, or ``sigma`` has neither 1 nor ``n`` entries.
        """
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
        with (
            torch.no_grad(),
            torch.autocast(
                self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None
            ),
        ):
            return self.net(x, type_idx, sig) / div

    def sample(
        self,
        type_idx: torch.Tensor,
        seed: int = 0,
        level_stride: int = 1,
        *,
        steps_per_level: int | None = None,
        step: float | None = None,
        batch_size: int = 20_000,
        log=None,
    ) -> torch.Tensor:
        """Annealed Langevin pseudo-cells of the given types (SpatialScope's / NCSN's sampler).

        Per level sigma (every ``level_stride``-th of the schedule): ``eta = step (sigma / sigma_end)^2``, then
        ``steps_per_level`` times ``x += eta score + sqrt(2 eta) noise``; finally ``x += sigma_end^2 score``
        (denoising). x starts at N(0, I) as in SpatialScope. Seeded: the same seed and inputs give the same output on
        the same device.

        Parameters
        ----------
        type_idx : torch.Tensor
            ``(n,)`` type index of each pseudo-cell.
        seed : int, default 0
            Seed of the initial state and the noise.
        level_stride : int, default 1
            Use every ``level_stride``-th noise level (faster, coarser); at least 1.
        steps_per_level : int, optional
            Langevin steps per level; default the checkpoint's ``steps_per_level``.
        step : float, optional
            Base step size; default the checkpoint's ``sampling_step``.
        batch_size : int, default 20000
            Cells sampled at once.
        log : callable, optional
            Receives progress lines (noise levels done / total, time left) at most every 10 s; None = silent.

        Returns
        -------
        torch.Tensor
            ``(n, G)`` log1p expression (residual + type mean).

        Raises
        ------
        ValueError
            If a type index is out of range or ``level_stride < 1``.
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
        n_batches = -(-type_idx.shape[0] // batch_size)
        prog = Progress(n_batches * len(sigmas), f"sampling {type_idx.shape[0]} pseudo-cells: noise levels", log)
        for start in range(0, type_idx.shape[0], batch_size):
            t = type_idx[start : start + batch_size]
            x = torch.randn(t.shape[0], len(self.genes), generator=g, device=self.device)
            for sigma in sigmas:
                eta = step * (sigma / sigma_end) ** 2
                for _ in range(n_steps):
                    noise = torch.randn(x.shape, generator=g, device=self.device)
                    x = x + eta * self.score(x, t, sigma) + math.sqrt(2 * eta) * noise
                prog.update()
            x = x + sigma_end**2 * self.score(x, t, sigma_end)
            out.append(x + self.type_means[t])
        if not out:
            return torch.empty(0, len(self.genes), device=self.device)
        return torch.cat(out)

    # -- checkpoint I/O ----------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the checkpoint: ``path/model.safetensors`` (EMA weights and buffers) and ``path/config.json``.

        Each file is written atomically; the safetensors metadata records the step and the reference fingerprint so
        :meth:`load` detects files of different saves.

        Parameters
        ----------
        path : str or os.PathLike
            Checkpoint folder (created if needed).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "spatial_assets.score_model",
            "format_version": str(FORMAT_VERSION),
            "train_step": str(self.train_step),
            "fingerprint": self.fingerprint,
        }
        _atomic_save_safetensors(self.net.state_dict(), path / MODEL_FILE, meta)
        _atomic_write_bytes(path / CONFIG_FILE, json.dumps(self.config, indent=2).encode())

    @classmethod
    def load(cls, path, device="cpu") -> ScoreModel:
        """Load a folder written by :meth:`save` (safetensors + JSON only; nothing is unpickled).

        Parameters
        ----------
        path : str or os.PathLike
            Checkpoint folder.
        device : str or torch.device, default "cpu"
            Device to load onto.

        Returns
        -------
        ScoreModel
            The model.

        Raises
        ------
        FileNotFoundError
            The folder or one of its files is missing (or a file is given where the folder was expected).
        CheckpointFileError
            A file is corrupt or truncated, ``model.safetensors`` is a pickle / ``torch.save`` file, or the two
            files belong to different saves; the message names the file.
        """
        path = Path(path)
        if path.is_file():
            raise FileNotFoundError(
                f"score checkpoint {path}: is a file; expected the checkpoint folder holding {MODEL_FILE} + {CONFIG_FILE}"
            )
        for f in (MODEL_FILE, CONFIG_FILE):
            if not (path / f).is_file():
                raise FileNotFoundError(f"score checkpoint {path} lacks {f} (expected {MODEL_FILE} + {CONFIG_FILE})")
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointFileError(f"{path / CONFIG_FILE}: not valid JSON (truncated?) ({e})") from None
        if not isinstance(config, dict) or config.get("format") != "spatial_assets.score_model":
            got = config.get("format") if isinstance(config, dict) else type(config).__name__
            raise CheckpointFileError(f"{path / CONFIG_FILE}: format is {got!r}, expected 'spatial_assets.score_model'")
        mfile = path / MODEL_FILE
        head = mfile.read_bytes()[:4] if mfile.stat().st_size else b""
        if head[:1] == b"\x80" or head[:2] == b"PK":
            raise CheckpointFileError(
                f"{mfile}: is a pickle / torch.save file, not safetensors; expected safetensors weights "
                "(pickles are never loaded: unpickling can run arbitrary code). Re-materialize score_checkpoint"
            )
        try:
            with safe_open(str(mfile), framework="pt") as fh:
                meta = fh.metadata() or {}
            state = load_file(str(mfile), device="cpu")
        except Exception as e:
            raise CheckpointFileError(
                f"{mfile}: could not be read as safetensors (truncated or corrupt?) ({type(e).__name__}: {str(e)[:200]}); "
                "re-materialize score_checkpoint"
            ) from None
        if meta.get("train_step") != str(config.get("train_step")) or meta.get("fingerprint") != config.get(
            "fingerprint"
        ):
            raise CheckpointFileError(
                f"{path}: {MODEL_FILE} (step {meta.get('train_step')}) and {CONFIG_FILE} (step "
                f"{config.get('train_step')}) belong to different saves"
            )
        try:
            net = _build_net(config, {k: state[k] for k in ScoreNet.STATS})
            net.load_state_dict(state)
        except (KeyError, RuntimeError) as e:
            raise CheckpointFileError(
                f"{mfile}: weights do not match {CONFIG_FILE}'s architecture ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        return cls(net, config, device=device)

    # -- compatibility -----------------------------------------------------------------------------------------
    def check_compatible(
        self, reference: AnnData | None = None, cell_type_key: str | None = None, genes: Sequence[str] | None = None
    ) -> None:
        """Check that the checkpoint fits a reference, a cell-type column and a gene list.

        Parameters
        ----------
        reference : anndata.AnnData, optional
            Must contain the checkpoint's genes and its cell-type column with the same set of types, and have the
            fingerprint the checkpoint was trained on (:func:`reference_fingerprint`).
        cell_type_key : str, optional
            Must equal the checkpoint's ``cell_type_key``.
        genes : sequence of str, optional
            The genes the caller feeds, in order; they must equal the checkpoint's genes.

        Raises
        ------
        CheckpointMismatch
            Naming every difference found.
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
                problems.append(
                    f"checkpoint has {len(self.genes)} genes, given genes has {len(genes)}: "
                    f"missing from given genes: {_short(miss)}; extra in given genes: {_short(extra)}"
                )
            elif genes != self.genes:
                i = next(i for i, (a, b) in enumerate(zip(self.genes, genes)) if a != b)
                problems.append(
                    f"genes are the checkpoint's but in a different order (first difference at "
                    f"position {i}: checkpoint '{self.genes[i]}', given '{genes[i]}')"
                )
        if reference is not None:
            ref_genes = set(map(str, reference.var_names))
            miss = [g for g in self.genes if g not in ref_genes]
            if miss:
                problems.append(
                    f"checkpoint has {len(self.genes)} genes, reference has "
                    f"{len(self.genes) - len(miss)} of them: missing from reference: {_short(miss)}"
                )
            if self.cell_type_key not in reference.obs.columns:
                problems.append(f"reference.obs has no cell-type column '{self.cell_type_key}'")
            else:
                ref_types = set(reference.obs[self.cell_type_key].dropna().astype(str))
                only_ck = sorted(set(self.cell_types) - ref_types)
                only_ref = sorted(ref_types - set(self.cell_types))
                if only_ck or only_ref:
                    problems.append(
                        f"cell types differ: only in checkpoint {_short(only_ck)}, only in reference {_short(only_ref)}"
                    )
                fp = reference_fingerprint(reference, self.cell_type_key)
                if fp != self.fingerprint:
                    problems.append(
                        f"fingerprint differs: checkpoint trained on a different reference "
                        f"(checkpoint {self.fingerprint[:12]}, reference {fp[:12]})"
                    )
        if problems:
            raise CheckpointMismatch("; ".join(problems))


def _short(items: Sequence[str], k: int = 20) -> str:
    items = list(items)
    return str(items) if len(items) <= k else str(items[:k])[:-1] + f", ... ({len(items)} in all)]"


def _build_net(config: dict, stats: dict[str, torch.Tensor]) -> ScoreNet:
    arch, sched = config["architecture"], config["schedule"]
    return ScoreNet(
        stats,
        sched["sigma_begin"],
        sched["sigma_end"],
        hidden=arch["hidden"],
        n_blocks=arch["n_blocks"],
        n_fourier=arch["n_fourier"],
        skip=arch["skip"],
    )


def _model_config(
    data: TrainingData,
    params: ScoreModelParams,
    arch: dict,
    loss: str,
    step: int,
    n_params: int,
    stopping: dict | None = None,
) -> dict:
    return {
        "stopping": stopping or {"steps": step, "stop_reason": "train_steps", "early_stop_patience": None},
        "format": "spatial_assets.score_model",
        "format_version": FORMAT_VERSION,
        "genes": data.genes,
        "cell_types": data.cell_types,
        "cell_type_key": data.cell_type_key,
        "n_cells_per_type": np.bincount(data.type_idx, minlength=len(data.cell_types)).tolist(),
        "gene_selection": data.gene_selection,
        "input_was_log": data.input_was_log,
        "target_sum": data.target_sum,
        "ref_library_size": data.ref_library_size,
        "fingerprint": data.fingerprint,
        "schedule": {
            "sigma_begin": params.sigma_begin,
            "sigma_end": params.sigma_end,
            "n_sigmas": params.n_sigmas,
            "sampling_step": params.sampling_step,
            "decomposition_step": _decomposition_step(params),
            "steps_per_level": params.steps_per_level,
        },
        "architecture": {**arch, "n_params": n_params, "output": "sigma * score"},
        "training": {k: getattr(params, k) for k in _TRAIN_KEYS} | {"loss": loss, "train_steps": params.train_steps},
        "train_step": step,
        "seed": params.seed,
    }
