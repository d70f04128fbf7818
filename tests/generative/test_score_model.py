"""Tests of the cell-type-conditioned score model (spatial_assets.score_model)."""

from __future__ import annotations

import json
import pickle

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors import safe_open

from spatial_assets import pl as _pl
from spatial_assets.datasets import data_path
from spatial_assets.generative import (
    CONFIG_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointMismatch,
    ScoreModel,
    TrainingData,
    evaluate_samples,
    fit_score_model,
    heldout_log_data,
    prepare_training_data,
    reference_fingerprint,
    train_score_model,
    two_sample_auc,
)
from spatial_assets.params import ScoreModelParams
from tests.helpers import png_of

plot_real_vs_generated = png_of(_pl.real_vs_generated)

torch.set_num_threads(1)
MOP = data_path("dot-mop-scrna", "mop_scrna_ref_500genes.h5ad")
CLASSES = ["Astro", "L2/3", "Oligo", "Pvalb"]


def _cos(u, v):
    return float(np.mean((u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)))


# ---------------------------------------------------------------------------------------------------------------
# Denoising score matching recovers an analytic score
# ---------------------------------------------------------------------------------------------------------------


def test_dsm_recovers_gaussian_mixture_score():
    """Per type, the residual is a 2-component Gaussian mixture (+-a along a type-specific direction).

    The analytic score of the noised mixture differs strongly from the per-type Gaussian the network starts from
    at small sigma; the trained network must match the mixture's score in direction and magnitude.
    """
    rng = np.random.default_rng(0)
    n, a, s = 2000, 1.5, 0.3
    dirs = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2)
    t = np.repeat([0, 1], n)
    res = rng.choice([-1, 1], size=2 * n)[:, None] * a * dirs[t] + s * rng.standard_normal((2 * n, 2))
    mus = np.array([[2.0, 3.0], [1.0, 0.5]])
    x = (mus[t] + res).astype(np.float32)
    tm = np.stack([x[t == k].mean(0) for k in (0, 1)]).astype(np.float32)
    data = TrainingData(
        x=x,
        type_idx=t,
        genes=["g0", "g1"],
        cell_types=["A", "B"],
        cell_type_key="ct",
        type_means=tm,
        target_sum=1.0,
        ref_library_size=1.0,
        fingerprint="synthetic",
        seed=0,
    )
    p = ScoreModelParams(
        sigma_begin=5,
        sigma_end=0.05,
        n_sigmas=20,
        hidden=64,
        n_blocks=2,
        lr=3e-3,
        batch_size=256,
        train_steps=600,
        ema_decay=0.99,
    )
    model = fit_score_model(data, p, None, log=lambda m: None)
    for sig in (0.1, 0.3, 0.6, 1.5):
        for k in (0, 1):
            off = tm[k] - mus[k]  # the model's residual is relative to the sample mean, not the true centre
            m1, m2 = a * dirs[k] - off, -a * dirs[k] - off
            y = (res[t == k] - off + sig * rng.standard_normal((n, 2))).astype(np.float32)
            v = s**2 + sig**2
            l1, l2 = -((y - m1) ** 2).sum(1) / (2 * v), -((y - m2) ** 2).sum(1) / (2 * v)
            w1 = 1 / (1 + np.exp(l2 - l1))
            true = (w1[:, None] * (m1 - y) + (1 - w1)[:, None] * (m2 - y)) / v
            got = model.score(torch.from_numpy(y), torch.full((n,), k), sig).numpy()
            gauss = -y / (model.net.type_var[k].numpy() + sig**2)
            rel = np.linalg.norm(got - true) / np.linalg.norm(true)
            assert _cos(got, true) > 0.9, (sig, k, _cos(got, true))
            assert rel < 0.3, (sig, k, rel)
            if sig <= 0.6:  # the learned part matters here: the Gaussian start is far off
                assert np.linalg.norm(gauss - true) / np.linalg.norm(true) > 0.8


