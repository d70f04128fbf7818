"""Open a SpatialData zarr written by ``sa.io.write_spatialdata`` in napari-spatialdata, headless, and check it.

Builds the small demo (the 900 x 900 um window the io tests use, run through the notebook API as
``tests/io/conftest.py::api_run`` does), writes it with the project's own writer, reads it back with
``spatialdata.read_zarr``, opens it with ``napari_spatialdata.Interactive(sdata, headless=True)``, adds the H&E,
the nuclei labels and the cell circles (in the ``global``, micrometre, coordinate system), colours the cells by
``typed_cells.obs['cell_type']`` through napari-spatialdata's "View" widget, and takes a screenshot: it must not be
blank and the layers must exist. Prints one ``check_napari: OK ...`` / ``check_napari: FAIL ...`` line.

napari is not a dependency of the project; it lives in a side venv that sees the project venv's packages (see
docs/OWN_SLIDE.md, "Opening in napari"). Without a ``DISPLAY`` the script re-runs itself under ``xvfb-run``
(Debian's ``xvfb``) with Qt's ``xcb`` platform: ``QT_QPA_PLATFORM=offscreen`` alone gives napari no OpenGL
context, and offscreen with a display gives black canvas screenshots::

    OMP_NUM_THREADS=1 /tmp/napvenv/bin/python scripts/check_napari.py
    ... scripts/check_napari.py --zarr work/spatialdata/demo.zarr --sample demo   # an existing zarr
    ... scripts/check_napari.py --seg watershed --png /tmp/napari.png              # faster build; keep the PNG
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def build_demo_zarr(out: Path, seg_method: str = "stardist") -> Path:
    """The io tests' small demo through the notebook API, written by ``sa.io.write_spatialdata`` to ``out``."""
    import numpy as np

    import spatial_assets as sa
    from spatial_assets.params import CellTypingParams, SegmentationParams

    # same as tests/conftest.py (DEMO_CROP_UM) and tests/io/conftest.py (SEG, TYPING)
    demo = sa.datasets.build_demo(out.parent / "demo", seed=0, crop_um=(0.0, 1200.0, 900.0, 2100.0))
    if seg_method == "stardist":
        seg_params = SegmentationParams(method="stardist", model="bundled:stardist_nuclei", min_umi=20)
    else:
        seg_params = SegmentationParams(method="watershed", min_umi=20)
    typing = CellTypingParams(min_cells_per_type=5, sigma_fit_min_umi=50, small_types="drop")
    inputs = sa.io.load_slide(demo.slide, "visium", demo.image, name="demo")
    reference = sa.io.load_reference(demo.reference, "cell_type")
    seg = sa.seg.segment_sample(inputs.slide, inputs.image, "visium", seg_params)
    typed = sa.tl.cell_types(inputs.slide, reference, "cell_type", seg, typing)
    cells = sa.tl.decompose(inputs.slide, typed, reference, "cell_type")
    sdata = sa.io.to_spatialdata(
        inputs.slide,
        image=np.asarray(inputs.image),
        labels=np.asarray(seg.labels),
        cells=typed.cells,
        decomposed=cells,
        spot_weights=typed.spots,
        sample="demo",
    )
    return sa.io.write_spatialdata(sdata, out)


def _wait_for_load(app, timeout_s: float = 120.0) -> None:
    """napari-spatialdata loads an element in a QThread and adds its layer from the Qt event loop: pump it."""
    from qtpy.QtWidgets import QApplication

    worker = app._sdata_widget.worker_thread
    t0 = time.perf_counter()
    while worker.isRunning() and time.perf_counter() - t0 < timeout_s:
        QApplication.processEvents()
        time.sleep(0.02)
    for _ in range(20):  # deliver the worker's `returned` signal (add_layer) and the redraws
        QApplication.processEvents()
        time.sleep(0.01)


def _view_widget(viewer):
    from napari_spatialdata._view import QtAdataViewWidget

    for w in viewer.window.dock_widgets.values():
        if isinstance(w, QtAdataViewWidget):
            return w
    raise RuntimeError(f"napari-spatialdata's View widget is not docked (docks: {list(viewer.window.dock_widgets)})")


