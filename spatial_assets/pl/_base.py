"""Shared figure helpers: new figures without pyplot (no backend is chosen on import) and a type palette."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from ..constants import UNASSIGNED

#: Colour of cells without a type.
UNASSIGNED_COLOUR = (0.75, 0.75, 0.75, 1.0)


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (6, 4), **subplot_kw):
    """A Matplotlib figure and its axes, built without pyplot.

    The figure is not registered with pyplot, so creating it never selects a GUI backend; it uses the
    "constrained" layout.

    Parameters
    ----------
    nrows, ncols : int, default 1
        Grid of subplots.
    figsize : tuple of float, default (6, 4)
        Figure size in inches.
    **subplot_kw
        Passed on to :meth:`matplotlib.figure.Figure.subplots` (e.g. ``squeeze=False``, ``sharex=True``).

    Returns
    -------
    fig : matplotlib.figure.Figure
        The new figure.
    axes : matplotlib.axes.Axes or numpy.ndarray
        Its axes, as returned by ``Figure.subplots``.
    """
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, **subplot_kw)
    return fig, axes


def type_palette(types: Sequence[str]) -> dict[str, tuple]:
    """Distinct colours for cell types, grey for unassigned.

    Types are sorted by name and coloured from scanpy's palettes (20, 28 or 102 colours, the smallest that holds
    them; beyond 102 types colours repeat). :data:`spatial_assets.constants.UNASSIGNED` always maps to light grey.

    Parameters
    ----------
    types : sequence of str
        Type names (duplicates and the unassigned label are allowed).

    Returns
    -------
    dict
        ``{type name: RGBA tuple}`` for every distinct type, plus the unassigned label.
    """
    from matplotlib.colors import to_rgba
    from scanpy.plotting import palettes

    names = sorted({str(t) for t in types} - {UNASSIGNED})
    n = len(names)
    pal = palettes.default_20 if n <= 20 else palettes.default_28 if n <= 28 else palettes.default_102
    cols = {t: to_rgba(pal[i % len(pal)]) for i, t in enumerate(names)}
    cols[UNASSIGNED] = UNASSIGNED_COLOUR
    return cols
