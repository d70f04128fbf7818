"""docs/tutorial.py (jupytext percent format) runs end to end through the notebook API and writes its figures."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_tutorial_runs_and_its_figures_are_not_blank(tmp_path):
    from PIL import Image

    env = {**os.environ, "SA_TUTORIAL_OUT": str(tmp_path), "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "docs" / "tutorial.py")], env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spot reconstruction error" in proc.stdout
    for name in ("cell_types", "decomposed_cells_spatial", "subspots_spatial", "spatialdata"):
        px = np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB"), dtype=float)
        assert px.std() > 10, name
    assert (tmp_path / "demo_spatialdata.zarr" / ".complete").exists()
