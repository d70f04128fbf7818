"""Dagster wiring: the asset graph's lineage and partitions, GPU tags, checks, the sensors' behaviour, device fallback.

(The end-to-end materialization of the graph is in test_pipeline.py.)
"""

import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from spatial_assets.orchestration.config import ConfigError, load_config
from spatial_assets.orchestration.definitions import build_definitions
from spatial_assets.orchestration.partitions import n_ranges, range_bounds, register_partitions, sample_range_keys
from spatial_assets.orchestration.resources import GPU_TAG, ComputeResource
from tests.helpers import REPO

defs = build_definitions(load_config(REPO / "dagster_project.yaml", check_files=False))
EXPECTED = {
    "reference_data",
    "slide_inputs",
    "segmented_slide",
    "typed_cells",
    "score_checkpoint",
    "decomposed_cells",
    "decomposed_cells_by_sample",
    "enhanced_subspots",
    "combined_slices",
    "sample_spatialdata",
}


def _graph():
    return defs.resolve_asset_graph()


def test_asset_graph_lineage():
    g = _graph()
    keys = {k.to_user_string() for k in g.get_all_asset_keys()}
    assert keys == EXPECTED

    def parents(name):
        return {k.to_user_string() for k in g.get(dg.AssetKey(name)).parent_keys}

    assert parents("segmented_slide") == {"slide_inputs"}
    assert parents("typed_cells") == {"segmented_slide", "slide_inputs", "reference_data"}
    assert parents("score_checkpoint") == {"reference_data"}
    assert parents("decomposed_cells") == {"typed_cells", "slide_inputs", "score_checkpoint"}
    assert parents("decomposed_cells_by_sample") == {"decomposed_cells"}
    assert parents("enhanced_subspots") == {"slide_inputs", "segmented_slide", "typed_cells", "reference_data"}
    assert parents("sample_spatialdata") == {
        "slide_inputs",
        "segmented_slide",
        "typed_cells",
        "decomposed_cells_by_sample",
        "enhanced_subspots",
    }


def test_partitions_and_gpu_tags():
    g = _graph()
    dec = g.get(dg.AssetKey("decomposed_cells"))
    assert isinstance(dec.partitions_def, dg.MultiPartitionsDefinition)
    assert {d.name for d in dec.partitions_def.partitions_defs} == {"sample", "spot_range"}
    for name in ("segmented_slide", "score_checkpoint", "decomposed_cells", "enhanced_subspots"):
        a = defs.get_assets_def(name)
        tags = a.op.tags
        assert tags[GPU_TAG] == "gpu", name
        assert a.op.pool == "gpu"
        assert a.op.retry_policy is None  # transient faults only: retries.py
    for name in ("slide_inputs", "typed_cells", "reference_data"):
        assert defs.get_assets_def(name).op.tags[GPU_TAG] == "cpu"
    for name in EXPECTED:
        assert g.get(dg.AssetKey(name)).code_version, name


def test_checks_exist_and_block():
    specs = {(s.asset_key.to_user_string(), s.name): s for c in defs.asset_checks for s in c.check_specs}
    for asset in ("segmented_slide", "typed_cells", "score_checkpoint", "decomposed_cells", "enhanced_subspots"):
        assert any(a == asset for a, _ in specs), asset
    # every check blocks its downstream, except the freshness checks (warnings, evaluated by their sensor)
    assert all(s.blocking for (_, name), s in specs.items() if name != "freshness_check")
    assert {a for a, name in specs if name == "freshness_check"} == {
        "score_checkpoint",
        "typed_cells",
        "enhanced_subspots",
        "decomposed_cells_by_sample",
    }


def test_spot_range_arithmetic():
    assert n_ranges(254, 100) == 3 and n_ranges(0, 100) == 1 and n_ranges(100, 100) == 1
    assert range_bounds("0002", 100) == (200, 300)


