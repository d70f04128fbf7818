"""Parameters that run but break accuracy, warned about when a run starts (the step's log and ``make demo``)."""

from __future__ import annotations

from ..params import Parameters

#: below this many noise levels the message says the result is not usable (issue #13: a stride "small enough to be
#: quick" gave a spot reconstruction error of 12.3; the threshold itself is a round figure, not a measured one)
MIN_LEVELS = 100


def accuracy_warnings(params: Parameters, where: str = "parameters") -> list[str]:
    """Warnings for parameter values that make a stage fast but inaccurate.

    Parameters
    ----------
    params
        A sample's (or the global) parameters.
    where
        How the parameters are named in the messages (e.g. ``samples.demo.parameters``).

    Returns
    -------
    list of str
        One message per problem, naming the key, its value and the safe range; empty when none.
    """
    out = []
    d, sm = params.decomposition, params.score_model
    levels = -(-sm.n_sigmas // d.level_stride)
    if d.level_stride > 1 and getattr(d, "estimator", "langevin") == "langevin":  # the mixture has no levels
        out.append(
            f"{where}.decomposition.level_stride={d.level_stride}: the decomposition anneals over only {levels} of "
            f"the {sm.n_sigmas} noise levels; strides > 1 are for smoke tests and break the reconstruction of the "
            "spots (use 1)"
            + (f"; below {MIN_LEVELS} levels the decomposed cells are not usable" if levels < MIN_LEVELS else "")
        )
    if sm.save_every > sm.train_steps:
        out.append(
            f"{where}.score_model.save_every={sm.save_every} > train_steps={sm.train_steps}: no intermediate "
            "checkpoint is saved, so an interrupted training restarts from step 0"
        )
    return out
