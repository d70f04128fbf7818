"""Zarr storage laid out by asset, sample and partition, with atomic writes.

Layout (readable by anyone with plain ``anndata.read_zarr`` / ``zarr.open``)::

    <root>/<asset>/<sample>.zarr                 AnnData zarr (or a zarr group / array)
    <root>/<asset>/<sample>/<partition>.zarr     for partitioned assets (e.g. spot ranges)

Atomicity: every store is written into a hidden sibling ``.<name>.tmp-<pid>-<uuid>`` and only renamed into place
once it is whole (the next writer removes temporaries whose writer process is dead; they never count as complete), so a crash mid-write leaves no store at the final path. An existing good store is moved aside only
after the new one is complete, then removed. Each finished store carries ``spatial_assets`` attributes
(``complete: true``, when it was written, what wrote it). No dagster import here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import zarr

ad.settings.zarr_write_format = 3

MARKER_ATTR = "spatial_assets"
SLASH = "\u2215"


def store_path(
    root: str | os.PathLike,
    asset: str | list[str],
    sample: str | None = None,
    partition: str | None = None,
    suffix: str = ".zarr",
) -> Path:
    """Where an asset (optionally of one sample and one partition) lives under ``root``.

    Parameters
    ----------
    root : str or os.PathLike
        The storage root.
    asset : str or list of str
        The asset's name, or its key path (joined as sub-folders).
    sample : str, optional
        The sample: the store is ``<asset>/<sample><suffix>``.
    partition : str, optional
        The partition: the store is ``<asset>/<sample>/<partition><suffix>`` (``_`` for the sample when it is
        ``None``).
    suffix : str
        The store's file-name suffix.

    Returns
    -------
    pathlib.Path
        The path (``<root>/<asset><suffix>`` without sample and partition); nothing is created.
    """
    parts = [asset] if isinstance(asset, str) else list(asset)
    p = Path(root).joinpath(*parts)
    if sample is None and partition is None:
        return p.with_name(p.name + suffix)
    if partition is None:
        return p / f"{sample}{suffix}"
    return p / (sample or "_") / f"{partition}{suffix}"


def _tmp_sibling(path: Path) -> Path:
    # the writer's pid is in the name, so the next writer can tell a dead writer's leftovers from a live one's
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _is_temporary(path: Path) -> bool:
    """A hidden sibling of a store being written or moved aside (never a store itself)."""
    return path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped) is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _writer_dead(tmp: Path, max_age_s: float = 3600.0) -> bool:
    """A temporary sibling whose writer is gone: its pid is not alive, or (no pid in the name) it is old."""
    rest = tmp.name.rsplit(".tmp-", 1)[-1]
    head = rest.split("-", 1)[0]
    if "-" in rest and head.isdigit():
        return not _pid_alive(int(head))
    try:
        return time.time() - tmp.stat().st_mtime > max_age_s
    except FileNotFoundError:
        return False


def _mover_dead(old: Path) -> bool:
    """A moved-aside store whose mover is gone (no pid in its name: an older writer, treated as gone)."""
    rest = old.name.rsplit(".old-", 1)[-1]
    head = rest.split("-", 1)[0]
    return not ("-" in rest and head.isdigit() and _pid_alive(int(head)))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_RACE_ERRNOS = (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write into; on success it replaces ``path`` atomically, on error it is removed.

    The previous content of ``path`` (if any) is kept until the new one is complete. Leftovers of dead writers
    next to ``path`` are removed first. Two writers racing on one ``path`` leave exactly one complete store there
    (the last to finish) and no complete temporary: a writer whose rename loses is retried, then gives up cleanly.

    Parameters
    ----------
    path : str or os.PathLike
        The final path of the store.

    Yields
    ------
    pathlib.Path
        A hidden temporary sibling of ``path`` (not created) to write the store into.

    Raises
    ------
    OSError
        The parent folder cannot be created (the message names it).
    RuntimeError
        The writer produced nothing at the temporary path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"{path.parent}: cannot create the store's folder ({e.strerror or e})") from None
    _cleanup_stale(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic write to {path}: the writer produced nothing at {tmp}")
        olds: list[Path] = []
        try:
            for attempt in range(20):
                if path.exists() or path.is_symlink():
                    old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}")
                    try:
                        os.replace(path, old)
                        olds.append(old)
                    except FileNotFoundError:  # another writer moved it aside first
                        pass
                try:
                    os.replace(tmp, path)
                    break
                except OSError as e:  # another writer's store landed between our two renames: go again
                    if e.errno not in _RACE_ERRNOS or attempt == 19:
                        raise
                    time.sleep(0.01 * (attempt + 1))
        finally:
            for old in olds:
                _remove(old)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def _cleanup_stale(path: Path) -> None:
    """Remove leftovers of dead writers next to ``path``; restore a moved-aside store if the final one is gone."""
    parent = path.parent
    if not parent.exists():
        return
    olds = sorted(parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    olds = [p for p in olds if _mover_dead(p)]
    if olds and not path.exists():
        with contextlib.suppress(OSError):
            os.replace(olds.pop(), path)  # a crash between the two renames: the old store is still good
    for p in olds:
        _remove(p)
    for p in parent.glob(f".{path.name}.tmp-*"):
        if _writer_dead(p):
            _remove(p)


def _mark(group_path: Path, extra: dict[str, Any] | None = None) -> None:
    g = zarr.open_group(str(group_path), mode="r+")
    info = {"complete": True, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "format": 1}
    if extra:
        info.update(extra)
    g.attrs[MARKER_ATTR] = json.loads(json.dumps(info, default=str))


def _sanitize_uns(adata: ad.AnnData) -> None:
    """anndata cannot write None / arbitrary objects in uns: make them JSON-able strings instead of failing."""

    def fix(v):
        if v is None:
            return "None"
        if isinstance(v, dict):
            return {str(k): fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
            return np.asarray(v, dtype=object)
        if isinstance(v, Path):
            return str(v)
        return v

    adata.uns = fix(dict(adata.uns))


def write_anndata(adata: ad.AnnData, path: str | os.PathLike, *, info: dict[str, Any] | None = None) -> Path:
    """Write ``adata`` as an AnnData zarr store, atomically.

    ``uns`` values anndata cannot write (``None``, paths, lists of strings) are converted first; a view is copied.

    Parameters
    ----------
    adata : anndata.AnnData
        The data to write.
    path : str or os.PathLike
        The store's path (replaced if it exists).
    info : dict, optional
        Extra entries of the completion marker (``attrs['spatial_assets']``).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    adata = adata.copy() if adata.is_view else adata
    _sanitize_uns(adata)
    with atomic_path(path) as tmp:
        adata.write_zarr(tmp)
        _mark(tmp, {"kind": "anndata", "shape": list(adata.shape), **(info or {})})
    return path


