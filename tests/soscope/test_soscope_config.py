"""Every soScope setting is reachable from dagster_project.yaml and reaches the model."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from spatial_assets.orchestration.config import ConfigError, load_config
from spatial_assets.params import SoScopeParams
from spatial_assets.soscope import enhance

from .test_soscope import hex_slide

SETTINGS = {
    "beta_start": 0.01,
    "beta_end": 0.002,
    "gamma_start": 2.0,
    "gamma_end": 0.1,
    "schedule_start_frac": 0.25,
    "image_weight": 0.5,
    "reg_temperature": 3.0,
    "gaussian_scale_vgae": 5.0,
    "gaussian_scale": 2.0,
    "grad_clip": 4.0,
    "subspot_radius": 30.0,
    "squidpy_features": ["summary"],
    "init_decoder_from_vgae": True,
    "image_pca": 4,
    "image_feature_weight": 0.5,
    "nuclei_feature_weight": 2.0,
    "nuclei_offset": True,
    "nuclei_pseudocount": 0.5,
    "conserve": False,
    "lr": 1e-3,
    "lr_vgae": 2e-3,
    "epochs": 15,
    "vgae_epochs": 5,
    "hidden": 16,
    "z_dim": 8,
    "image_features": "none",
    "typed_prior": "on",
    "type_column": "label",
    "type_confidence_column": "conf",
    "nuclei_morphology_features": ["nucleus_area"],
    "nuclei_morphology_weight": 0.5,
    "nuclei_morphology": "on",
}


def _config(tmp_path: Path, soscope: dict):
    (tmp_path / "slide.h5ad").write_bytes(b"x")
    (tmp_path / "ref.h5ad").write_bytes(b"x")
    (tmp_path / "he.tif").write_bytes(b"x")
    doc = {
        "storage_root": "store",
        "references": [{"name": "ctx", "path": "ref.h5ad", "cell_type_key": "cell_type"}],
        "samples": [
            {"name": "s1", "spatial": "slide.h5ad", "image": "he.tif", "platform": "visium", "reference": "ctx"}
        ],
        "parameters": {"soscope": soscope},
    }
    p = tmp_path / "dagster_project.yaml"
    p.write_text(yaml.safe_dump(doc))
    return load_config(p)


def test_every_soscope_setting_is_read_from_yaml(tmp_path):
    params = _config(tmp_path, SETTINGS).parameters_for("s1").soscope
    assert {k: getattr(params, k) for k in SETTINGS} == SETTINGS
    # nothing the model reads is left outside SoScopeParams: enhance's keyword arguments are data or compute only
    import inspect

    kw = set(inspect.signature(enhance).parameters) - {
        "slide",
        "params",
        "platform",
        "image",
        "nuclei",
        "device",
        "log",
    }
    assert kw == {
        "grid_subdivision",  # per sample (the sample's config entry), not a hyper-parameter
        "spot_diameter_px",
        "features",
        "subspot_counts",
        "raw_image_features",
        "type_profiles",  # data: the reference's type-mean profiles for the typed-cell prior
        "n_jobs",
        "n_threads",
        "log_every",
    }


def test_yaml_settings_reach_the_model(tmp_path):
    torch.set_num_threads(1)
    params = _config(tmp_path, SETTINGS).parameters_for("s1").soscope
    s = hex_slide(3, 3)
    rng = np.random.default_rng(0)
    # one nucleus at the centre of random sub-spots of every spot
    from spatial_assets import soscope as ss

    g = ss.build_subspots(s, "visium")
    pick = rng.random(len(g.positions)) < 0.4
    nuclei = pd.DataFrame({"x": g.positions[pick, 0], "y": g.positions[pick, 1], "area": 20.0})
    res = enhance(s, params, "visium", nuclei=nuclei)
    o = res.adata
    # conserve: false -> X is the likelihood mean, not the conserved split
    np.testing.assert_array_equal(o.X, o.layers["model_mean"])
    assert not np.allclose(o.X, o.layers["conserved"])
    # nuclei_pseudocount 0.5 -> the prior split is spot x (count + 0.5) / sum over the spot
    c = pick.astype(float).reshape(9, 7) + 0.5
    np.testing.assert_allclose(
        o.layers["prior_split"],
        (s.X[:, None, :] * (c / c.sum(1, keepdims=True))[:, :, None]).reshape(63, -1),
        rtol=1e-5,
    )
    assert res.info["schedules"] == {"beta": [0.01, 0.002], "gamma_image": [2.0, 0.1], "start_frac": 0.25}
    assert res.info["image_weight"] == 0.5 and res.info["gaussian_scale"] == [5.0, 2.0]
    assert len(res.info["loss_history"]["loss"]) == 15 and res.info["params"]["hidden"] == 16
    # and a different value changes the result
    other = enhance(s, params.model_copy(update={"nuclei_pseudocount": 0.01}), "visium", nuclei=nuclei)
    assert not np.allclose(other.adata.layers["prior_split"], o.layers["prior_split"])


def test_bad_soscope_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"parameters\.soscope\.image_wieght"):
        _config(tmp_path, {"image_wieght": 1.0})
    with pytest.raises(ConfigError, match=r"parameters\.soscope\.squidpy_features"):
        _config(tmp_path, {"squidpy_features": ["colour"]})
    assert SoScopeParams().conserve and SoScopeParams().nuclei_offset  # the defaults the benchmark measures
