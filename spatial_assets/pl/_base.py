"""Shared figure helpers: new figures without pyplot (no backend is chosen on import) and a type palette."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from ..constants import UNASSIGNED

#: Colour of cells without a type.
UNASSIGNED_COLOUR = (0.75, 0.75, 0.75, 1.0)


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (6, 4), **subplot_kw):
    """A Matplotlib ``Figure`` (not registered with pyplot, so it never needs a GUI backend) and its axes."""
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, **subplot_kw)
    return fig, axes


def type_palette(types: Sequence[str]) -> dict[str, tuple]:
    """Distinct colours for up to 102 types (scanpy's palettes: 20, 28 or 102 colours), grey for unassigned."""
    from matplotlib.colors import to_rgba
    from scanpy.plotting import palettes

    names = sorted({str(t) for t in types} - {UNASSIGNED})
    n = len(names)
    pal = palettes.default_20 if n <= 20 else palettes.default_28 if n <= 28 else palettes.default_102
    cols = {t: to_rgba(pal[i % len(pal)]) for i, t in enumerate(names)}
    cols[UNASSIGNED] = UNASSIGNED_COLOUR
    return cols
