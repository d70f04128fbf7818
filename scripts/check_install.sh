#!/usr/bin/env bash
# A non-editable install works: build the wheel, install it (no deps) into a throw-away venv that borrows the
# project venv's dependencies, and materialize a small graph (reference, slide, nuclei, types) from another folder,
# so nothing can be found through the repository: the demo data and the StarDist model come from the package.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY=${VENV_PY:-.venv/bin/python}
SITE=$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$VENV_PY" -m pip wheel -q --no-deps --no-build-isolation . -w "$TMP/wheel"
python3.11 -m venv --without-pip "$TMP/venv"
TSITE=$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$SITE" > "$TSITE/project-deps.pth"   # dependencies only: .pth files inside $SITE (the editable finder) are not run
"$VENV_PY" -m pip install -q --no-deps --target "$TSITE" "$TMP"/wheel/spatial_assets-*.whl
mkdir "$TMP/run" && cd "$TMP/run"
"$TMP/venv/bin/python" - <<'PY'
import os, sys
from pathlib import Path
import dagster as dg
import spatial_assets
assert spatial_assets.__file__.startswith(sys.prefix), f"{spatial_assets.__file__} is not the installed copy"
from spatial_assets.datasets import build_demo
from spatial_assets.orchestration.config import load_config
from spatial_assets.orchestration.definitions import build_definitions
from spatial_assets.orchestration.partitions import register_partitions

demo = build_demo(Path("demo"), seed=0, crop_um=(0.0, 1200.0, 700.0, 1900.0))
Path("project.yaml").write_text(f"""storage_root: store
references: [{{name: ref, path: {demo.reference}, cell_type_key: cell_class}}]
samples: [{{name: s, spatial: {demo.slide}, image: {demo.image}, reference: ref}}]
parameters:
  segmentation: {{model: "bundled:stardist_nuclei", channel: hematoxylin, min_umi: 20}}
  cell_typing: {{min_cells_per_type: 2, sigma_fit_min_umi: 50}}
""")
cfg = load_config("project.yaml")
defs = build_definitions(cfg)
inst = dg.DagsterInstance.ephemeral()
register_partitions(inst, cfg)
res = dict(defs.resources)  # every resource the definitions declare (project, compute, pipes client, ...)
assets = list(defs.assets)
ok = dg.materialize(assets, selection=["reference_data"], partition_key="ref", resources=res, instance=inst).success
for a in ("slide_inputs", "segmented_slide", "typed_cells"):
    ok &= dg.materialize(assets, selection=[a], partition_key="s", resources=res, instance=inst).success
import anndata as ad
cells = ad.read_zarr("store/typed_cells/s/cells.zarr")
print(f"non-editable install: {spatial_assets.__file__}; typed {cells.n_obs} cells from another folder: ok={ok}")
sys.exit(0 if ok and cells.n_obs > 10 else 1)
PY