def check(zarr: Path, sample: str, png: Path | None = None, min_std: float = 5.0) -> str:
    import numpy as np
    import spatialdata as sd
    from napari_spatialdata import Interactive

    s = sd.read_zarr(zarr)
    image, labels = f"{sample}_he", f"{sample}_nuclei"
    missing = [n for n, have in [(image, s.images), (labels, s.labels), ("cells", s.shapes)] if n not in have]
    if missing or "typed_cells" not in s.tables:
        raise AssertionError(f"{zarr}: missing element(s) {missing} / table typed_cells; has {list(s)}")

    app = Interactive(s, headless=True)
    viewer = app._viewer
    for name in (image, labels, "cells"):
        app.add_element(name, "global")
        _wait_for_load(app)
    for name in (image, labels, "cells"):
        assert app.get_layer(name) is not None, f"layer {name} not added; layers: {[lay.name for lay in viewer.layers]}"

    # colour the cells by the table, the way a user does it: select the layer, pick the table and the obs column
    cells_layer = app.get_layer("cells")
    viewer.layers.selection.active = cells_layer
    view = _view_widget(viewer)
    view.table_name_widget.setCurrentText("typed_cells")
    obs_items = [view.obs_widget.item(i).text() for i in range(view.obs_widget.count())]
    assert "cell_type" in obs_items, f"typed_cells obs not offered for 'cells': {obs_items}"
    view.obs_widget._onAction(["cell_type"])
    n_colors = len(np.unique(np.round(np.asarray(cells_layer.face_color), 3), axis=0))
    n_types = s.tables["typed_cells"].obs["cell_type"].nunique()
    assert "cell_type" in cells_layer.features, f"cells layer features: {list(cells_layer.features)}"
    assert n_colors > 1, f"cells not coloured by cell_type: {n_colors} face colour(s) for {n_types} types"

    viewer.window._qt_window.resize(1600, 1000)
    viewer.reset_view()
    shot = np.asarray(viewer.screenshot(size=(800, 800), canvas_only=True, flash=False))
    if png is not None:
        from PIL import Image

        Image.fromarray(shot[..., :3]).save(png)
    rgb = shot[..., :3].astype(float)
    std = float(rgb.std())
    n_distinct = len(np.unique(rgb.reshape(-1, 3).round(-1), axis=0))
    assert std > min_std and n_distinct > 20, f"screenshot looks blank: std {std:.1f}, {n_distinct} colours"
    layers = [lay.name for lay in viewer.layers]
    viewer.close()
    return (
        f"{zarr.name}: layers {layers}, cells coloured by typed_cells.cell_type ({n_types} types, {n_colors} colours), "
        f"screenshot {shot.shape[1]}x{shot.shape[0]} std {std:.1f} ({n_distinct} colours)"
    )


def _versions() -> str:
    from importlib.metadata import version

    import qtpy
    from qtpy.QtCore import __version__ as qt_version

    pkgs = ("napari", "napari-spatialdata", "spatialdata", "vispy")
    plat = os.environ.get("QT_QPA_PLATFORM", "")
    return ", ".join(f"{p} {version(p)}" for p in pkgs) + f", {qtpy.API_NAME} (Qt {qt_version}, {plat})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zarr", type=Path, help="an existing SpatialData zarr (default: build the small demo one)")
    p.add_argument("--sample", default="demo", help="image / labels prefix (<sample>_he, <sample>_nuclei)")
    p.add_argument("--seg", choices=("stardist", "watershed"), default="stardist", help="segmentation of the build")
    p.add_argument("--out", type=Path, help="write the built zarr here (kept) instead of a temporary folder")
    p.add_argument("--png", type=Path, help="save the screenshot here")
    p.add_argument("--build-only", action="store_true", help="only build and write the zarr (to --out); no napari")
    p.add_argument("--no-xvfb", action="store_true", help="do not re-run under xvfb-run when DISPLAY is unset")
    a = p.parse_args(argv)
    # napari draws with OpenGL: Qt's 'offscreen' platform alone has no GL context (vispy fails on
    # glGetParameter), and with a DISPLAY its canvas screenshots come back black. A virtual X server (Xvfb, Mesa's
    # llvmpipe) with the 'xcb' platform renders properly: re-run under xvfb-run when there is no display.
    if a.build_only:
        if a.out is None:
            p.error("--build-only needs --out")
        print(build_demo_zarr(a.out, a.seg))
        return 0
    if not os.environ.get("DISPLAY") and not a.no_xvfb and shutil.which("xvfb-run"):
        args = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
        os.execvp("xvfb-run", ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", *args])
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb" if os.environ.get("DISPLAY") else "offscreen")
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="check_napari_") as tmp:
            if a.zarr is not None:
                zarr = a.zarr
            else:
                # in a child process: TensorFlow (StarDist) and Qt / OpenGL in one process segfaulted here
                zarr = a.out or Path(tmp) / "demo.zarr"
                cmd = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--build-only",
                    "--out",
                    str(zarr),
                    "--seg",
                    a.seg,
                ]
                subprocess.run(cmd, check=True, env={k: v for k, v in os.environ.items() if k != "DISPLAY"})
            t_build = time.perf_counter() - t0
            msg = check(zarr, a.sample, a.png)
    except Exception as e:  # one line, whatever failed
        print(f"check_napari: FAIL {type(e).__name__}: {e}")
        return 1
    print(f"check_napari: OK {msg}; {_versions()}; build {t_build:.0f} s, total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
