"""Helpers shared by the tests."""

from __future__ import annotations

import io
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


def png(fig) -> bytes:
    """PNG bytes of a Matplotlib figure (the ``spatial_assets.pl`` functions return figures)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def png_of(plot):
    """``plot`` returning PNG bytes instead of a figure (for the figure tests)."""

    def wrapped(*args, **kwargs) -> bytes:
        return png(plot(*args, **kwargs))

    return wrapped
