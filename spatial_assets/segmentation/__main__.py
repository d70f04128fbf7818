"""Train the bundled StarDist nuclei model (seeded), from the repository root.

python -m spatial_assets.segmentation train [--out spatial_assets/segmentation/models/stardist_nuclei]
    [--seed 0] [--epochs 60] [--steps-per-epoch 50] [--threads 2] [--data data/stardist-test-images]
python -m spatial_assets.segmentation train-he [--out spatial_assets/segmentation/models/stardist_he]
    [--seed 0] [--epochs 40] [--steps-per-epoch 50] [--threads 2] [--realistic DIR (a built realistic slide)]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._training import DEFAULT_DATA, train


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m spatial_assets.segmentation", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the bundled StarDist model")
    t.add_argument("--out", default=str(Path("spatial_assets") / "segmentation" / "models" / "stardist_nuclei"))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=60)
    t.add_argument("--steps-per-epoch", type=int, default=50)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--data", default=str(DEFAULT_DATA))
    h = sub.add_parser("train-he", help="train the bundled RGB H&E StarDist model")
    h.add_argument("--out", default=str(Path("spatial_assets") / "segmentation" / "models" / "stardist_he"))
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--epochs", type=int, default=40)
    h.add_argument("--steps-per-epoch", type=int, default=50)
    h.add_argument("--threads", type=int, default=2)
    h.add_argument("--data", default=str(DEFAULT_DATA))
    h.add_argument("--realistic", default=None, help="folder of a built realistic slide (seed 0)")
    a = ap.parse_args(argv)
    if a.command == "train-he":
        from ._he_training import train_he

        info = train_he(
            a.out,
            seed=a.seed,
            epochs=a.epochs,
            steps_per_epoch=a.steps_per_epoch,
            threads=a.threads,
            data_dir=a.data,
            realistic_dir=a.realistic,
        )
    else:
        info = train(
            a.out, seed=a.seed, epochs=a.epochs, steps_per_epoch=a.steps_per_epoch, threads=a.threads, data_dir=a.data
        )
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
