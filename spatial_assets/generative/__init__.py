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

Also :class:`GaussianScoreModel`: the analytic per-type Gaussian prior with the same interface (exact score).
"""

from ._data import LOG_INPUT_MAX, TrainingData, log_normalise, prepare_training_data, reference_fingerprint
from ._evaluation import (
    checkpoint_quality,
    diagonal_gaussian_samples,
    evaluate_samples,
    heldout_log_data,
    two_sample_auc,
    zero_inflated_samples,
)
from ._gaussian import GaussianScoreModel
from ._model import CONFIG_FILE, MODEL_FILE, STATE_FILE, CheckpointFileError, CheckpointMismatch, ScoreModel
from ._network import ScoreNet
from ._training import fit_score_model, train_score_model

__all__ = [
    "CONFIG_FILE",
    "LOG_INPUT_MAX",
    "MODEL_FILE",
    "STATE_FILE",
    "CheckpointFileError",
    "CheckpointMismatch",
    "GaussianScoreModel",
    "ScoreModel",
    "ScoreNet",
    "TrainingData",
    "checkpoint_quality",
    "diagonal_gaussian_samples",
    "evaluate_samples",
    "fit_score_model",
    "heldout_log_data",
    "log_normalise",
    "prepare_training_data",
    "reference_fingerprint",
    "train_score_model",
    "two_sample_auc",
    "zero_inflated_samples",
]
