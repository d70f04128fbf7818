"""The Dagster internals this project touches, in one place, checked against dagster 1.13.27 / dagster-dask
0.29.27 (pinned in pyproject.toml). They are used by the Dask executor only (executors.py); a Dagster upgrade
must re-check them (tests/orchestration/test_dask.py runs them on a LocalCluster)."""

from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster_dask.executor import query_on_dask_worker

CHECKED_AGAINST = {"dagster": "1.13.27", "dagster-dask": "0.29.27"}

__all__ = [
    "CHECKED_AGAINST",
    "ExecutionPlan",
    "PlanOrchestrationContext",
    "query_on_dask_worker",
]
