"""Materialization metadata: figures first, then a few headline figures, then the rest as one JSON field."""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np

from .. import io as sio


def figure_png(fig, dpi: int = 90) -> bytes:
    """PNG bytes of a Matplotlib figure (``spatial_assets.pl`` functions return figures)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def png_md(png: bytes, alt: str = "figure") -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def _round(v: float, digits: int = 4) -> float:
    if not math.isfinite(v) or v == 0:
        return v
    return round(v, max(0, digits - 1 - int(math.floor(math.log10(abs(v))))))


def plain(v: Any) -> Any:
    """A JSON-friendly copy of ``v``: numpy scalars as Python numbers, floats to 4 significant digits."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _round(float(v))
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        seq = list(v)
        return [plain(x) for x in seq[:50]] + ([f"... {len(seq) - 50} more"] if len(seq) > 50 else [])
    if v is None or isinstance(v, str):
        return v
    return str(v)


class Report:
    """Builds a materialization's metadata in reading order: figures, headline values, store paths, details."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self._figures: dict[str, dg.MetadataValue] = {}
        self._values: dict[str, Any] = {}
        self._stores: dict[str, Any] = {}
        self._details: dict[str, Any] = {}
        self._log = log

    def figure(self, key: str, build: Callable[[], Any], alt: str | None = None) -> None:
        """Add the figure ``build()`` returns; a figure that fails is logged and never fails the step."""
        try:
            self._figures[key] = png_md(figure_png(build()), alt or key)
        except Exception as e:
            if self._log is not None:
                self._log(f"figure '{key}' failed: {type(e).__name__}: {e}")

    def value(self, **values: Any) -> None:
        for k, v in values.items():
            pv = plain(v)
            if isinstance(pv, (dict, list)):
                self._values[k] = dg.MetadataValue.json(pv)
            elif pv is not None:
                self._values[k] = pv

    def table(self, key: str, markdown: str) -> None:
        self._values[key] = dg.MetadataValue.md(markdown)

    def store(self, path: str | Path, prefix: str = "") -> None:
        d = sio.describe(path)
        self._stores[f"{prefix}path"] = dg.MetadataValue.path(d["path"])
        self._stores[f"{prefix}size_bytes"] = d["size_bytes"]
        if "shape" in d:
            shape = d["shape"]
            self._stores[f"{prefix}shape"] = (
                dg.MetadataValue.json(shape) if isinstance(shape, dict) else str(tuple(shape))
            )

    def folder(self, path: str | Path) -> None:
        self._stores["path"] = dg.MetadataValue.path(str(path))
        self._stores["size_bytes"] = sio.disk_size(path)

    def details(self, **details: Any) -> None:
        self._details.update(details)

    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self._figures, **self._values, **self._stores}
        if self._details:
            out["details"] = dg.MetadataValue.json(json.loads(json.dumps(plain(self._details), default=str)))
        return out

    def result(self, **kwargs) -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata=self.metadata(), **kwargs)


def name_items(items, values=None, limit: int = 8, fmt: str = "{:.4g}") -> str:
    """A short list of the failing items of a check, for its description: ``'a' (1.2), 'b' (3.4) ... and 5 more``.

    Parameters
    ----------
    items
        The failing items (spot names, cell names, types), worst first.
    values
        Their values, in the same order (optional).
    limit
        How many to name.
    fmt
        Format of each value.

    Returns
    -------
    str
        ``"none"`` when there is no item.
    """
    items = list(items)
    if not items:
        return "none"
    vals = list(values) if values is not None else [None] * len(items)
    shown = [f"'{i}'" + (f" ({fmt.format(v)})" if v is not None else "") for i, v in zip(items[:limit], vals[:limit])]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(shown) + more


def check_result(passed: bool, ok: str, problems: list[str], metadata: dict | None = None) -> dg.AssetCheckResult:
    """An asset check result whose description says why: ``ok`` when it passed, else every problem (each naming
    its failing items and the threshold), joined by '; '."""
    desc = ok if passed else "; ".join(problems) or "failed (no detail)"
    return dg.AssetCheckResult(passed=bool(passed), description=desc, metadata=dict(metadata or {}))
