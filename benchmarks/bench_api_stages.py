"""Seconds per stage through the notebook API (sa.io / sa.seg / sa.tl) on the demo slide, on this machine's CPU.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_api_stages.py [--crop] [--soscope-epochs 50]

Prints one line per stage (wall seconds) and the size of the slide; the figures in docs/OWN_SLIDE.md come from it.
The score model is the analytic per-type Gaussian prior here (training the full score model: see
``generative.train_score_model``; its time is printed by the ``score_checkpoint`` asset).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import spatial_assets as sa
from spatial_assets.params import CellTypingParams, SegmentationParams, SoScopeParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crop", action="store_true", help="the 900 x 900 um window (~38 spots) instead of the whole demo")
    ap.add_argument("--soscope-epochs", type=int, default=50)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench_api_"))
    times = {}

    def timed(name, f):
        t0 = time.perf_counter()
        r = f()
        times[name] = time.perf_counter() - t0
        print(f"{name:<28s} {times[name]:8.1f} s", flush=True)
        return r

    crop = (0.0, 1200.0, 900.0, 2100.0) if args.crop else None
    demo = timed("build demo", lambda: sa.datasets.build_demo(out / "demo", seed=0, crop_um=crop))
    inputs = timed("io.load_slide", lambda: sa.io.load_slide(demo.slide, "visium", demo.image, name="demo"))
    ref = sa.io.load_reference(demo.reference, "cell_type")
    print(f"slide: {inputs.slide.n_obs} spots x {inputs.slide.n_vars} genes, image {inputs.image.shape}")
    seg = timed(
        "seg.segment_sample (StarDist)",
        lambda: sa.seg.segment_sample(
            inputs.slide, inputs.image, "visium", SegmentationParams(model="bundled:stardist_nuclei", min_umi=20)
        ),
    )
    print(f"cells: {len(seg.cells)}")
    typed = timed(
        "tl.cell_types (RCTD+Potts)",
        lambda: sa.tl.cell_types(
            inputs.slide,
            ref,
            "cell_type",
            seg,
            CellTypingParams(min_cells_per_type=5, sigma_fit_min_umi=50, small_types="drop"),
        ),
    )
    cells = timed("tl.decompose (Gaussian)", lambda: sa.tl.decompose(inputs.slide, typed, ref, "cell_type"))
    e = args.soscope_epochs
    sub = timed(
        f"tl.enhance ({e}+{e} epochs)",
        lambda: sa.tl.enhance(
            inputs.slide, SoScopeParams(epochs=e, vgae_epochs=e, image_features="none"), nuclei=seg.cells
        ),
    )
    timed(
        "io.write_spatialdata",
        lambda: sa.io.write_spatialdata(
            sa.io.to_spatialdata(
                inputs.slide,
                image=np.asarray(inputs.image),
                labels=np.asarray(seg.labels),
                cells=typed.cells,
                decomposed=cells,
                spot_weights=typed.spots,
                subspots=sub,
                sample="demo",
            ),
            out / "demo_sd.zarr",
        ),
    )


if __name__ == "__main__":
    main()