def _project(tmp_path: Path, demo_small, **extra) -> Path:
    doc = {
        "storage_root": str(tmp_path / "store"),
        "partitions": {"spot_range_size": 10},
        "references": [{"name": "ref", "path": str(demo_small.reference), "cell_type_key": "cell_type"}],
        "samples": [
            {"name": "s1", "spatial": str(demo_small.slide), "image": str(demo_small.image), "reference": "ref"}
        ],
        **extra,
    }
    p = tmp_path / "dagster_project.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_register_partitions_adds_partitions(tmp_path, demo_small):
    cfg = load_config(_project(tmp_path, demo_small))
    inst = dg.DagsterInstance.ephemeral()
    out = register_partitions(inst, cfg)
    import anndata as ad

    n = ad.read_h5ad(demo_small.slide).n_obs
    assert out["samples"] == ["s1"] and out["references"] == ["ref"] and out["slices_groups"] == []
    assert inst.get_dynamic_partitions("spot_ranges") == [f"{i:04d}" for i in range(n_ranges(n, 10))]
    assert not any(register_partitions(inst, cfg).values())  # idempotent
    keys = sample_range_keys(cfg, "s1")
    assert len(keys) == n_ranges(n, 10) and keys[0].keys_by_dimension == {"sample": "s1", "spot_range": "0000"}


def test_landing_sensor_waits_for_complete_folder(tmp_path, demo_small):
    land = tmp_path / "landing"
    land.mkdir()
    p = _project(tmp_path, demo_small, landing={"path": str(land), "reference": "ref", "stable_ticks": 1})
    cfg = load_config(p)
    d = build_definitions(cfg)
    sensor = d.get_sensor_def("landing_folder_sensor")
    inst = dg.DagsterInstance.ephemeral()

    # a half-copied folder: data present, no marker, size still changing
    new = land / "newslide"
    new.mkdir()
    shutil.copy(demo_small.slide, new / "slide.h5ad")
    res = {"project": d.resources["project"]}
    ctx = dg.build_sensor_context(instance=inst, resources=res)
    r1 = sensor(ctx)
    assert isinstance(r1, dg.SkipReason)
    (new / "image.tif").write_bytes(Path(demo_small.image).read_bytes())  # copy goes on: size changes
    ctx = dg.build_sensor_context(instance=inst, cursor=ctx.cursor, resources=res)
    assert isinstance(sensor(ctx), dg.SkipReason)
    # size now stable for one tick -> marker written, sample registered with its spot ranges, run requested
    ctx = dg.build_sensor_context(instance=inst, cursor=ctx.cursor, resources=res)
    r3 = sensor(ctx)
    assert isinstance(r3, dg.SensorResult)
    assert [rr.partition_key for rr in r3.run_requests] == ["newslide"]
    added = {req.partitions_def_name: list(req.partition_keys) for req in r3.dynamic_partitions_requests}
    assert added["samples"] == ["newslide"] and added["spot_ranges"][0] == "0000"
    assert (new / "_READY").exists()
    s = cfg.sample("newslide")
    assert s.image == new / "image.tif" and s.reference == "ref"


def test_landing_marker_and_sample_yaml(tmp_path, demo_small):
    land = tmp_path / "landing"
    (land / "s2").mkdir(parents=True)
    shutil.copy(demo_small.slide, land / "s2" / "slide.h5ad")
    (land / "s2" / "sample.yaml").write_text("platform: square_grid\nparameters: {segmentation: {min_umi: 5}}\n")
    p = _project(tmp_path, demo_small, landing={"path": str(land), "reference": "ref", "stable_ticks": 50})
    cfg = load_config(p)
    assert [s.name for s in cfg.all_samples()] == ["s1"]  # no marker yet
    (land / "s2" / "_READY").write_text("")
    s2 = cfg.sample("s2")
    assert s2.platform == "square_grid" and cfg.parameters_for("s2").segmentation.min_umi == 5


def test_bad_landing_reference(tmp_path, demo_small):
    p = _project(tmp_path, demo_small, landing={"path": str(tmp_path), "reference": "nope"})
    with pytest.raises(ConfigError, match="key 'landing.reference': 'nope' is not a reference name"):
        load_config(p)


def test_cpu_fallback_warns():
    dev, warn = ComputeResource(devices=["cuda:0"]).device()
    import torch

    if torch.cuda.is_available():
        assert dev == "cuda:0" and warn is None
    else:
        assert dev == "cpu" and "no GPU available" in warn