def test_untrained_network_is_exact_zero_inflated_score():
    """The output layer starts at zero, so the network equals its analytic part: the score of a per-gene mixture
    of a zero mass (weight pi, at residual -mu) and N(m, v), noised by sigma. Checked against the direct formula
    for a scalar sigma (per-type tables) and per-row sigmas, with n not a multiple of the chunk size."""
    from spatial_assets.generative import ScoreNet

    g = torch.Generator().manual_seed(0)
    t_, g_, n = 3, 7, 300
    stats = {
        "type_means": torch.rand(t_, g_, generator=g) * 2,
        "type_var": torch.rand(t_, g_, generator=g) + 0.1,
        "zi_pi": torch.rand(t_, g_, generator=g),
        "zi_mean": torch.rand(t_, g_, generator=g),
        "zi_var": torch.rand(t_, g_, generator=g) + 0.05,
    }
    net = ScoreNet(stats, 10.0, 0.01, hidden=16, n_blocks=1, skip="zi_gaussian")
    gauss = ScoreNet(stats, 10.0, 0.01, hidden=16, n_blocks=1, skip="gaussian")
    x = torch.randn(n, g_, generator=g)
    t = torch.randint(t_, (n,), generator=g)
    for sig in (torch.tensor(0.3), torch.rand(n, generator=g) * 2 + 0.02):
        s = sig.reshape(-1, 1)
        pi, a = stats["zi_pi"][t], -stats["type_means"][t]
        m, vb = stats["zi_mean"][t], stats["zi_var"][t] + s**2
        la = torch.log(pi) - 0.5 * torch.log(s**2) - (x - a) ** 2 / (2 * s**2)
        lb = torch.log1p(-pi) - 0.5 * torch.log(vb) - (x - m) ** 2 / (2 * vb)
        r = torch.sigmoid(la - lb)
        want = s * (r * (a - x) / s**2 + (1 - r) * (m - x) / vb)
        with torch.no_grad():
            got = net(x, t, sig)
            got_gauss = gauss(x, t, sig)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        want_gauss = -x * s / (stats["type_var"][t] + s**2)
        assert torch.allclose(got_gauss, want_gauss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# A tiny model of a real reference (MOp scRNA, 4 classes, 40 genes)
# ---------------------------------------------------------------------------------------------------------------


def _small_mop(n_per_class: int = 140, n_genes: int = 40, seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    ref = ad.read_h5ad(MOP)
    ref = ref[ref.obs["cell_class"].isin(CLASSES)]
    rng = np.random.default_rng(seed)
    codes = ref.obs["cell_class"].to_numpy()
    rows = np.concatenate([rng.choice(np.flatnonzero(codes == c), 2 * n_per_class, replace=False) for c in CLASSES])
    ref = ref[np.sort(rows)]
    top = np.argsort(-np.asarray(ref.X.mean(0)).ravel())[:n_genes]
    ref = ref[:, np.sort(top)].copy()
    ref.obs["cell_class"] = ref.obs["cell_class"].astype(str)
    half = rng.random(ref.n_obs) < 0.5
    return ref[half].copy(), ref[~half].copy()


SMALL_PARAMS = dict(
    sigma_begin=5.0,
    sigma_end=0.01,
    n_sigmas=40,
    sampling_step=1e-5,
    steps_per_level=5,
    hidden=64,
    n_blocks=2,
    lr=2e-3,
    batch_size=128,
    ema_decay=0.99,
    save_every=10_000,
)


@pytest.fixture(scope="module")
def mop_model(tmp_path_factory):
    train, held = _small_mop()
    p = ScoreModelParams(train_steps=800, **SMALL_PARAMS)
    out = tmp_path_factory.mktemp("mop_ckpt")
    model = train_score_model(train, "cell_class", p, out, log=lambda m: None)
    data = prepare_training_data(train, "cell_class", p)
    return model, data, train, held, out


def test_sampling_matches_type_means_and_spread(mop_model):
    model, data, train, held, _ = mop_model
    x_held, t_held = heldout_log_data(model, held)
    t = torch.arange(len(model.cell_types)).repeat_interleave(300)
    gen = model.sample(t, seed=1).numpy()
    assert np.isfinite(gen).all()
    t = t.numpy()
    held_means = np.stack([x_held[t_held == k].mean(0) for k in range(len(model.cell_types))])
    gen_means = np.stack([gen[t == k].mean(0) for k in range(len(model.cell_types))])
    gen_sd = np.stack([gen[t == k].std(0) for k in range(len(model.cell_types))])
    held_sd = np.stack([x_held[t_held == k].std(0) for k in range(len(model.cell_types))])
    for k in range(len(model.cell_types)):
        assert np.corrcoef(gen_means[k], held_means[k])[0, 1] > 0.95
        # each type's generated mean is closer to its own held-out mean than to any other type's
        assert np.argmin(((held_means - gen_means[k]) ** 2).sum(1)) == k
        ratio = np.median(gen_sd[k] / np.maximum(held_sd[k], 1e-3))
        assert 0.6 < ratio < 1.5, (model.cell_types[k], ratio)
    # samples are log1p expression: few clearly negative values; on the linear scale (as decomposition outputs
    # them: expm1, negatives set to 0) the per-gene means match the held-out cells'
    assert (gen < -0.5).mean() < 0.05
    lin_gen = np.stack([np.expm1(np.maximum(gen[t == k], 0)).mean(0) for k in range(len(model.cell_types))])
    lin_held = np.stack([np.expm1(x_held[t_held == k]).mean(0) for k in range(len(model.cell_types))])
    for k in range(len(model.cell_types)):
        assert np.corrcoef(lin_gen[k], lin_held[k])[0, 1] > 0.95
    # seeded: same seed, same samples; another seed, other samples
    t_small = torch.tensor([0, 1, 2, 3])
    assert torch.equal(model.sample(t_small, seed=3, level_stride=4), model.sample(t_small, seed=3, level_stride=4))
    assert not torch.equal(model.sample(t_small, seed=3, level_stride=4), model.sample(t_small, seed=4, level_stride=4))


def test_zero_inflated_skip_gives_nonnegative_samples(mop_model):
    _, data, train, _, _ = mop_model
    p = ScoreModelParams(train_steps=800, **SMALL_PARAMS)
    model = fit_score_model(data, p, None, log=lambda m: None, skip="zi_gaussian")
    assert model.config["architecture"]["skip"] == "zi_gaussian"
    gen = model.sample(torch.arange(4).repeat_interleave(200), seed=1).numpy()
    assert (gen < -0.3).mean() < 0.01


def test_evaluate_samples_beats_gaussian_baseline_on_real_reference(mop_model):
    model, data, _, held, _ = mop_model
    res = evaluate_samples(model, held, n_per_type=100, seed=0, train_data=data)
    assert res["n_types"] == 4 and res["nonfinite_fraction"] == 0.0
    assert res["model"]["mean_corr"] > 0.95
    assert res["model"]["var_corr"] > 0.8
    # real training cells vs held-out cells are nearly indistinguishable; the model is closer to that floor
    # than the per-type diagonal Gaussian
    assert res["train_cells"]["auc"] < 0.65
    assert res["model"]["auc"] < res["diag_gaussian"]["auc"]
    assert set(res["model"]["per_type"]) == set(CLASSES)
    json.dumps(res)  # asset-check ready: plain numbers / strings only


def test_two_sample_auc_calibration():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((200, 5)), rng.standard_normal((200, 5))
    assert abs(two_sample_auc(a, b) - 0.5) < 0.1
    assert two_sample_auc(a, b + 3.0) > 0.99
    with pytest.raises(ValueError, match="needs >= 2 rows"):
        two_sample_auc(a[:1], b)


def test_score_scalar_and_vector_sigma_agree_and_inputs_checked(mop_model):
    model = mop_model[0]
    g = len(model.genes)
    x = torch.randn(6, g, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    s_scalar = model.score(x, t, 0.3)
    s_vec = model.score(x, t, torch.full((6,), 0.3))
    assert torch.allclose(s_scalar, s_vec, atol=1e-5, rtol=1e-4)
    assert torch.allclose(model.score(x[:2], t[:2], 0.3), s_scalar[:2], atol=1e-5, rtol=1e-4)  # row-independent
    with pytest.raises(ValueError, match=rf"x must have shape \(n, {g}\)"):
        model.score(x[:, :-1], t, 0.3)
    with pytest.raises(ValueError, match=r"type_idx must lie in \[0, 4\), found \[0, 7\]"):
        model.score(x, torch.tensor([0, 1, 2, 3, 0, 7]), 0.3)
    with pytest.raises(ValueError, match="sigma must be a scalar or have n = 6 entries, found 2"):
        model.score(x, t, torch.tensor([0.1, 0.2]))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint format, round trip, mismatch messages
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_without_pickle(mop_model, tmp_path, monkeypatch):
    model, data, train, _, out = mop_model
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL_FILE, CONFIG_FILE, STATE_FILE])
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["genes"] == model.genes and cfg["cell_types"] == CLASSES and cfg["cell_type_key"] == "cell_class"
    assert cfg["train_step"] == 800 and cfg["seed"] == 0
    assert cfg["schedule"]["decomposition_step"] == 1e-6  # sigma_begin 5 <= 70
    assert cfg["fingerprint"] == reference_fingerprint(train, "cell_class")
    assert cfg["ref_library_size"] == pytest.approx(np.expm1(data.x.astype(np.float64)).sum(1).mean())
    with safe_open(str(out / MODEL_FILE), framework="pt") as fh:
        keys = set(fh.keys())
    assert {"type_means", "type_var", "inp.weight", "out.weight"} <= keys

    model.save(tmp_path / "copy")
    # loading must never unpickle anything
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    loaded = ScoreModel.load(tmp_path / "copy")
    assert loaded.genes == model.genes and loaded.cell_types == model.cell_types
    assert torch.equal(loaded.type_means, model.type_means)
    assert torch.equal(loaded.sigmas, model.sigmas) and loaded.sigmas[0] > loaded.sigmas[-1]
    assert loaded.ref_library_size == model.ref_library_size and loaded.target_sum == model.target_sum
    x = torch.randn(5, len(model.genes), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2, 3, 1])
    assert torch.equal(loaded.score(x, t, 0.05), model.score(x, t, 0.05))
    assert torch.equal(loaded.sample(t, seed=2, level_stride=8), model.sample(t, seed=2, level_stride=8))


