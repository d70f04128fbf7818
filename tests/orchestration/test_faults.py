"""Faults: processes killed mid-write (kill -9), two concurrent writers, a changed partition size, names that try
to escape storage_root, SIGTERM during a run, runs left STARTED by a dead process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from spatial_assets import io as sio
from spatial_assets.decomposition import combine_ranges
from spatial_assets.orchestration.config import ConfigError, load_config
from spatial_assets.orchestration.partitions import n_ranges, range_bounds, range_key
from spatial_assets.orchestration.stores import Stores

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _adata(n: int = 6, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    a = ad.AnnData(rng.poisson(2, (n, 4)).astype(np.float32))
    a.obs_names = [f"c{seed}_{i}" for i in range(n)]
    return a


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=ENV, cwd=REPO)


def _wait_for(pred, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


# --- kill -9 mid-write ------------------------------------------------------------------------------------------
def test_kill9_mid_store_write_leaves_old_store_and_tmp_is_never_complete(tmp_path):
    path = tmp_path / "s.zarr"
    sio.write_anndata(_adata(seed=1), path)
    flag = tmp_path / "inside"
    proc = _spawn(
        f"""
        import time
        from pathlib import Path
        import anndata as ad, numpy as np
        from spatial_assets import io as sio
        a = ad.AnnData(np.ones((3, 4), np.float32))
        with sio.atomic_path(Path({str(path)!r})) as tmp:
            a.write_zarr(tmp)
            sio._stores._mark(tmp)  # the temporary is whole and marked: only the rename is left
            Path({str(flag)!r}).write_text("x")
            time.sleep(60)
        """
    )
    _wait_for(flag.exists)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = _hidden(tmp_path)
    assert len(left) == 1 and ".tmp-" in left[0].name
    assert not sio.is_complete(left[0])  # a dead writer's temporary never counts as a store
    assert sio.read_anndata(path).n_obs == 6  # the old store is intact
    sio.write_anndata(_adata(seed=2, n=5), path)  # the next write cleans the dead writer's temporary
    assert _hidden(tmp_path) == []
    assert sio.read_anndata(path).n_obs == 5


def test_live_writers_temporary_is_not_removed(tmp_path):
    path = tmp_path / "s.zarr"
    with sio.atomic_path(path) as tmp:
        tmp.mkdir()
        sio.write_anndata(_adata(seed=3), path)  # a second write while ours is in flight (same live pid)
        assert tmp.exists()
        _adata(seed=4, n=2).write_zarr(tmp / "x.zarr")
    assert path.exists() and _hidden(tmp_path) == []


def test_kill9_mid_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    from spatial_assets.generative import ScoreModel  # noqa: F401  (the loader the consumer uses)

    folder = tmp_path / "score_checkpoint" / "ref"
    sio.write_directory(folder, lambda d: (d / "model.safetensors").write_text("old"))
    flag = tmp_path / "inside"
    proc = _spawn(
        f"""
        import time
        from pathlib import Path
        from spatial_assets import io as sio
        def writer(d):
            (d / "model.safetensors").write_text("new, half-trained")
            Path({str(flag)!r}).write_text("x")
            time.sleep(60)
        sio.write_directory(Path({str(folder)!r}), writer)
        """
    )
    _wait_for(flag.exists)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sio.is_complete(folder)
    assert (folder / "model.safetensors").read_text() == "old"
    left = _hidden(folder.parent)
    assert len(left) == 1 and not sio.is_complete(left[0]) and not (left[0] / ".complete").exists()


# --- two concurrent writers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rounds", [6])
def test_two_concurrent_writers_leave_exactly_one_complete_store(tmp_path, rounds):
    path = tmp_path / "s.zarr"
    code = f"""
        import sys
        from pathlib import Path
        import anndata as ad, numpy as np
        from spatial_assets import io as sio
        n = int(sys.argv[1])
        for i in range({rounds}):
            sio.write_anndata(ad.AnnData(np.full((n, 3), n, np.float32)), Path({str(path)!r}))
        """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(n)], env=ENV, cwd=REPO) for n in (2, 3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert sio.is_complete(path)
    a = sio.read_anndata(path)
    assert a.n_obs in (2, 3) and float(np.asarray(a.X).max()) == a.n_obs  # one writer's whole store, not a mix
    assert [p for p in _hidden(tmp_path) if sio.is_complete(p)] == []
    assert _hidden(tmp_path) == []


# --- changed partition size -------------------------------------------------------------------------------------
def _range_store(folder: Path, key: str, start: int, stop: int, spots: list[str]) -> None:
    cells = [f"cell_{s}_{j}" for s in spots for j in range(2)]
    a = ad.AnnData(np.ones((len(cells), 3), np.float32))
    a.obs_names = cells
    a.obs["spot"] = [c.split("_")[1] for c in cells]
    sio.write_anndata(a, folder / f"{key}.zarr", info={"spot_range": [start, stop]})


def test_changed_partition_size_reads_only_the_current_ranges(tmp_path):
    spots = [f"s{i:02d}" for i in range(12)]
    slide = ad.AnnData(np.ones((12, 3), np.float32))
    slide.obs_names = spots
    folder = tmp_path / "decomposed_cells" / "x"
    for size in (6, 4):  # first run with 6 spots per range, then rerun with 4: both schemes' stores on disk
        for i in range(n_ranges(12, size)):
            a, b = range_bounds(range_key(i), size)
            _range_store(folder, range_key(i), a, b, spots[a:b])
    expected = {range_key(i): range_bounds(range_key(i), 4) for i in range(n_ranges(12, 4))}
    current, stale = sio.current_range_stores(folder, expected)
    assert sorted(current) == ["0000", "0001", "0002"] and stale == []  # 0000/0001 overwritten by the new scheme
    combined = combine_ranges({k: sio.read_anndata(p) for k, p in current.items()}, expected_ranges=list(expected))
    assert combined.n_obs == 24 and not combined.obs_names.has_duplicates
    # back to 6 per range: 0002 (spots 8..11 of the 4-scheme) is stale and ignored, 0000/0001 have 4-scheme bounds
    expected6 = {range_key(i): range_bounds(range_key(i), 6) for i in range(n_ranges(12, 6))}
    current, stale = sio.current_range_stores(folder, expected6)
    assert current == {} and len(stale) == 3 and "0002 (spots [8, 12])" in stale
    with pytest.raises(ValueError, match=r"missing \['0000', '0001'\]"):
        combine_ranges({}, expected_ranges=list(expected6), source=str(folder))


def test_combine_refuses_mixed_schemes_and_foreign_spots():
    def part(spots, tag):
        a = ad.AnnData(np.ones((len(spots), 2), np.float32))
        a.obs_names = [f"{tag}{i}" for i in range(len(spots))]
        a.obs["spot"] = spots
        return a

    with pytest.raises(ValueError, match="cell ids appear in more than one"):
        combine_ranges({"0000": part(["a", "b"], "c"), "0001": part(["c"], "c")})
    with pytest.raises(ValueError, match="cells of 1 spots are split over several ranges"):
        combine_ranges({"0000": part(["a", "b"], "x"), "0001": part(["b"], "y")})
    slide = ad.AnnData(np.ones((2, 2), np.float32))
    slide.obs_names = ["a", "b"]
    with pytest.raises(ValueError, match="not in the slide"):
        combine_ranges({"0000": part(["a", "zz"], "x")}, slide=slide)


# --- names that try to escape storage_root ----------------------------------------------------------------------
TRAVERSAL = ["../x", "../../evil_ref", "/abs/path", "a/b", "a\\b", "..", ".hidden", "", "a b", "c:"]


@pytest.mark.parametrize("bad", TRAVERSAL)
@pytest.mark.parametrize("where", ["sample", "reference", "slices", "store_sample", "store_reference", "range"])
def test_names_cannot_escape_storage_root(tmp_path, demo_small, where, bad):
    if where.startswith("store") or where == "range":
        st = Stores(tmp_path / "store")
        call = {
            "store_sample": lambda: st.slide(bad),
            "store_reference": lambda: st.checkpoint(bad),
            "range": lambda: st.decomposed_range("ok", bad),
        }[where]
        with pytest.raises(sio.UnsafeNameError, match="becomes a folder name under storage_root"):
            call()
        return
    ref = {"name": "ref", "path": str(demo_small.reference)}
    sample = {"name": "s", "spatial": str(demo_small.slide), "image": str(demo_small.image), "reference": "ref"}
    if where == "sample":
        sample["name"] = bad
    elif where == "reference":
        ref["name"] = bad
        sample["reference"] = bad
    else:
        sample["slices"] = bad
    p = tmp_path / "dagster_project.yaml"
    p.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "st"), "references": [ref], "samples": [sample]}))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(p) in str(info.value) and "name" in str(info.value) and repr(bad) in str(info.value)


def test_landing_folder_names_are_checked(tmp_path, demo_small):
    land = tmp_path / "landing"
    sub = land / "bad name"
    sub.mkdir(parents=True)
    (sub / "slide.h5ad").write_bytes(Path(demo_small.slide).read_bytes())
    (sub / "_READY").write_text("")
    p = tmp_path / "dagster_project.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(tmp_path / "st"),
                "landing": {"path": str(land), "reference": "ref"},
                "references": [{"name": "ref", "path": str(demo_small.reference)}],
            }
        )
    )
    cfg = load_config(p)
    with pytest.raises(ConfigError, match="'bad name'"):
        cfg.all_samples()


# --- SIGTERM and runs left STARTED ------------------------------------------------------------------------------
_RUN_SCRIPT = """
import os, sys, time
from pathlib import Path
import dagster as dg
from spatial_assets import io as sio
from spatial_assets.orchestration.demo_run import _SIGNALLED, PID_TAG, stop_on_sigterm

