"""dagster_project.yaml validation: each bad case gives an error naming the file, the key and what was expected."""

from pathlib import Path

import pytest
import yaml

from spatial_assets.orchestration.config import ConfigError, load_config


def _write(tmp_path: Path, doc: dict) -> Path:
    (tmp_path / "slide.h5ad").write_bytes(b"x")
    (tmp_path / "ref.h5ad").write_bytes(b"x")
    (tmp_path / "he.tif").write_bytes(b"x")
    p = tmp_path / "dagster_project.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _good() -> dict:
    return {
        "storage_root": "store",
        "references": [{"name": "ctx", "path": "ref.h5ad", "cell_type_key": "cell_type"}],
        "samples": [
            {"name": "s1", "spatial": "slide.h5ad", "image": "he.tif", "platform": "visium", "reference": "ctx"}
        ],
        "parameters": {"segmentation": {"method": "watershed"}, "cell_typing": {"nu": 5}},
    }


def test_good_config_resolves_relative_paths_and_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, _good()))
    assert cfg.storage_root == (tmp_path / "store").resolve()
    assert cfg.samples[0].spatial == (tmp_path / "slide.h5ad").resolve()
    assert cfg.parameters.cell_typing.nu == 5
    # published defaults where the file is silent
    assert cfg.parameters.segmentation.prob_thresh == 0.2 and cfg.parameters.segmentation.nms_thresh == 0.1
    assert cfg.parameters.score_model.n_sigmas == 232 and cfg.parameters.score_model.sigma_begin == 100
    assert cfg.parameters.cell_typing.n_neighbors == 10
    assert cfg.partitions.spot_range_size == 500


def test_per_sample_parameter_overrides(tmp_path):
    doc = _good()
    doc["samples"][0]["parameters"] = {"segmentation": {"min_umi": 10}}
    cfg = load_config(_write(tmp_path, doc))
    assert cfg.parameters_for("s1").segmentation.min_umi == 10
    assert cfg.parameters_for("s1").segmentation.method == "watershed"  # global value kept
    assert cfg.parameters.segmentation.min_umi == 500


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.update(storge_root="x"), "key 'storge_root': unknown key"),
        (lambda d: d["samples"][0].update(platform="visum"), "key 'samples[0].platform'"),
        (lambda d: d["samples"][0].pop("spatial"), "key 'samples[0].spatial': required key is missing"),
        (lambda d: d["samples"][0].update(spatial="missing.h5ad"), "key 'samples[0].spatial': file not found"),
        (lambda d: d["samples"][0].update(reference="nope"), "'nope' is not a reference name"),
        (
            lambda d: d["samples"][0].pop("image"),
            "samples[0] (s1).image: platform 'visium' needs an H&E image (nuclei segmentation) and none is given",
        ),
        (lambda d: d["parameters"]["cell_typing"].update(nu="lots"), "key 'parameters.cell_typing.nu'"),
        (lambda d: d["parameters"]["segmentation"].update(prob_thresh=2), "key 'parameters.segmentation.prob_thresh'"),
        (
            lambda d: (
                d["partitions"].update(spot_range_size=0)
                if "partitions" in d
                else d.update(partitions={"spot_range_size": 0})
            ),
            "key 'partitions.spot_range_size'",
        ),
        (lambda d: d["samples"].append(dict(d["samples"][0])), "duplicate name"),
        (
            lambda d: d["samples"][0].update(parameters={"segmentation": {"methd": "x"}}),
            "key 'samples.s1.parameters.segmentation.methd': unknown key",
        ),
        (lambda d: d["references"][0].update(path="nowhere.h5ad"), "key 'references[0].path': file not found"),
    ],
)
def test_bad_config_messages(tmp_path, mutate, expected):
    doc = _good()
    mutate(doc)
    p = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg
    assert expected in msg, msg


def test_not_yaml_and_missing_file(tmp_path):
    p = tmp_path / "dagster_project.yaml"
    p.write_text("samples: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_repo_config_is_valid():
    """The shipped dagster_project.yaml (the demo deployment) validates."""
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "dagster_project.yaml", check_files=False)
    assert [s.name for s in cfg.samples] and cfg.references


def test_doublet_settings_reach_the_params(tmp_path):
    doc = _good()
    doc["references"][0]["class_key"] = "cell_class"
    doc["parameters"]["cell_typing"].update(doublet_threshold=3, doublet_confidence_threshold=1)
    cfg = load_config(_write(tmp_path, doc))
    assert cfg.reference("ctx").class_key == "cell_class"
    ct = cfg.parameters.cell_typing
    assert (ct.doublet_threshold, ct.doublet_confidence_threshold, ct.doublet_offset) == (3, 1, None)
    doc["parameters"]["cell_typing"]["doublet_threshold"] = -1
    with pytest.raises(ConfigError, match="key 'parameters.cell_typing.doublet_threshold'"):
        load_config(_write(tmp_path, doc))
