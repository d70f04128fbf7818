"""The notebook API: `import spatial_assets as sa` is cheap (no dagster, torch, scanpy, spatialdata), and the
namespaces sa.io / sa.seg / sa.tl / sa.pl load on first use."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def _run(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO)}
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_cheap_and_never_imports_dagster():
    r = _run(
        "import sys, json, spatial_assets as sa; "
        "print(json.dumps({m: m in sys.modules for m in ('dagster', 'torch', 'scanpy', 'spatialdata', 'tensorflow')}))"
    )
    assert r == {"dagster": False, "torch": False, "scanpy": False, "spatialdata": False, "tensorflow": False}


def test_namespaces_load_lazily_and_name_the_stage_functions():
    r = _run(
        "import sys, json, spatial_assets as sa; "
        "ok = {'tl': [f for f in ('cell_types', 'decompose', 'enhance') if callable(getattr(sa.tl, f))], "
        "'io': callable(sa.io.to_spatialdata) and callable(sa.io.read_visium), "
        "'seg': sa.seg is sa.segmentation and callable(sa.seg.segment_sample), "
        "'pl': callable(sa.pl.cell_types), 'dagster': 'dagster' in sys.modules, "
        "'dir': [n for n in ('io', 'seg', 'tl', 'pl') if n in dir(sa)]}; print(json.dumps(ok))"
    )
    assert r == {
        "tl": ["cell_types", "decompose", "enhance"],
        "io": True,
        "seg": True,
        "pl": True,
        "dagster": False,
        "dir": ["io", "seg", "tl", "pl"],
    }
    err = subprocess.run(
        [sys.executable, "-c", "import spatial_assets as sa; sa.nope"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO)},
    )
    assert "module 'spatial_assets' has no attribute 'nope'" in err.stderr
