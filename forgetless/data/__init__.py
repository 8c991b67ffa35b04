"""Tasks and task streams from real data that ships inside packages, or from user files (.npz / Parquet)."""
from forgetless.data.tasks import BUILTIN_DATASETS, TaskData, build_task, build_stream, load_raw_dataset

__all__ = ["BUILTIN_DATASETS", "TaskData", "build_task", "build_stream", "load_raw_dataset"]
