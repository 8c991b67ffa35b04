"""The schema of one task in an experiment config (`source:`, `targets:`): the data layer owns what a task is."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator

from forgetless.data.kinds import CAUSAL_LM
from forgetless.data.lm import BUILTIN_CORPORA, TEXT_SUFFIXES, is_text_source
from forgetless.data.raw import BUILTIN_DATASETS


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a YAML key must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskTransform(_Strict):
    """A deterministic change of a task's inputs, to build streams (permuted / rotated / noisy variants)."""

    kind: Literal["permute", "rotate", "noise", "resample"] = Field(
        description="permute: a fixed pixel permutation; rotate: by `degrees`; noise: Gaussian of `std`; resample: "
                    "to `length` inputs")
    seed: int = Field(0, description="seed of the permutation or noise (the same seed gives the same variant)")
    degrees: float = Field(0.0, description="rotate: angle in degrees (2-D images only)")
    std: float = Field(0.0, ge=0.0, description="noise: std of additive Gaussian noise, in units of the input's std")
    length: int | None = Field(None, gt=0, description="resample: new flat input length (e.g. 64 to match digits)")


_LM_ONLY = ("block_size", "max_train_blocks", "max_eval_blocks", "tokenizer", "text_field")


class TaskConfig(_Strict):
    """One task: a labelled dataset with a class subset (classification), or a text corpus (causal_lm); splits."""

    name: str | None = Field(None, description="defaults to '<dataset>_<classes>' (causal_lm: '<dataset>')")
    kind: Literal["classification", "causal_lm"] = Field(
        "classification", description="classification: labelled inputs; causal_lm: next-token prediction over text")
    dataset: str = Field(..., description="classification: digits | mnist1d | a .npz or .parquet path or s3:// URI; "
                                          "causal_lm: prose | python_code | python_tests | a .txt, .jsonl, "
                                          ".parquet file or a datasets.save_to_disk folder, a path or s3:// URI")
    classes: list[int] | None = Field(None, description="class ids to keep (None = all)")
    samples_per_class: int | None = Field(None, gt=0, description="cap on training samples per class (few-shot)")
    transforms: list[TaskTransform] = Field(default_factory=list, description="changes of the inputs, applied in "
                                            "order (permuted / rotated / noisy variants of a dataset as a stream)")
    val_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="share of the samples held out for validation "
                                                                 "(stratified by class; causal_lm: of the documents)")
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="share of the samples held out for the test "
                                                                  "split, which the accuracy matrix R is scored on")
    split_seed: int = Field(0, description="seed of the train / validation / test split (and of the "
                                           "samples_per_class choice)")
    # causal_lm only
    block_size: int = Field(128, ge=8, le=65536, description="causal_lm: tokens per packed block")
    max_train_blocks: int | None = Field(None, gt=0, description="causal_lm: cap on training blocks (seeded choice)")
    max_eval_blocks: int | None = Field(256, gt=0, description="causal_lm: cap on validation and test blocks each")
    tokenizer: str | None = Field(None, description="causal_lm: tokenizer folder (path or s3://); default: the hf: "
                                                    "backbone's model folder")
    text_field: str = Field("text", description="causal_lm: the text field of .jsonl / .parquet / save_to_disk data")

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
    def _dataset_exists(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == CAUSAL_LM:
            if v.startswith("s3://") or v in BUILTIN_CORPORA:
                return v
            if not is_text_source(v):
                raise ValueError(f"unknown text dataset {v!r}: use one of {sorted(BUILTIN_CORPORA)}, a "
                                 f"{' / '.join(TEXT_SUFFIXES)} file or a datasets.save_to_disk folder")
            if not Path(v).expanduser().exists():
                raise ValueError(f"dataset {v!r} does not exist")
            return v
        if v in BUILTIN_DATASETS or v.startswith("s3://"):
            return v
        if not (v.endswith(".npz") or v.endswith(".parquet")):
            raise ValueError(
                f"unknown dataset {v!r}: use one of {sorted(BUILTIN_DATASETS)} or a path to a .npz / .parquet file"
            )
        if not Path(v).expanduser().exists():
            raise ValueError(f"dataset file {v!r} does not exist")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # A classification task dumps as it did before causal-LM tasks existed, so its run names (hashes of the
        # dump) and so its stored runs stay the same.
        data = handler(self)
        if self.kind != CAUSAL_LM and isinstance(data, dict):
            for key in ("kind", *_LM_ONLY):
                data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _kind_fields(self) -> "TaskConfig":
        if self.kind == CAUSAL_LM:
            for field, default in (("classes", None), ("samples_per_class", None), ("transforms", [])):
                if getattr(self, field) != default:
                    raise ValueError(f"{field}: a causal_lm task has no classes or input transforms; remove it "
                                     f"(cap its size with max_train_blocks)")
        return self

    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.kind == CAUSAL_LM:
            return self.dataset if self.dataset in BUILTIN_CORPORA else Path(self.dataset.rstrip("/")).stem
        base = self.dataset if self.dataset in BUILTIN_DATASETS else Path(self.dataset).stem
        cls_part = "all" if self.classes is None else "-".join(str(c) for c in self.classes)
        extra = "".join(f"_{t.kind}{t.seed}" for t in self.transforms)
        return f"{base}_{cls_part}{extra}"

