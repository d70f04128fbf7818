"""Issue #13 point 4: training logs done/total progress; the checkpoint quality evaluation is bounded and says so."""

from __future__ import annotations

import re

import numpy as np
import pytest

from spatial_assets.generative import checkpoint_quality, fit_score_model, train_score_model
from spatial_assets.params import ScoreModelParams
from tests.generative.test_score_model import SMALL_PARAMS, _small_mop, _two_type_data

LINE = re.compile(r"^score model training steps: (\d+)/(\d+) \((\d+)%\)")


def test_training_emits_progress_lines_with_done_total_and_final_line():
    p = ScoreModelParams(
        sigma_begin=5, sigma_end=0.05, n_sigmas=20, hidden=32, n_blocks=1, lr=3e-3, batch_size=64,
        train_steps=120, ema_decay=0.9, early_stop_patience=None,
    )  # fmt: skip
    lines = []
    fit_score_model(_two_type_data(n=200), p, None, log=lines.append, progress_every=0.0)
    prog = [LINE.match(s) for s in lines if LINE.match(s)]
    done = [int(m.group(1)) for m in prog]
    assert done == list(range(1, 121))  # every step with a 0 s interval, then the final line at 120
    assert all(int(m.group(2)) == 120 for m in prog)
    assert "left" in lines[lines.index(prog[5].string)]
    assert prog[-1].string.startswith("score model training steps: 120/120 (100%) in ")
    quiet = []
    fit_score_model(_two_type_data(n=200), p, None, log=quiet.append)  # default 10 s interval: only the end
    assert [s for s in quiet if LINE.match(s)] == [s for s in quiet if s.startswith("score model training steps: 120")]
    assert len([s for s in quiet if LINE.match(s)]) == 1


def test_early_stop_closes_progress_with_reason():
    p = ScoreModelParams(
        sigma_begin=5, sigma_end=0.05, n_sigmas=20, hidden=32, n_blocks=1, lr=3e-3, batch_size=128,
        train_steps=50_000, ema_decay=0.9, eval_every=50, early_stop_patience=3, early_stop_min_delta=0.01,
    )  # fmt: skip
    lines = []
    model = fit_score_model(_two_type_data(), p, None, log=lines.append)
    last = [s for s in lines if LINE.match(s)][-1]
    assert last.startswith(f"score model training steps: {model.train_step}/50000 (")
    assert "early_stop" in last


@pytest.fixture(scope="module")
def quality_model():
    train, _ = _small_mop(n_per_class=60, n_genes=30)
    p = ScoreModelParams(train_steps=150, **SMALL_PARAMS)
    return train_score_model(train, "cell_class", p, None, log=lambda m: None), train, p


def test_checkpoint_quality_respects_max_cells_and_reports_it(quality_model):
    model, ref, p = quality_model
    lines = []
    q = checkpoint_quality(model, ref, "cell_class", p.model_copy(update={"quality_max_cells": 12}), log=lines.append)
    n_types = q["n_types"]
    assert n_types == len(model.cell_types) >= 2
    assert q["n_per_type"] == max(2, 12 // n_types) and q["n_cells"] == q["n_per_type"] * n_types <= 12
    assert q["bounded_by"][0] == "max_cells" and len(q["samples"]) == q["n_cells"]
    assert any(f"{q['n_per_type']} cells per type x {n_types} types" in s and "max_cells" in s for s in lines)
    # the same call without the bound compares the default cells per type (capped by what the types have)
    free = checkpoint_quality(model, ref, "cell_class", p, time_budget_s=None)
    assert free["bounded_by"] == [] and free["n_per_type"] == 100 and free["n_cells"] > q["n_cells"]
    assert free["estimated_sample_seconds"] is None


def test_checkpoint_quality_time_budget_lowers_cells_to_the_floor(quality_model):
    model, ref, p = quality_model
    lines = []
    q = checkpoint_quality(model, ref, "cell_class", p, time_budget_s=1e-6, log=lines.append)
    assert "time_budget" in q["bounded_by"]
    assert q["n_per_type"] == p.quality_min_cells_per_type == 20  # the floor; the schedule is kept
    assert q["n_cells"] <= 20 * q["n_types"] and "bounded evaluation (time_budget)" in q["reason"]
    assert q["level_stride"] == 1 and q["over_budget"] is True
    assert any("over budget even at the floor" in s for s in lines)
    assert q["time_budget_s"] == 1e-6 and np.isfinite(q["estimated_sample_seconds"])
    assert any("budget 1e-06 s" in s and "time_budget" in s for s in lines)
    roomy = checkpoint_quality(model, ref, "cell_class", p, time_budget_s=3600.0, n_per_type=20)
    assert roomy["bounded_by"] == [] and roomy["n_per_type"] == 20 and roomy["level_stride"] == 1
    assert "bounded evaluation" not in roomy["reason"] and roomy["over_budget"] is False
    assert 0 < roomy["estimated_sample_seconds"] < 3600.0


def _final(lines, label):
    done = [s for s in lines if s.startswith(label)]
    assert done, lines
    return done[-1]


def test_sampler_langevin_and_mixture_loops_report_levels_and_rounds(quality_model):
    """Progress per noise level / round (not per cell): the final line counts the levels / rounds actually run."""
    import torch

    from spatial_assets.decomposition import annealed_langevin, mixture_posterior

    model, _, _ = quality_model
    t = torch.zeros(7, dtype=torch.int64)
    lines = []
    model.sample(t, level_stride=4, log=lines.append)
    n_lev = len(model.sigmas[::4])
    assert _final(lines, "sampling 7 pseudo-cells: noise levels").startswith(
        f"sampling 7 pseudo-cells: noise levels: {n_lev}/{n_lev} (100%) in "
    )
    lines = []
    annealed_langevin(model, t, levels=np.arange(0, len(model.sigmas), 5), log=lines.append)
    n_lev = len(range(0, len(model.sigmas), 5))
    assert _final(lines, "decomposition Langevin noise levels (7 rows)").startswith(
        f"decomposition Langevin noise levels (7 rows): {n_lev}/{n_lev} (100%)"
    )
    g = torch.Generator().manual_seed(0)
    cand = torch.rand(6, 3, 5, generator=g) + 0.1
    raw = torch.poisson(torch.full((2, 5), 4.0), generator=g)
    lines = []
    mixture_posterior(raw, torch.tensor([0, 0, 0, 1, 1, 1]), 2, cand, torch.zeros(6, 3), n_iter=9, log=lines.append)
    assert lines == [s for s in lines if s.startswith("mixture posterior rounds (6 cells x 3 components): ")]
    assert lines[-1].startswith("mixture posterior rounds (6 cells x 3 components): 9/9 (100%) in ")
    assert len(lines) == 1  # fast loop: only the final line with the default 10 s interval