def test_load_detects_torn_checkpoint(mop_model, tmp_path):
    model = mop_model[0]
    model.save(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    cfg["train_step"] = 1
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="belong to different saves"):
        ScoreModel.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors"):
        ScoreModel.load(tmp_path / "nothing")


def test_mismatch_messages_name_what_differs(mop_model):
    model, _, train, held, _ = mop_model
    model.check_compatible(train, "cell_class", genes=model.genes)  # the training reference passes
    with pytest.raises(CheckpointMismatch, match="fingerprint differs: checkpoint trained on a different reference"):
        model.check_compatible(held)
    dropped = model.genes[:2]
    fewer = train[:, [g not in dropped for g in train.var_names]].copy()
    with pytest.raises(CheckpointMismatch) as err:
        model.check_compatible(fewer)
    assert f"checkpoint has 40 genes, reference has 38 of them: missing from reference: {dropped}" in str(err.value)
    relabeled = train.copy()
    relabeled.obs["cell_class"] = relabeled.obs["cell_class"].replace({"Astro": "Astrocyte"})
    with pytest.raises(CheckpointMismatch) as err:
        model.check_compatible(relabeled)
    assert "cell types differ: only in checkpoint ['Astro'], only in reference ['Astrocyte']" in str(err.value)
    with pytest.raises(
        CheckpointMismatch, match="cell-type column differs: checkpoint uses 'cell_class', given 'cell_type'"
    ):
        model.check_compatible(cell_type_key="cell_type")
    with pytest.raises(CheckpointMismatch) as err:
        model.check_compatible(genes=model.genes[1:] + ["NEWGENE"])
    assert (
        f"checkpoint has 40 genes, given genes has 40: missing from given genes: ['{model.genes[0]}']; "
        "extra in given genes: ['NEWGENE']"
    ) in str(err.value)
    with pytest.raises(CheckpointMismatch, match="different order"):
        model.check_compatible(genes=model.genes[::-1])
    assert issubclass(CheckpointMismatch, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# Resume after a crash
# ---------------------------------------------------------------------------------------------------------------


def _tiny_reference(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    n, g = 120, 12
    types = np.repeat(["a", "b", "c"], n // 3)
    rates = rng.gamma(2.0, 8.0, size=(3, g))
    counts = rng.poisson(rates[np.repeat(np.arange(3), n // 3)])
    ref = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    ref.var_names = [f"gene{i}" for i in range(g)]
    ref.obs_names = [f"cell{i}" for i in range(n)]
    ref.obs["ct"] = types
    return ref


class _Crash(RuntimeError):
    pass


def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    ref = _tiny_reference()
    p = ScoreModelParams(
        sigma_begin=3,
        sigma_end=0.05,
        n_sigmas=10,
        hidden=16,
        n_blocks=1,
        batch_size=32,
        train_steps=30,
        save_every=10,
        lr=1e-3,
    )
    full = train_score_model(ref, "ct", p, tmp_path / "a", log=lambda m: None)

    def crash(step, loss):
        if step == 25:
            raise _Crash("simulated crash")

    with pytest.raises(_Crash):
        train_score_model(ref, "ct", p, tmp_path / "b", log=lambda m: None, on_step=crash)
    with safe_open(str(tmp_path / "b" / STATE_FILE), framework="pt") as fh:
        assert fh.metadata()["step"] == "20"  # the last periodic save before the crash
    assert not list((tmp_path / "b").glob("*.tmp*"))  # atomic writes leave no temp files
    logs: list[str] = []
    steps: list[int] = []
    resumed = train_score_model(ref, "ct", p, tmp_path / "b", log=logs.append, on_step=lambda s, l: steps.append(s))
    assert any("resuming from step 20" in m for m in logs)
    assert steps == list(range(21, 31))  # continued, not restarted
    assert resumed.train_step == 30
    sa, sb = full.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # bit-identical to the uninterrupted run

    # graceful stop with max_steps, then continue; a changed configuration is not resumed
    part = train_score_model(ref, "ct", p, tmp_path / "c", log=lambda m: None, max_steps=10)
    assert part.train_step == 10 and ScoreModel.load(tmp_path / "c").train_step == 10
    logs.clear()
    other = p.model_copy(update={"lr": 5e-4})
    train_score_model(ref, "ct", other, tmp_path / "c", log=logs.append, max_steps=12)
    assert any("ignoring the training state" in m and "'lr'" in m for m in logs)


# ---------------------------------------------------------------------------------------------------------------
# Data preparation
# ---------------------------------------------------------------------------------------------------------------


def test_prepare_training_data_rules():
    ref = _tiny_reference()
    p = ScoreModelParams(max_cells_per_type=25, seed=3)
    d = prepare_training_data(ref, "ct", p)
    # per-type cap, seeded subsample
    assert np.bincount(d.type_idx).tolist() == [25, 25, 25]
    assert np.array_equal(d.cell_names, prepare_training_data(ref, "ct", p).cell_names)
    assert not np.array_equal(
        d.cell_names, prepare_training_data(ref, "ct", p.model_copy(update={"seed": 4})).cell_names
    )
    # normalisation: each cell sums to target_sum (median library) on the linear scale; all 12 genes kept
    lib = np.asarray(ref[d.cell_names].X.sum(1)).ravel()
    assert d.target_sum == pytest.approx(np.median(lib))
    assert np.allclose(np.expm1(d.x).sum(1), d.target_sum, rtol=1e-4)
    assert d.ref_library_size == pytest.approx(d.target_sum, rel=1e-4) and d.gene_selection == "all"
    # type means, residual centred per type
    for k in range(3):
        assert np.allclose(d.residual[d.type_idx == k].mean(0), 0, atol=1e-5)
    # input-scale rule: log1p data (max < 30) gives the same training data as the counts
    logged = ref.copy()
    logged.X = logged.X.copy()
    logged.X.data = np.log1p(logged.X.data)
    d_log = prepare_training_data(logged, "ct", p)
    assert d_log.input_was_log and not d.input_was_log
    assert np.allclose(d_log.x, d.x, atol=1e-4)
    # Marker column restricts genes; HVG selection otherwise caps at n_genes
    marked = ref.copy()
    marked.var["Marker"] = np.arange(12) % 3 == 0
    d_m = prepare_training_data(marked, "ct", p)
    assert d_m.genes == ["gene0", "gene3", "gene6", "gene9"] and d_m.gene_selection == "marker"
    d_h = prepare_training_data(ref, "ct", p.model_copy(update={"n_genes": 5}))
    assert len(d_h.genes) == 5 and d_h.gene_selection == "hvg"
    # explicit target sum is recorded
    assert prepare_training_data(ref, "ct", p, target_sum=1e4).target_sum == 1e4
    with pytest.raises(ValueError, match=r"reference.obs has no cell-type column 'nope' \(columns: \['ct'\]\)"):
        prepare_training_data(ref, "nope", p)
    bad = ref.copy()
    bad.X = bad.X.toarray()
    bad.X[0, 0] = -1
    with pytest.raises(ValueError, match="reference.X has negative values"):
        prepare_training_data(bad, "ct", p)


def test_fingerprint_sensitive_to_data_labels_and_genes():
    ref = _tiny_reference()
    fp = reference_fingerprint(ref, "ct")
    assert fp == reference_fingerprint(ref.copy(), "ct")
    changed = ref.copy()
    changed.X = changed.X.copy()
    changed.X.data[0] += 1
    assert reference_fingerprint(changed, "ct") != fp
    relabel = ref.copy()
    relabel.obs["ct"] = np.roll(relabel.obs["ct"].to_numpy(), 1)
    assert reference_fingerprint(relabel, "ct") != fp
    renamed = ref.copy()
    renamed.var_names = [f"g{i}" for i in range(ref.n_vars)]
    assert reference_fingerprint(renamed, "ct") != fp


def test_plot_real_vs_generated_png():
    rng = np.random.default_rng(0)
    png = plot_real_vs_generated(
        rng.random((30, 6)), np.repeat([0, 1], 15), rng.random((30, 6)), np.repeat([0, 1], 15), ["x", "y"], title="t"
    )
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(ValueError, match="same G"):
        plot_real_vs_generated(rng.random((3, 6)), [0, 0, 0], rng.random((3, 5)), [0, 0, 0], ["x"])


# ---------------------------------------------------------------------------------------------------------------
# Stop rule: held-out denoising loss with patience
# ---------------------------------------------------------------------------------------------------------------
def _two_type_data(n: int = 600, seed: int = 0) -> TrainingData:
    rng = np.random.default_rng(seed)
    t = np.repeat([0, 1], n)
    x = (np.array([[2.0, 3.0, 1.0], [1.0, 0.5, 2.0]])[t] + 0.3 * rng.standard_normal((2 * n, 3))).astype(np.float32)
    tm = np.stack([x[t == k].mean(0) for k in (0, 1)]).astype(np.float32)
    return TrainingData(
        x=x,
        type_idx=t,
        genes=["g0", "g1", "g2"],
        cell_types=["A", "B"],
        cell_type_key="ct",
        type_means=tm,
        target_sum=1.0,
        ref_library_size=1.0,
        fingerprint="synthetic-stop",
        seed=0,
    )


def test_training_stops_when_heldout_loss_stops_improving(tmp_path):
    """A Gaussian-per-type residual is learned within a few hundred steps: the held-out loss plateaus, so training
    stops long before train_steps; the checkpoint's metadata records the steps, the reason and the loss history,
    and a restart in the same folder resumes the finished state without training further."""
    p = ScoreModelParams(
        sigma_begin=5, sigma_end=0.05, n_sigmas=20, hidden=32, n_blocks=1, lr=3e-3, batch_size=128,
        train_steps=50_000, save_every=100, ema_decay=0.9, eval_every=50, early_stop_patience=3,
        early_stop_min_delta=0.01,
    )  # fmt: skip
    model = fit_score_model(_two_type_data(), p, tmp_path, log=lambda m: None)
    st = model.config["stopping"]
    assert st["stop_reason"].startswith("early_stop"), st["stop_reason"]
    assert st["steps"] == model.train_step < 50_000
    hist = st["heldout_loss_history"]
    assert hist[-1][0] == st["steps"] and len(hist) == st["steps"] // 50
    # the rule: the last `patience` evaluations did not beat the best by the relative margin, earlier ones did
    best = st["best_heldout_loss"]
    assert st["best_step"] == hist[-4][0]
    assert all(v >= best * (1 - 0.01) for _, v in hist[-3:])
    assert best == min(v for _, v in hist[:-3])
    assert st["holdout_cells"] == 120
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved["stopping"] == json.loads(json.dumps(st))
    again = fit_score_model(_two_type_data(), p, tmp_path, log=lambda m: None)
    assert again.train_step == model.train_step
    assert again.config["stopping"]["stop_reason"] == st["stop_reason"]


def test_training_without_stop_rule_runs_all_steps():
    p = ScoreModelParams(
        sigma_begin=5, sigma_end=0.05, n_sigmas=20, hidden=32, n_blocks=1, lr=3e-3, batch_size=128,
        train_steps=300, ema_decay=0.9, eval_every=50, early_stop_patience=None,
    )  # fmt: skip
    model = fit_score_model(_two_type_data(), p, None, log=lambda m: None)
    st = model.config["stopping"]
    assert (st["steps"], st["stop_reason"], st["holdout_cells"]) == (300, "train_steps", 0)
    assert st["heldout_loss_history"] == []
