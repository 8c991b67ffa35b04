"""The schema of one task in an experiment config (`source:`, `targets:`): the data layer owns what a task is."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from forgetless.data.raw import BUILTIN_DATASETS


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a YAML key must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskTransform(_Strict):
    """A deterministic change of a task's inputs, to build streams (permuted / rotated / noisy variants)."""

    kind: Literal["permute", "rotate", "noise", "resample"]
    seed: int = 0
    degrees: float = Field(0.0, description="rotate: angle in degrees (2-D images only)")
    std: float = Field(0.0, ge=0.0, description="noise: std of additive Gaussian noise, in units of the input's std")
    length: int | None = Field(None, gt=0, description="resample: new flat input length (e.g. 64 to match digits)")


class TaskConfig(_Strict):
    """One labelled task: a dataset, a class subset, splits."""

    name: str | None = Field(None, description="defaults to '<dataset>_<classes>'")
    dataset: str = Field(..., description="digits | mnist1d | a path or s3:// URI of a .npz or .parquet file")
    classes: list[int] | None = Field(None, description="class ids to keep (None = all)")
    samples_per_class: int | None = Field(None, gt=0, description="cap on training samples per class (few-shot)")
    transforms: list[TaskTransform] = Field(default_factory=list)
    val_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    split_seed: int = 0

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if len(v) < 2:
                raise ValueError("a task needs at least 2 classes")
            if len(set(v)) != len(v):
                raise ValueError(f"classes contain duplicates: {v}")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset_exists(cls, v: str) -> str:
        if v in BUILTIN_DATASETS or v.startswith("s3://"):
            return v
        if not (v.endswith(".npz") or v.endswith(".parquet")):
            raise ValueError(
                f"unknown dataset {v!r}: use one of {sorted(BUILTIN_DATASETS)} or a path to a .npz / .parquet file"
            )
        if not Path(v).expanduser().exists():
            raise ValueError(f"dataset file {v!r} does not exist")
        return v

    def display_name(self) -> str:
        if self.name:
            return self.name
        base = self.dataset if self.dataset in BUILTIN_DATASETS else Path(self.dataset).stem
        cls_part = "all" if self.classes is None else "-".join(str(c) for c in self.classes)
        extra = "".join(f"_{t.kind}{t.seed}" for t in self.transforms)
        return f"{base}_{cls_part}{extra}"

