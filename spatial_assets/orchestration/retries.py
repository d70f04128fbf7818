"""Retries for transient faults only.

No asset carries a blanket ``RetryPolicy``: a deterministic input error (no image, a model not available offline,
a bad column) would fail the same way on every retry. Instead a GPU step runs its science call through
:func:`run_with_transient_retries`:

* **CUDA out of memory** -> the step asks Dagster for a retry (``RetryRequested``) and the retried attempt runs
  with its batch scaled by ``0.5 ** retry_number`` (see :func:`batch_scale`);
* **a lost worker / connection** (``ConnectionError``, ``TimeoutError``, Dask's ``KilledWorker`` /
  ``CommClosedError``) -> retried as is;
* anything else (``ValueError`` and its subclasses such as the project's ``InputError``, ``FileNotFoundError``,
  ``KeyError``...) -> raised at once, with its own message: the step fails on its first attempt.

A worker process that dies outright (killed for memory, a lost node) cannot raise anything; that is covered at the
run level by Dagster's run retries restricted to runs that did not fail in an op (:data:`RUN_RETRY_TAGS`,
``run_retries`` in the instance's dagster.yaml written by ``make demo``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import dagster as dg

T = TypeVar("T")

MAX_TRANSIENT_RETRIES = 2
RETRY_WAIT_S = 5.0
#: Run-level retries of runs whose failure was not an op's error (a crashed or lost step process).
RUN_RETRY_TAGS = {"dagster/max_retries": "2", "dagster/retry_on_asset_or_op_failure": "false"}
_LOST_WORKER_NAMES = {"KilledWorker", "CommClosedError", "WorkerLostError", "StreamClosedError"}


def is_cuda_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch's CUDA out-of-memory error (also when re-raised as a plain RuntimeError)."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and "cuda" in str(exc).lower()


def transient_kind(exc: BaseException) -> str | None:
    """``"cuda_oom"``, ``"lost_worker"`` or ``None`` (not transient: do not retry)."""
    if is_cuda_oom(exc):
        return "cuda_oom"
    if type(exc).__name__ in _LOST_WORKER_NAMES or isinstance(exc, (ConnectionError, TimeoutError)):
        return "lost_worker"
    return None


def batch_scale(retry_number: int) -> float:
    """The batch scale of an attempt: 1 on the first, halved on each retry."""
    return 0.5 ** max(0, int(retry_number))


def scaled(n: int, scale: float) -> int:
    """``n`` scaled down, at least 1."""
    return max(1, int(n * scale))


def run_with_transient_retries(
    context: dg.AssetExecutionContext,
    fn: Callable[[float], T],
    *,
    max_retries: int = MAX_TRANSIENT_RETRIES,
    wait_s: float = RETRY_WAIT_S,
) -> T:
    """Call ``fn(batch_scale)``; on a transient fault ask Dagster to retry the step, else re-raise.

    Parameters
    ----------
    context
        The asset's execution context (its ``retry_number`` picks the batch scale).
    fn
        The science call, given the batch scale of this attempt (1, 0.5, 0.25 ...).
    max_retries
        Retries allowed for transient faults.
    wait_s
        Seconds before a retried attempt.

    Returns
    -------
    Whatever ``fn`` returns.

    Raises
    ------
    dagster.RetryRequested
        On CUDA out of memory or a lost worker, while retries are left.
    Exception
        Any other error of ``fn``, unchanged (input errors fail the step at once).
    """
    attempt = context.retry_number
    scale = batch_scale(attempt)
    if attempt:
        context.log.warning(f"retry {attempt}/{max_retries}: batch scaled by {scale:g}")
    try:
        return fn(scale)
    except Exception as e:
        kind = transient_kind(e)
        if kind is None or attempt >= max_retries:
            raise
        if kind == "cuda_oom":
            try:
                import torch

                torch.cuda.empty_cache()
            except Exception:
                pass
        context.log.warning(
            f"transient fault ({kind}: {type(e).__name__}: {str(e)[:300]}); retrying in {wait_s:g} s"
            + (f" with the batch scaled by {batch_scale(attempt + 1):g}" if kind == "cuda_oom" else "")
        )
        raise dg.RetryRequested(max_retries=max_retries, seconds_to_wait=wait_s) from e


def user_error_message(error) -> str:
    """``"ErrorClass: message"`` of the user's own exception inside a Dagster step failure (a
    ``SerializableErrorInfo``, whose top level is Dagster's wrapper ``DagsterExecutionStepExecutionError``)."""
    while error.cause is not None and error.cls_name and error.cls_name.startswith("Dagster"):
        error = error.cause
    msg = error.message.strip()
    return msg if msg.startswith(f"{error.cls_name}:") or not error.cls_name else f"{error.cls_name}: {msg}"