def write_dataframe(df: pd.DataFrame, path: str | os.PathLike, *, info: dict[str, Any] | None = None) -> Path:
    """A table is stored as an AnnData zarr with the table as ``obs`` (readable with ``anndata.read_zarr``).

    The index is stored as strings; column names holding ``/`` are stored with a look-alike slash and restored by
    :func:`read_dataframe`.

    Parameters
    ----------
    df : pandas.DataFrame
        The table (not modified).
    path : str or os.PathLike
        The store's path (replaced if it exists).
    info : dict, optional
        Extra entries of the completion marker.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    df = df.copy()
    df.index = df.index.astype(str)
    # zarr keys cannot hold '/', which cell-type names often do (e.g. 'L2/3 IT'): store such columns with U+2215
    # (a look-alike slash) and record the mapping so read_dataframe restores the names exactly.
    renamed = {str(c).replace("/", SLASH): str(c) for c in df.columns if "/" in str(c)}
    if renamed:
        df.columns = [str(c).replace("/", SLASH) for c in df.columns]
    a = ad.AnnData(obs=df)
    return write_anndata(a, path, info={"kind": "dataframe", "renamed_columns": renamed, **(info or {})})


def write_arrays(
    arrays: dict[str, Any],
    path: str | os.PathLike,
    *,
    attrs: dict[str, Any] | None = None,
    chunks: int | tuple | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write named arrays (numpy, or any array zarr/dask can store) as a chunked zarr group, atomically.

    Large arrays (e.g. a whole-slide label image) may be given as ``zarr.Array`` / dask arrays: they are
    copied chunk by chunk, never loaded whole.

    Parameters
    ----------
    arrays : dict
        ``{name: array}``; string / object arrays are stored as strings.
    path : str or os.PathLike
        The store's path (replaced if it exists).
    attrs : dict, optional
        Group attributes (made JSON-able: numpy scalars and arrays as numbers and lists, others as strings).
    chunks : int or tuple, optional
        Chunk shape (an int: that size along every axis, capped by the shape); default about 4 MiB chunks.
    info : dict, optional
        Extra entries of the completion marker.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        g = zarr.open_group(str(tmp), mode="w")
        for name, arr in arrays.items():
            _write_array_into(g, name, arr, chunks)
        if attrs:
            g.attrs.update(json.loads(json.dumps(attrs, default=_json_default)))
        _mark(tmp, {"kind": "arrays", "arrays": sorted(arrays), **(info or {})})
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _default_chunks(shape: tuple, itemsize: int, target_bytes: int = 4 << 20) -> tuple:
    if len(shape) == 0:
        return ()
    if len(shape) >= 2:
        side = max(64, int((target_bytes / max(itemsize, 1) / max(int(np.prod(shape[2:])), 1)) ** 0.5))
        return tuple(min(s, side) for s in shape[:2]) + tuple(shape[2:])
    return (min(shape[0], max(1, target_bytes // max(itemsize, 1))),)


def _write_array_into(g: zarr.Group, name: str, arr: Any, chunks) -> None:
    shape = tuple(arr.shape)
    dtype = np.dtype(arr.dtype)
    if dtype.kind in "OUS":
        g.create_array(name, data=np.asarray(arr).astype(str))
        return
    ch = chunks if chunks is not None else _default_chunks(shape, dtype.itemsize)
    if isinstance(ch, int):
        ch = tuple(min(ch, s) for s in shape)
    z = g.create_array(name, shape=shape, dtype=dtype, chunks=ch or None)
    if isinstance(arr, np.ndarray):
        z[...] = arr
        return
    if hasattr(arr, "chunks") and hasattr(arr, "compute") and hasattr(arr, "store"):  # dask
        arr.store(z, lock=False)
        return
    # zarr array or other sliceable: copy block rows to keep memory bounded
    step = ch[0] if ch else shape[0]
    for i in range(0, shape[0], step):
        z[i : i + step] = np.asarray(arr[i : i + step])


def write_directory(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Atomically produce a directory (e.g. a checkpoint folder) with ``writer(tmp_dir)``.

    Parameters
    ----------
    path : str or os.PathLike
        The directory's final path (replaced if it exists).
    writer : callable
        Called with the (created, empty) temporary directory to fill; a ``.complete`` file is added after it.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        writer(tmp)
        (tmp / ".complete").write_text(json.dumps({"complete": True, "written_at": time.time()}))
    return path


def is_complete(path: str | os.PathLike) -> bool:
    """True if ``path`` is a finished store written by this module.

    Parameters
    ----------
    path : str or os.PathLike
        A store or directory.

    Returns
    -------
    bool
        ``True`` when ``path`` exists, is not a temporary sibling, and holds a ``.complete`` file or a zarr group
        whose marker says ``complete``; ``False`` otherwise (also when it cannot be opened).
    """
    path = Path(path)
    if _is_temporary(path) or not path.exists():
        return False
    if (path / ".complete").exists():
        return True
    try:
        g = zarr.open_group(str(path), mode="r")
        return bool(dict(g.attrs).get(MARKER_ATTR, {}).get("complete", False))
    except Exception:
        return False


def _require_complete(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such store (has the upstream asset been materialized?)")
    if not is_complete(path):
        raise RuntimeError(f"{path}: store is incomplete (a write did not finish); re-materialize it")


def read_anndata(path: str | os.PathLike) -> ad.AnnData:
    """Read a complete AnnData zarr store.

    Parameters
    ----------
    path : str or os.PathLike
        The store.

    Returns
    -------
    anndata.AnnData
        The data.

    Raises
    ------
    FileNotFoundError
        No store at ``path``.
    RuntimeError
        The store is incomplete (a write did not finish).
    """
    path = Path(path)
    _require_complete(path)
    return ad.read_zarr(path)


def read_dataframe(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`write_dataframe`, with its original column names.

    Parameters
    ----------
    path : str or os.PathLike
        The store.

    Returns
    -------
    pandas.DataFrame
        The table (index as strings).

    Raises
    ------
    FileNotFoundError
        No store at ``path``.
    RuntimeError
        The store is incomplete.
    """
    obs = read_anndata(path).obs
    renamed = read_attrs(path).get(MARKER_ATTR, {}).get("renamed_columns") or {}
    return obs.rename(columns=renamed) if renamed else obs


