"""Build a dataset with ground truth from the command line.

python -m spatial_assets.datasets demo OUT_DIR [--seed 0] [--um-per-px 0.8] [--crop-um X0 Y0 X1 Y1]
python -m spatial_assets.datasets realistic OUT_DIR [--seed 0] [--morphology by_type|uniform] [--crop-um ...]
"""

from __future__ import annotations

import argparse
import json

from . import build_demo, build_realistic_slide


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m spatial_assets.datasets", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="kind", required=True)
    for kind in ("demo", "realistic"):
        p = sub.add_parser(kind)
        p.add_argument("out_dir")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--um-per-px", type=float, default=0.8)
        p.add_argument("--crop-um", type=float, nargs=4, default=None)
        if kind == "realistic":
            p.add_argument("--morphology", choices=("by_type", "uniform"), default="by_type")
            p.add_argument("--cells-per-spot", type=float, default=6.5)
    a = ap.parse_args(argv)
    if a.kind == "demo":
        paths = build_demo(a.out_dir, seed=a.seed, crop_um=a.crop_um, um_per_px=a.um_per_px)
    else:
        paths = build_realistic_slide(
            a.out_dir,
            seed=a.seed,
            crop_um=a.crop_um,
            um_per_px=a.um_per_px,
            morphology=a.morphology,
            cells_per_spot=a.cells_per_spot,
        )
    print(json.dumps(json.loads(paths.info.read_text()), indent=2))


if __name__ == "__main__":
    main()
