"""Tasks by name: each declares its loss, metrics, batch keys, run kind and the metric that
selects its checkpoint (:class:`TaskSpec`). Importing this package registers every
built-in task (classify, multilabel, distill, metric), as ``timm.models`` does for models.
"""

from raylens.tasks import classification, distill, metric, multilabel  # noqa: F401  (register)
from raylens.tasks.base import (
    TASKS,
    Task,
    TaskSpec,
    check_best_metric,
    create_task,
    get_task,
    is_better,
    lower_is_better,
    register_task,
)

__all__ = [
    "TASKS",
    "Task",
    "TaskSpec",
    "check_best_metric",
    "create_task",
    "get_task",
    "is_better",
    "lower_is_better",
    "register_task",
]
