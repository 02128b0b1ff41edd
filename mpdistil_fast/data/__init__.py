"""Tasks, loading (local official files or the hub), encoding, batching, metrics and the frozen-teacher cache."""
from mpdistil_fast.data.encoding import EncodedSplit, encode_examples, iterate_batches, num_batches, trim_padding
from mpdistil_fast.data.loading import (TaskSplits, check_task_data, load_examples, load_task_splits,
                                        resolve_data_dir)
from mpdistil_fast.data.metrics import compute_metrics
from mpdistil_fast.data.tasks import SUPERGLUE_TASKS, TASKS, Example, TaskSpec, task_spec
from mpdistil_fast.data.teacher_cache import CachedOutputs, TeacherCache

__all__ = ["CachedOutputs", "EncodedSplit", "Example", "SUPERGLUE_TASKS", "TASKS", "TaskSpec", "TaskSplits",
           "TeacherCache", "check_task_data", "compute_metrics", "encode_examples", "iterate_batches", "load_examples",
           "load_task_splits", "num_batches", "resolve_data_dir", "task_spec", "trim_padding"]
