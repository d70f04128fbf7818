"""``make demo``: materialize the whole asset graph on the bundled demo, offline, on CPU, into a persistent Dagster
instance (``work/dagster_home``) so the runs, lineage, partitions, checks and figures show in the Dagster UI.

    python -m spatial_assets.orchestration.demo_run [--config dagster_project.yaml]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def materialize_graph(cfg_path: Path, log=print) -> dict:
    """Materialize every asset of every reference and sample of a config, in dependency order, into the Dagster
    instance of ``$DAGSTER_HOME``. Returns the seconds per step. Raises SystemExit on the first failed step."""
    import dagster as dg

    from .config import load_config
    from .definitions import build_definitions
    from .partitions import register_partitions, sample_range_keys

    cfg = load_config(cfg_path)
    defs = build_definitions(cfg)
    instance = dg.DagsterInstance.get()
    reg = register_partitions(instance, cfg)
    log(f"[spatial_assets] registered partitions: {reg}")
    assets = list(defs.assets)
    checks = list(defs.asset_checks or [])
    resources = dict(defs.resources)
    timings: dict[str, float] = {}

    def run(selection: list[str], partition_key, label: str) -> None:
        t0 = time.time()
        res = dg.materialize(
            [*assets, *checks],
            selection=selection,
            partition_key=partition_key,
            resources=resources,
            instance=instance,
            raise_on_error=False,
            tags={"spatial_assets/launched_by": "make demo"},
        )
        timings[label] = round(time.time() - t0, 1)
        log(f"[spatial_assets] {label:<45s} {'ok' if res.success else 'FAILED'} ({timings[label]:.1f} s)")
        if not res.success:
            for ev in res.all_events:
                if ev.is_step_failure and ev.event_specific_data.error:
                    log(ev.event_specific_data.error.to_string())
            raise SystemExit(1)

    for r in cfg.references:
        run(["reference_data", "score_checkpoint"], r.name, f"reference {r.name}: data + score checkpoint")
    for s in cfg.samples:
        run(["slide_inputs", "segmented_slide", "typed_cells"], s.name, f"sample {s.name}: inputs, nuclei, types")
        for key in sample_range_keys(cfg, s.name):
            run(
                ["decomposed_cells"],
                key,
                f"sample {s.name}: decompose spot range {key.keys_by_dimension['spot_range']}",
            )
        run(["decomposed_cells_by_sample"], s.name, f"sample {s.name}: combine spot ranges")
        run(["enhanced_subspots"], s.name, f"sample {s.name}: soScope sub-spots")
    return timings


def build_demo_data(cfg_path: Path) -> None:
    """Build the demo slide the config's ``demo:`` section names, when it is missing (an explicit step: loading
    the config never builds data)."""
    import yaml

    from ..datasets import ensure_demo
    from .config import _resolve

    raw = yaml.safe_load(Path(cfg_path).read_text()) or {}
    demo = raw.get("demo") if isinstance(raw, dict) else None
    if demo:
        out = _resolve(Path(cfg_path).resolve().parent, Path(demo.get("out_dir", "work/demo")))
        ensure_demo(out, seed=int(demo.get("seed", 0)), crop_um=demo.get("crop_um"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="dagster_project.yaml")
    ap.add_argument("--dagster-home", default=None, help="default: <config folder>/work/dagster_home")
    args = ap.parse_args(argv)
    cfg_path = Path(args.config).resolve()
    os.environ["SPATIAL_ASSETS_CONFIG"] = str(cfg_path)
    home = Path(args.dagster_home or cfg_path.parent / "work" / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    t_all = time.time()
    print(f"[spatial_assets] config: {cfg_path}")
    build_demo_data(cfg_path)
    materialize_graph(cfg_path)
    from .config import load_config

    cfg = load_config(cfg_path)
    root = cfg.storage_root
    print(f"\n[spatial_assets] whole graph materialized in {time.time() - t_all:.0f} s. Outputs (zarr stores):")
    for p in sorted(root.glob("*")):
        print(f"  {p}")
    print(
        "\nRead them with plain anndata / zarr, e.g.\n"
        f"  python -c \"import anndata; print(anndata.read_zarr('{root}/decomposed_cells_by_sample/"
        f"{cfg.samples[0].name}.zarr'))\"\n"
        "Open the Dagster UI on these runs (lineage, partitions, checks, figures):\n"
        f"  SPATIAL_ASSETS_CONFIG={cfg_path} DAGSTER_HOME={home} \\\n"
        f"    dagster dev -w {cfg_path.parent}/workspace.yaml   # then http://127.0.0.1:3000\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
