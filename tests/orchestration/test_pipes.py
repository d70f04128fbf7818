"""Dagster Pipes: with ``compute.pipes: subprocess`` the score model trains in a process of its own
(``PipesSubprocessClient`` + ``orchestration/pipes_worker.py``); its log lines reach the step's log and the
checkpoint it returns is the one the in-process path would write (same seed, same config)."""

from __future__ import annotations

import os

import dagster as dg
import numpy as np
import pytest
import yaml

from spatial_assets import generative
from spatial_assets.orchestration.config import load_config
from spatial_assets.orchestration.inputs import reference_data
from spatial_assets.orchestration.partitions import register_partitions
from spatial_assets.orchestration.resources import ComputeResource, ProjectResource
from spatial_assets.orchestration.spatialscope import score_checkpoint
from spatial_assets.orchestration.stores import Stores

TINY_MODEL = {
    "sigma_begin": 20,
    "sigma_end": 0.01,
    "n_sigmas": 10,
    "train_steps": 40,
    "save_every": 20,
    "hidden": 32,
    "n_blocks": 1,
    "early_stop_patience": None,
    "quality_cells_per_type": 5,
}


def _materialize(tmp_path, demo_small, pipes: str):
    root = tmp_path / pipes
    cfg = {
        "storage_root": str(root / "store"),
        "compute": {"devices": ["cpu"], "pipes": pipes},
        "references": [{"name": "ref", "path": str(demo_small.reference), "cell_type_key": "cell_class"}],
        "samples": [
            {"name": "s", "spatial": str(demo_small.slide), "image": str(demo_small.image), "reference": "ref"}
        ],
        "parameters": {"cell_typing": {"min_cells_per_type": 2}, "score_model": TINY_MODEL},
    }
    p = root / "dagster_project.yaml"
    p.parent.mkdir(parents=True)
    p.write_text(yaml.safe_dump(cfg))
    (root / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "home")) as instance:
        register_partitions(instance, load_config(p))
        res = dg.materialize(
            [reference_data, score_checkpoint],
            partition_key="ref",
            instance=instance,
            resources={
                "project": ProjectResource(config_path=str(p)),
                "compute": ComputeResource(devices=["cpu"]),
                "pipes_subprocess_client": dg.PipesSubprocessClient(env=dict(os.environ)),
            },
        )
        assert res.success
        logs = [r.user_message or "" for r in instance.all_logs(res.run_id)]
    return Stores(root / "store").checkpoint("ref").folder, logs


@pytest.mark.slow
def test_pipes_training_matches_in_process_training_and_streams_its_log(tmp_path, demo_small):
    ext_folder, ext_logs = _materialize(tmp_path, demo_small, "subprocess")
    in_folder, in_logs = _materialize(tmp_path, demo_small, "none")
    assert any(m.startswith("external training:") for m in ext_logs)  # the worker's own line, through Pipes
    assert any("external training done: step 40" in m for m in ext_logs)
    assert not any(m.startswith("external training") for m in in_logs)
    ext, inp = generative.ScoreModel.load(ext_folder), generative.ScoreModel.load(in_folder)
    assert ext.train_step == inp.train_step == 40
    a, b = ext.net.state_dict(), inp.net.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # deterministic training: the external process gives the same weights
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