store = Path(sys.argv[1])
flag = Path(sys.argv[2])
retry = dg.RetryPolicy(max_retries=3, delay=1) if sys.argv[3] == "retry" else None

@dg.asset(retry_policy=retry)
def slow(context):
    with sio.atomic_path(store) as tmp:
        tmp.mkdir()
        flag.write_text("x")
        for _ in range(600):
            time.sleep(0.1)
    return 1

instance = dg.DagsterInstance.get()
try:
    with stop_on_sigterm(grace_s=3):
        res = dg.materialize([slow], instance=instance, raise_on_error=False, tags={PID_TAG: str(os.getpid())})
        print("RESULT", res.success, flush=True)
        if _SIGNALLED:
            raise KeyboardInterrupt
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(130)
"""


def _run_slow(tmp_path: Path, retry: str = "none") -> tuple[subprocess.Popen, Path, Path]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    store, flag = tmp_path / "out.zarr", tmp_path / "inside"
    env = {**ENV, "DAGSTER_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN_SCRIPT, str(store), str(flag), retry],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for(flag.exists, 120)
    return proc, store, home


def _runs(home: Path):
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home)
    try:
        instance = dg.DagsterInstance.get()
        return instance, list(instance.get_runs())
    finally:
        os.environ.pop("DAGSTER_HOME", None)


@pytest.mark.parametrize("retry", ["none", "retry"])
def test_sigterm_stops_a_run_promptly_and_marks_it_failed(tmp_path, retry):
    """Without a retry policy Dagster's interrupt ends the step; with one (the GPU steps have it) the step would
    be retried, so the watcher stops the process after its grace period, the run reported failed."""
    import dagster as dg

    proc, store, home = _run_slow(tmp_path, retry)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    elapsed = time.time() - t0
    assert elapsed < 30, out
    assert proc.returncode in (130, 143), out
    assert not store.exists() and not [p for p in tmp_path.iterdir() if sio.is_complete(p)], out
    _, runs = _runs(home)
    assert [r.status for r in runs] == [dg.DagsterRunStatus.FAILURE], out
    sio.write_anndata(_adata(), store)  # the next write cleans whatever the stopped writer left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_run_left_started_by_kill9_is_marked_failed_on_next_start(tmp_path):
    import dagster as dg

    from spatial_assets.orchestration.demo_run import mark_dead_runs_failed

    proc, store, home = _run_slow(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    instance, runs = _runs(home)
    assert [r.status for r in runs] == [dg.DagsterRunStatus.STARTED]
    assert mark_dead_runs_failed(instance, log=lambda m: None) == [runs[0].run_id]
    assert instance.get_run_by_id(runs[0].run_id).status == dg.DagsterRunStatus.FAILURE
    assert mark_dead_runs_failed(instance, log=lambda m: None) == []  # idempotent
    assert not store.exists()


def test_up_to_date_range_is_kept_and_stale_one_recomputed(tmp_path, demo_small):
    from spatial_assets.orchestration.code_versions import code_version
    from spatial_assets.orchestration.demo_run import range_up_to_date

    p = tmp_path / "dagster_project.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(tmp_path / "st"),
                "partitions": {"spot_range_size": 10},
                "references": [{"name": "ref", "path": str(demo_small.reference)}],
                "samples": [
                    {"name": "s", "spatial": str(demo_small.slide), "image": str(demo_small.image), "reference": "ref"}
                ],
            }
        )
    )
    cfg = load_config(p)
    st = Stores(cfg.storage_root)
    sio.write_anndata(_adata(), st.slide("s"))
    sio.write_directory(st.typed("s").folder, lambda d: (d / "x").write_text("x"))
    sio.write_directory(st.checkpoint("ref").folder, lambda d: (d / "x").write_text("x"))
    time.sleep(0.05)
    info = {"spot_range": [0, 10], "code_version": code_version("decomposed_cells")}
    sio.write_anndata(_adata(), st.decomposed_range("s", "0000"), info=info)
    assert range_up_to_date(cfg, "s", "0000")
    sio.write_anndata(_adata(), st.decomposed_range("s", "0001"), info={**info, "spot_range": [0, 10]})
    assert not range_up_to_date(cfg, "s", "0001")  # another partition scheme's bounds
    sio.write_anndata(_adata(), st.decomposed_range("s", "0000"), info={**info, "code_version": "old"})
    assert not range_up_to_date(cfg, "s", "0000")  # other code
    sio.write_anndata(_adata(), st.decomposed_range("s", "0000"), info=info)
    time.sleep(0.05)
    sio.write_directory(st.checkpoint("ref").folder, lambda d: (d / "x").write_text("retrained"))
    assert not range_up_to_date(cfg, "s", "0000")  # an input changed after the range was written
    assert pd.Index(["0000"]).equals(pd.Index([range_key(0)]))
