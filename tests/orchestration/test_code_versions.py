"""Code versions follow the science each asset calls: editing a stage's module changes that asset's version only."""

import shutil

import dagster as dg

from spatial_assets.orchestration.code_versions import PACKAGE_ROOT, SCIENCE, code_version, source_hash
from spatial_assets.orchestration.config import load_config
from spatial_assets.orchestration.definitions import build_definitions
from tests.helpers import REPO


def _versions(root):
    return {asset: source_hash(paths, root, salt=asset) for asset, paths in SCIENCE.items()}


def test_editing_a_science_module_changes_its_assets_only(tmp_path):
    root = tmp_path / "spatial_assets"
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__", "data", "models"))
    before = _versions(root)
    assert before == {a: code_version(a) for a in SCIENCE}  # same source -> same versions
    with (root / "decomposition" / "_langevin.py").open("a") as f:  # comments do not count
        f.write("\n# a comment on the sampler\n")
    assert _versions(root) == before
    with (root / "decomposition" / "_langevin.py").open("a") as f:
        f.write("\n_A_CHANGE_TO_THE_SAMPLER = 1\n")
    after = _versions(root)
    changed = {a for a in SCIENCE if before[a] != after[a]}
    assert changed == {"decomposed_cells"}
    with (root / "segmentation" / "_nuclei.py").open("a") as f:
        f.write("\n_A_CHANGE_TO_SEGMENTATION = 1\n")
    again = _versions(root)
    assert {a for a in SCIENCE if after[a] != again[a]} == {"segmented_slide"}
    with (root / "params.py").open("a") as f:  # shared parameters: every asset
        f.write("\n_A_NEW_DEFAULT = 1\n")
    assert all(_versions(root)[a] != again[a] for a in SCIENCE)


def test_docstrings_do_not_change_versions(tmp_path):
    root = tmp_path / "spatial_assets"
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__", "data", "models"))
    before = _versions(root)
    f = root / "decomposition" / "_langevin.py"
    src = f.read_text()
    assert src.lstrip().startswith('"""')
    f.write_text('"""A rewritten module docstring."""\n' + src.split('"""', 2)[2])
    assert _versions(root) == before
    f.write_text(src.replace("def ", "def _renamed_helper_():\n    return 1\n\n\ndef ", 1))
    assert _versions(root)["decomposed_cells"] != before["decomposed_cells"]


def test_assets_carry_their_computed_code_version():
    defs = build_definitions(load_config(REPO / "dagster_project.yaml", check_files=False))
    graph = defs.resolve_asset_graph()
    for asset in SCIENCE:
        assert graph.get(dg.AssetKey(asset)).code_version == code_version(asset), asset
    assert len({code_version(a) for a in SCIENCE}) == len(SCIENCE)  # no two assets share a version