def read_arrays(path: str | os.PathLike, names: list[str] | None = None, *, lazy: bool = False) -> dict[str, Any]:
    """Read a group written by :func:`write_arrays`; ``lazy=True`` returns ``zarr.Array`` objects.

    Parameters
    ----------
    path : str or os.PathLike
        The store.
    names : list of str, optional
        The arrays to read (default: all).
    lazy : bool
        Return ``zarr.Array`` objects instead of numpy arrays.

    Returns
    -------
    dict
        ``{name: array}``.

    Raises
    ------
    FileNotFoundError
        No store at ``path``.
    RuntimeError
        The store is incomplete.
    """
    path = Path(path)
    _require_complete(path)
    g = zarr.open_group(str(path), mode="r")
    keys = names or [k for k, _ in g.arrays()]
    return {k: (g[k] if lazy else g[k][...]) for k in keys}


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The attributes of a zarr group (completeness is not checked).

    Parameters
    ----------
    path : str or os.PathLike
        The store.

    Returns
    -------
    dict
        The group's attributes (the marker under :data:`MARKER_ATTR`).
    """
    g = zarr.open_group(str(path), mode="r")
    return dict(g.attrs)


def disk_size(path: str | os.PathLike) -> int:
    """Bytes on disk under ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        A file or folder.

    Returns
    -------
    int
        The file's size, or the summed size of the files under the folder.
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Path, shape and size on disk of a store: the metadata each materialization reports.

    Parameters
    ----------
    path : str or os.PathLike
        The store.

    Returns
    -------
    dict
        ``path``, ``size_bytes`` and, when known from the marker, ``shape`` (a list, or ``{array: shape}`` for an
        arrays group).
    """
    path = Path(path)
    out: dict[str, Any] = {"path": str(path), "size_bytes": disk_size(path)}
    try:
        info = read_attrs(path).get(MARKER_ATTR, {})
        if "shape" in info:
            out["shape"] = info["shape"]
        elif info.get("kind") == "arrays":
            g = zarr.open_group(str(path), mode="r")
            out["shape"] = {k: list(a.shape) for k, a in g.arrays()}
    except Exception:
        pass
    return out


def current_range_stores(
    folder: str | os.PathLike, expected: dict[str, tuple[int, int]]
) -> tuple[dict[str, Path], list[str]]:
    """The range stores of ``folder`` that belong to the current partition scheme, and the stale ones.

    Parameters
    ----------
    folder : str or os.PathLike
        Holds ``<range key>.zarr`` stores, each recording its ``spot_range`` [start, stop) in its attributes.
    expected : dict
        ``{range key: (start, stop)}`` of the current scheme.

    Returns
    -------
    (dict, list)
        The complete stores whose key and bounds are expected, and a description of each other store found
        (another scheme's bounds, an unexpected key, or incomplete).
    """
    folder = Path(folder)
    current: dict[str, Path] = {}
    stale: list[str] = []
    for p in sorted(folder.glob("*.zarr")) if folder.is_dir() else []:
        if not is_complete(p):
            stale.append(f"{p.stem} (incomplete)")
            continue
        bounds = tuple((read_attrs(p).get(MARKER_ATTR, {}) or {}).get("spot_range", ()))
        if p.stem in expected and bounds == tuple(expected[p.stem]):
            current[p.stem] = p
        else:
            stale.append(f"{p.stem} (spots {list(bounds) or '?'})")
    return current, stale
