"""``make demo``: materialize the whole asset graph on the bundled demo, offline, on CPU, into a persistent Dagster
instance (``work/dagster_home``) so the runs, lineage, partitions, checks and figures show in the Dagster UI.

    python -m spatial_assets.orchestration.demo_run [--config dagster_project.yaml] [--force] [--verbose]

One line per stage (a stage is one run of a named job on one partition), failed checks with their reasons, then
a table of the stages, the accuracy against the demo's truth and where the outputs are. Stages whose assets are
up to date (current code version, materialized after their inputs) are skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

RUN_TAGS = {"spatial_assets/launched_by": "make demo"}
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


def _stages(cfg) -> list[tuple[str, str, object]]:
    """``(label, job name, partition key)`` of every stage of the graph, in dependency order."""
    from .partitions import sample_range_keys

    out = [(f"reference {r.name}: data + score checkpoint", "reference_job", r.name) for r in cfg.references]
    for s in cfg.samples:
        what = "inputs, nuclei, types, soScope" if s.platform.subspots else "inputs, nuclei, bins -> cells, types"
        out.append((f"sample {s.name}: {what}", "sample_job", s.name))
        for key in sample_range_keys(cfg, s.name):
            out.append(
                (
                    f"sample {s.name}: decompose spot range {key.keys_by_dimension['spot_range']}",
                    "decomposition_job",
                    key,
                )
            )
        out.append((f"sample {s.name}: combine spot ranges, SpatialData", "combine_job", s.name))
    return out


def failed_check_lines(instance, run_id: str) -> list[str]:
    """``asset[partition] check: description`` of every failed asset check of a run (the reason, not a count)."""
    import dagster as dg

    lines = []
    for rec in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records:
        ev = rec.event_log_entry.dagster_event.event_specific_data
        if not ev.passed:
            where = ev.asset_key.to_user_string() + (f"[{ev.partition}]" if ev.partition else "")
            lines.append(f"{where} {ev.check_name}: {ev.description or 'failed (no description)'}")
    return lines


CONSOLE_LOG_LEVEL = "WARNING"  # the console without --verbose: the step log's warnings and errors
# library warnings that say nothing about this run's results (see quiet_library_warnings)
QUIET_WARNINGS = (
    # anndata's zarr v3 writer, on every array it writes: the stores are written with explicit chunks
    ("zarr v3 autosharding will be the default", UserWarning),
    ("Automatic shard shape inference is experimental", UserWarning),
    # zarr, on every consolidated group (anndata / spatialdata stores): read back by the same libraries
    ("Consolidated metadata is currently not part in the Zarr format 3 specification", UserWarning),
)


def console_run_config(verbose: bool = False) -> dict:
    """Run config of Dagster's console logger: every event at DEBUG with ``verbose``, else warnings and errors.

    Only the console is filtered: the run's events (step starts, outputs, the steps' ``context.log.info`` progress
    and detail lines) are all written to the instance's event log whatever the console's level.

    Parameters
    ----------
    verbose
        Every event on the console.

    Returns
    -------
    dict
        ``{"loggers": {"console": {"config": {"log_level": ...}}}}``.
    """
    return {"loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else CONSOLE_LOG_LEVEL}}}}


@contextlib.contextmanager
def quiet_library_warnings(verbose: bool = False):
    """Inside the block, hide the library warnings of :data:`QUIET_WARNINGS` and TensorFlow's (unless ``verbose``);
    the process's warning filters are restored after it.

    Parameters
    ----------
    verbose
        Let every warning through.
    """
    import warnings

    with warnings.catch_warnings():
        if not verbose:
            for message, category in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            warnings.filterwarnings("ignore", module="tensorflow")
        yield


def materialize_graph(
    cfg_path: Path, log=print, *, force: bool = False, verbose: bool = False, stages_out: list | None = None
) -> dict:
    """Materialize every asset of every reference and sample of a config, in dependency order, through the named
    jobs (``reference_job``, ``sample_job``, ``decomposition_job``, ``combine_job``) into the Dagster instance of
    ``$DAGSTER_HOME``.

    Parameters
    ----------
    cfg_path
        The project config.
    log
        Where the one line per stage goes.
    force
        Re-materialize every stage; else a stage whose partitions are up to date (materialized with the current
        code version, after their inputs) is skipped, and only its missing or stale assets run.
    verbose
        Dagster's console log at DEBUG (every event) and every library warning; else the console shows only
        the step log's warnings and errors (:func:`console_run_config`, :func:`quiet_library_warnings`). The
        instance records every event either way (the UI and ``dagster`` CLI show the full step log).
    stages_out
        If given, receives one dict per stage (label, job, partition, status, seconds, run id).

    Returns
    -------
    dict
        Seconds per stage label (0 for a skipped stage).

    Raises
    ------
    SystemExit
        On the first failed stage, after logging the failed step's own error and the failed checks' reasons.
    """
    import dagster as dg

    from .config import load_config
    from .definitions import build_definitions
    from .partitions import register_partitions
    from .retries import user_error_message
    from .schedules import asset_applies, outdated_partitions

    cfg = load_config(cfg_path)
    defs = build_definitions(cfg)
    repo = defs.get_repository_def()
    instance = dg.DagsterInstance.get()
    mark_dead_runs_failed(instance, log)
    reg = register_partitions(instance, cfg)
    if any(reg.values()):
        log(f"[spatial_assets] registered partitions: { {k: v for k, v in reg.items() if v} }")
    run_config = console_run_config(verbose)
    from .preflight import accuracy_warnings

    for s in cfg.samples:
        for w in accuracy_warnings(cfg.parameters_for(s.name), f"samples.{s.name}.parameters"):
            log(f"[spatial_assets] WARNING {w}")
    timings: dict[str, float] = {}
    with quiet_library_warnings(verbose):
        for label, job_name, pk in _stages(cfg):
            key = str(pk)
            selection = None
            job_assets = repo.get_job(job_name).asset_layer.executable_asset_keys
            if not force:
                outdated, _ = outdated_partitions(instance, repo, cfg, job_name)
                # a decomposed range whose store is current (code, partition scheme, inputs) is kept as well
                kept = job_name == "decomposition_job" and range_up_to_date(
                    cfg, pk.keys_by_dimension["sample"], pk.keys_by_dimension["spot_range"]
                )
                if key not in outdated or kept:
                    timings[label] = 0.0
                    log(f"[spatial_assets] {label:<52s} up to date (skipped; --force re-runs it)")
                    if stages_out is not None:
                        stages_out.append({"stage": label, "job": job_name, "partition": key, "status": "up to date"})
                    continue
                first = {dg.AssetKey(o.asset) for o in outdated[key]}
                # the outdated assets and what depends on them inside the job
                selection = sorted(
                    first | {c for f in first for c in _descendants(repo.asset_graph, f) if c in job_assets},
                    key=lambda k: k.to_user_string(),
                )
            if not all(asset_applies(cfg, k.to_user_string(), key) for k in job_assets):  # e.g. Visium HD: no sub-spots
                selection = sorted(
                    (k for k in (selection or job_assets) if asset_applies(cfg, k.to_user_string(), key)),
                    key=lambda k: k.to_user_string(),
                )
            job = defs.resolve_job_def(job_name)
            t0 = time.time()
            res = job.execute_in_process(
                run_config=run_config,
                partition_key=key,
                instance=instance,
                asset_selection=selection,
                raise_on_error=False,
                tags={**RUN_TAGS, PID_TAG: str(os.getpid())},
            )
            timings[label] = round(time.time() - t0, 1)
            checks = failed_check_lines(instance, res.run_id)
            status = "ok" if res.success and not checks else ("checks failed" if res.success else "FAILED")
            log(f"[spatial_assets] {label:<52s} {status} ({timings[label]:.1f} s, run {res.run_id[:8]} of {job_name})")
            for line in checks:
                log(f"    failed check {line}")
            if stages_out is not None:
                stages_out.append(
                    {"stage": label, "job": job_name, "partition": key, "status": status, "seconds": timings[label]}
                )
            if _SIGNALLED:
                raise KeyboardInterrupt
            if not res.success:
                for ev in res.all_events:
                    if ev.is_step_failure and ev.event_specific_data.error:
                        log(f"    step {ev.step_key}: {user_error_message(ev.event_specific_data.error)}")
                raise SystemExit(1)

    return timings


def _descendants(graph, key) -> set:
    out, todo = set(), [key]
    while todo:
        for c in graph.get(todo.pop()).child_keys:
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


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


def _dense(x):
    """A dense float64 numpy copy of a (sparse or dense) matrix."""
    import numpy as np

    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def _median_row_r(a, b) -> float:
    """Median over rows of the Pearson r of matching rows of two arrays (log1p scale is the caller's)."""
    import numpy as np

    from ..metrics import pearson_columns

    return float(np.nanmedian(pearson_columns(a.T, b.T)))


def demo_accuracy(cfg, truth_dir: Path | None = None) -> dict[str, dict[str, str]]:
    """Accuracy of the outputs against the demo's ground truth, per sample, each beside its same-input baseline.

    - ``nuclei``: true in-spot cells matched by a segmented cell within 4 um;
    - ``cell types``: accuracy of the typed cells beside each spot's top type given to all its cells (the
      typing's ``initial_type``) and the slide's majority type (:func:`celltyping.evaluate_typing`);
    - ``decomposed cells``: median per-cell r (over genes, log1p) beside the proportional split of each spot by
      its cells' types (:func:`decomposition.baseline_type_mean` with ``per_gene=True``, the checkpoint's type
      means);
    - ``sub-spots``: median per-gene r (over sub-spots, log1p) of soScope's sub-spots beside the nuclei split it
      starts from (``layers['prior_split']``).

    Parameters
    ----------
    cfg
        The loaded project config.
    truth_dir
        The folder of ``truth_cells.h5ad`` / ``truth_subspots.h5ad``; default the config's ``demo.out_dir``.

    Returns
    -------
    dict
        ``{sample: {measure: text}}``; empty when there is no demo truth.
    """
    import anndata as ad
    import numpy as np
    import pandas as pd
    from scipy.spatial import cKDTree

    from .. import generative
    from .. import io as sio
    from ..celltyping import evaluate_typing
    from ..decomposition import baseline_type_mean, prepare_spots
    from ..metrics import pearson_columns
    from .stores import Stores

    if truth_dir is None and cfg.demo is not None:
        truth_dir = cfg.demo.out_dir
    if truth_dir is None or not (Path(truth_dir) / "truth_cells.h5ad").exists():
        return {}
    truth_dir = Path(truth_dir)
    truth = ad.read_h5ad(truth_dir / "truth_cells.h5ad")
    t_in = truth[truth.obs["spot"].astype(str).to_numpy() != ""]
    st = Stores(cfg.storage_root)
    out: dict[str, dict[str, str]] = {}
    for s in cfg.samples:
        dec_path, typed = st.decomposed(s.name), st.typed(s.name)
        if not (sio.is_complete(dec_path) and sio.is_complete(typed.cells)):
            continue
        ref = cfg.reference(s.reference)
        dec = ad.read_zarr(dec_path)
        cells = sio.read_dataframe(typed.cells)
        d, i = cKDTree(t_in.obs[["x", "y"]].to_numpy()).query(dec.obs[["x", "y"]].to_numpy())
        ok = d < 4.0
        row: dict[str, str] = {"nuclei": f"{len(set(i[ok])) / max(t_in.n_obs, 1):.0%} of true cells found"}
        key = ref.cell_type_key
        ids = dec.obs_names[ok]
        if key in t_in.obs:
            true_cells = pd.DataFrame(
                {
                    "spot": t_in.obs["spot"].astype(str).to_numpy()[i[ok]],
                    key: t_in.obs[key].astype(str).to_numpy()[i[ok]],
                },
                index=ids,
            )
            ev = evaluate_typing(
                cells.loc[ids], true_cells, key, label_columns={"final": "cell_type", "top_type": "initial_type"}
            )
            top = f"{ev['top_type.accuracy']:.2f}" if "top_type.accuracy" in ev else "n/a"
            row["cell types"] = (
                f"accuracy {ev['final.accuracy']:.2f} (each spot's top type {top}; majority type "
                f"{ev['majority_rate']:.2f})"
            )
            genes = [g for g in dec.var_names if g in set(t_in.var_names)]
            T = np.log1p(_dense(t_in[:, genes].X)[i[ok]])
            D = np.log1p(_dense(dec[:, genes].X)[ok])
            text = f"per-cell r {_median_row_r(D, T):.2f}"
            ckpt = st.checkpoint(ref.name).folder
            if sio.is_complete(ckpt) and sio.is_complete(typed.platform_effect):
                model = generative.ScoreModel.load(ckpt)
                pe = sio.read_dataframe(typed.platform_effect)["estimated_be"]
                inp = prepare_spots(sio.read_anndata(st.slide(s.name)), cells, model, pe)
                split = baseline_type_mean(inp, model, per_gene=True)
                rows, cols = inp.cells.index.get_indexer(ids), pd.Index(inp.genes).get_indexer(genes)
                have = rows >= 0
                if have.any() and (cols >= 0).all():
                    B = np.log1p(np.maximum(split[rows[have]][:, cols], 0))
                    text += (
                        f" (proportional split by cell types {_median_row_r(B, T[have]):.2f}; "
                        f"same cells: {_median_row_r(D[have], T[have]):.2f})"
                        if not have.all()
                        else f" (proportional split by cell types {_median_row_r(B, T):.2f})"
                    )
            row["decomposed cells"] = text
        sub_path = st.subspots(s.name)
        if sio.is_complete(sub_path) and (truth_dir / "truth_subspots.h5ad").exists():
            sub = ad.read_zarr(sub_path)
            tsub = ad.read_h5ad(truth_dir / "truth_subspots.h5ad")
            ts_xy = tsub.obs[["x", "y"]].to_numpy(float)
            dd, j = cKDTree(ts_xy).query(sub.obs[["x", "y"]].to_numpy(float))
            pitch = float(np.median(cKDTree(ts_xy).query(ts_xy, k=2)[0][:, 1]))
            genes = [g for g in sub.var_names if g in set(tsub.var_names)]
            m = dd < 0.25 * pitch
            if m.sum() >= 0.9 * sub.n_obs and genes and "prior_split" in sub.layers:
                Ts = np.log1p(_dense(tsub[:, genes].X)[j[m]])

                def gene_r(x, truth):
                    return float(np.nanmedian(pearson_columns(np.log1p(np.maximum(x, 0)), truth)))

                gi = sub.var_names.get_indexer(genes)
                est, prior = _dense(sub.X)[m][:, gi], _dense(sub.layers["prior_split"])[m][:, gi]
                prior_name = str((sub.uns.get("soscope") or {}).get("prior", "the split it starts from"))
                row["sub-spots"] = f"per-gene r {gene_r(est, Ts):.2f} ({prior_name} {gene_r(prior, Ts):.2f})"
        out[s.name] = row
    return out


def ensure_instance_config(home: Path) -> Path:
    """Create the Dagster instance folder ``home`` with its ``dagster.yaml`` when missing: telemetry off (and so
    no telemetry notice on the console), run retries only for runs that did not fail in an op (a crashed or lost
    step process; see retries.py). An existing ``dagster.yaml`` is left as it is.

    Parameters
    ----------
    home
        The ``$DAGSTER_HOME`` folder.

    Returns
    -------
    pathlib.Path
        The ``dagster.yaml`` path.
    """
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    if not path.exists():
        path.write_text(
            "telemetry:\n  enabled: false\n"
            "run_retries:\n  enabled: true\n  max_retries: 2\n  retry_on_asset_or_op_failure: false\n"
        )
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="dagster_project.yaml")
    ap.add_argument("--dagster-home", default=None, help="default: <config folder>/work/dagster_home")
    ap.add_argument("--force", action="store_true", help="re-materialize stages that are up to date")
    ap.add_argument("--verbose", action="store_true", help="every Dagster event and library warning")
    args = ap.parse_args(argv)
    cfg_path = Path(args.config).resolve()
    os.environ["SPATIAL_ASSETS_CONFIG"] = str(cfg_path)
    home = Path(args.dagster_home or cfg_path.parent / "work" / "dagster_home").resolve()
    ensure_instance_config(home)
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    t_all = time.time()
    print(f"[spatial_assets] config: {cfg_path}")
    with quiet_library_warnings(args.verbose):
        build_demo_data(cfg_path)
    stages: list[dict] = []
    try:
        with stop_on_sigterm():
            materialize_graph(cfg_path, force=args.force, verbose=args.verbose, stages_out=stages)
    except KeyboardInterrupt:
        print("[spatial_assets] interrupted (SIGINT / SIGTERM): the step in flight was abandoned", flush=True)
        return 130
    from .config import load_config

    cfg = load_config(cfg_path)
    root = cfg.storage_root
    print(f"\n[spatial_assets] whole graph in {time.time() - t_all:.0f} s\n")
    print(f"{'stage':<52s} {'status':<14s} {'seconds':>8s}")
    for st in stages:
        print(f"{st['stage']:<52s} {st['status']:<14s} {st.get('seconds', 0.0):>8.1f}")
    try:
        with quiet_library_warnings(args.verbose):
            acc = demo_accuracy(cfg)
    except Exception as e:
        acc = {}
        print(f"(accuracy against the demo truth not computed: {type(e).__name__}: {e})")
    for sample, row in acc.items():
        print(f"\naccuracy against the demo truth, sample {sample} (same-input baselines in brackets):")
        for k, v in row.items():
            print(f"  {k:<18s} {v}")
    print("\noutputs (zarr stores, plain anndata / zarr):")
    for p in sorted(root.glob("*")):
        print(f"  {p}")
    print(
        "\nOpen the Dagster UI on these runs (lineage, partitions, checks, figures): make ui\n"
        f"  (SPATIAL_ASSETS_CONFIG={cfg_path} DAGSTER_HOME={home} dagster dev -w {cfg_path.parent}/workspace.yaml)\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
