"""``make demo``: materialize the whole asset graph on the bundled demo, offline, on CPU, into a persistent Dagster
instance (``work/dagster_home``) so the runs, lineage, partitions, checks and figures show in the Dagster UI.

    python -m spatial_assets.orchestration.demo_run [--config dagster_project.yaml]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

PID_TAG = "spatial_assets/pid"
_SIGNALLED: list[int] = []  # the signals received while materializing (a run that then fails stops the graph)


GRACE_S = 10.0  # after SIGTERM / Ctrl-C, how long Dagster's own interrupt handling gets before a hard stop


def _fail_own_runs(message: str) -> None:
    """Report this process's unfinished runs failed (called just before a hard stop)."""
    try:
        import dagster as dg

        instance = dg.DagsterInstance.get()
        statuses = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]
        for run in instance.get_runs(filters=dg.RunsFilter(statuses=statuses, tags={PID_TAG: str(os.getpid())})):
            instance.report_run_failed(run, message=message)
    except Exception:  # the instance may be unusable mid-write; the next start marks the run failed then
        pass


@contextlib.contextmanager
def stop_on_sigterm(grace_s: float = GRACE_S):
    """Stop promptly on SIGTERM (a scheduler, a container runtime, ``timeout``) and Ctrl-C.

    Dagster maps SIGTERM to its interrupt while a run executes and raises it in the step, but a step with a retry
    policy is then retried and the run goes on. A signal-safe watcher (``signal.set_wakeup_fd``: the C handler
    writes the signal number whatever Python handler Dagster installed) records the signal: the next step
    boundary raises ``KeyboardInterrupt``, and if the run is still going after ``grace_s`` seconds (or on a second
    signal) its run is reported failed and the process exits with 128 + signal. A store being written is left as
    a temporary of a dead process: never read as complete, removed by the next writer.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt

    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    before_term = signal.signal(signal.SIGTERM, on_term)
    before_fd = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    done = threading.Event()

    def watch():
        while not done.is_set():
            try:
                data = os.read(rfd, 64)
            except OSError:
                return
            sigs = [b for b in data if b in (signal.SIGTERM, signal.SIGINT)]
            if not sigs or done.is_set():
                continue
            first = not _SIGNALLED
            _SIGNALLED.extend(sigs)
            if first:
                print(
                    f"[spatial_assets] signal {sigs[0]} received: stopping (hard stop in {grace_s:.0f} s)", flush=True
                )
                if done.wait(grace_s):
                    return
            _fail_own_runs(f"stopped by signal {_SIGNALLED[0]} (demo_run)")
            print("[spatial_assets] stopped: the step in flight was abandoned, its run marked failed", flush=True)
            os._exit(128 + _SIGNALLED[0])

    t = threading.Thread(target=watch, name="spatial_assets-signal-watch", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(before_fd)
        signal.signal(signal.SIGTERM, before_term)
        os.close(wfd)  # wakes the watcher's read with EOF
        t.join(timeout=1)
        os.close(rfd)


def mark_dead_runs_failed(instance, log=print) -> list[str]:
    """Runs left STARTING / STARTED by a process that no longer exists (kill -9, OOM, a lost machine) are
    reported failed, so the instance never shows them running for good. Returns their run ids.

    Runs launched by :func:`materialize_graph` carry their process id; others (launched by a daemon or the UI)
    are left to Dagster's run monitoring (``run_monitoring`` in ``dagster.yaml``)."""
    import dagster as dg

    from ..io._stores import _pid_alive

    dead = []
    for run in instance.get_runs(
        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING])
    ):
        pid = run.tags.get(PID_TAG, "")
        if pid.isdigit() and not _pid_alive(int(pid)):
            instance.report_run_failed(
                run, message=f"the process running it (pid {pid}) is gone; marked failed at start"
            )
            dead.append(run.run_id)
    if dead:
        log(f"[spatial_assets] marked {len(dead)} run(s) left STARTED by a dead process as failed: {dead}")
    return dead


def range_up_to_date(cfg, sample: str, range_key: str) -> bool:
    """A decomposed spot range is up to date: its store is complete, of the current partition scheme and code
    version, and newer than its inputs (slide, typed cells, score checkpoint)."""
    from .. import io as sio
    from .code_versions import code_version
    from .partitions import range_bounds
    from .stores import Stores

    st = Stores(cfg.storage_root)
    path = st.decomposed_range(sample, range_key)
    if not sio.is_complete(path):
        return False
    info = sio.read_attrs(path).get(sio.MARKER_ATTR, {}) or {}
    if list(info.get("spot_range", [])) != list(range_bounds(range_key, cfg.partitions.spot_range_size)):
        return False
    if info.get("code_version") != code_version("decomposed_cells"):
        return False
    ref = cfg.sample(sample).reference
    inputs = [st.slide(sample), st.typed(sample).folder, st.checkpoint(ref).folder]
    if not all(p.exists() for p in inputs):
        return False
    return path.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)


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
    mark_dead_runs_failed(instance, log)
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
            tags={"spatial_assets/launched_by": "make demo", PID_TAG: str(os.getpid())},
        )
        timings[label] = round(time.time() - t0, 1)
        log(f"[spatial_assets] {label:<45s} {'ok' if res.success else 'FAILED'} ({timings[label]:.1f} s)")
        if _SIGNALLED:
            raise KeyboardInterrupt
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
            if range_up_to_date(cfg, s.name, key.keys_by_dimension["spot_range"]):
                log(
                    f"[spatial_assets] sample {s.name}: spot range {key.keys_by_dimension['spot_range']} up to date, kept"
                )
                continue
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
    try:
        with stop_on_sigterm():
            materialize_graph(cfg_path)
    except KeyboardInterrupt:
        print("[spatial_assets] interrupted (SIGINT / SIGTERM): the step in flight was abandoned", flush=True)
        return 130
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
