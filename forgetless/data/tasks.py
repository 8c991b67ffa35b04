"""Build labelled tasks (train/val/test tensors) from datasets, class subsets and input transforms.

Everything here is deterministic given the task config, so every Ray worker rebuilds exactly the same task locally
instead of shipping arrays around (the built-in data is small; user files are read from a path or s3://).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from forgetless.data import lm
from forgetless.data.kinds import CAUSAL_LM, CLASSIFICATION
from forgetless.data.raw import BUILTIN_DATASETS, load_raw_dataset
from forgetless.data.spec import TaskConfig, TaskTransform

__all__ = ["BUILTIN_DATASETS", "TaskData", "build_stream", "build_task", "load_raw_dataset", "reshape_like"]


@dataclass
class TaskData:
    """One task's splits. Classification: `y_*` are local labels 0..C-1, `classes[i]` is the dataset's class id of local
    label i. Causal LM (`kind`, data/kinds.py): `x_*` token blocks (N, 1, L), `y_*` the same ids (N, L), no classes;
    its "classes" are the vocabulary (`vocab_size`)."""

    name: str
    classes: list[int]
    input_shape: tuple[int, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    kind: str = CLASSIFICATION
    vocab_size: int | None = None

    @property
    def num_classes(self) -> int:
        """Outputs of the task's head: its classes, or a language model's vocabulary."""
        return self.vocab_size if self.vocab_size is not None else len(self.classes)

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")


# ---------------------------------------------------------------------------------------------------------------------
# transforms that make task variants


def _apply_transform(x: np.ndarray, t: TaskTransform) -> np.ndarray:
    rng = np.random.default_rng(t.seed)
    if t.kind == "permute":
        flat = x.reshape(len(x), -1)
        perm = rng.permutation(flat.shape[1])
        return flat[:, perm].reshape(x.shape)
    if t.kind == "noise":
        return (x + rng.normal(0.0, t.std * float(x.std()), size=x.shape)).astype(np.float32)
    if t.kind == "rotate":
        if x.ndim != 4:
            raise ValueError("rotate applies to 2-D images only")
        from scipy.ndimage import rotate  # deferred: scipy.ndimage takes ~0.6 s to import; only rotations need it

        return rotate(x, t.degrees, axes=(2, 3), reshape=False, order=1).astype(np.float32)
    if t.kind == "resample":
        flat = x.reshape(len(x), -1)
        src = np.linspace(0.0, 1.0, flat.shape[1])
        dst = np.linspace(0.0, 1.0, t.length)
        out = np.stack([np.interp(dst, src, row) for row in flat]).astype(np.float32)
        return out[:, None, :]
    raise ValueError(f"unknown transform {t.kind!r}")


def reshape_like(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reshape flat-compatible inputs (e.g. resampled MNIST-1D of length 64 into 1x8x8 to feed a digits backbone)."""
    if x.shape[1:] == tuple(shape):
        return x
    if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        raise ValueError(f"cannot reshape inputs of shape {x.shape[1:]} to {shape}")
    return x.reshape((len(x), *shape))


# ---------------------------------------------------------------------------------------------------------------------


def _stratified_split(y: np.ndarray, val: float, test: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tr, va, te = [], [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_te = max(1, int(round(test * len(idx))))
        n_va = max(1, int(round(val * len(idx))))
        te.append(idx[:n_te])
        va.append(idx[n_te : n_te + n_va])
        tr.append(idx[n_te + n_va :])
    return tuple(np.sort(np.concatenate(p)) for p in (tr, va, te))  # type: ignore[return-value]


def build_lm_task(cfg: TaskConfig) -> TaskData:
    """A causal-LM task: documents split by document (seeded), tokenised with the task's tokenizer, packed in blocks."""
    if cfg.tokenizer is None:
        raise ValueError(f"task {cfg.display_name()!r}: a causal_lm task needs a tokenizer folder (tokenizer: PATH, "
                         f"or an hf: backbone whose folder holds one)")
    docs = lm.load_documents(cfg.dataset, cfg.text_field)
    tok = lm.load_lm_tokenizer(cfg.tokenizer)
    parts = lm.split_documents(len(docs), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    splits = {}
    for name, idx, limit in zip(("train", "val", "test"), parts,
                                (cfg.max_train_blocks, cfg.max_eval_blocks, cfg.max_eval_blocks)):
        blocks = lm.pack(lm.tokenize_documents([docs[i] for i in idx], tok), tok.eos_token_id, cfg.block_size)
        if len(blocks) == 0:
            raise ValueError(f"task {cfg.display_name()!r}: its {name} documents hold fewer than block_size "
                             f"({cfg.block_size}) tokens; lower block_size or give more text")
        splits[name] = lm.take_blocks(blocks, limit, cfg.split_seed + 1)
    ids = {k: torch.from_numpy(v) for k, v in splits.items()}
    return TaskData(name=cfg.display_name(), classes=[], input_shape=(1, cfg.block_size),
                    x_train=ids["train"][:, None].float(), y_train=ids["train"],
                    x_val=ids["val"][:, None].float(), y_val=ids["val"],
                    x_test=ids["test"][:, None].float(), y_test=ids["test"], kind=CAUSAL_LM, vocab_size=len(tok))


def build_task(cfg: TaskConfig, input_shape: tuple[int, ...] | None = None) -> TaskData:
    """Build a task deterministically from its config. `input_shape` reshapes inputs to match a backbone's input."""
    if cfg.kind == CAUSAL_LM:
        return build_lm_task(cfg)
    x, y = load_raw_dataset(cfg.dataset)
    classes = sorted(int(c) for c in np.unique(y)) if cfg.classes is None else list(cfg.classes)
    missing = [c for c in classes if not np.any(y == c)]
    if missing:
        raise ValueError(f"task {cfg.display_name()!r}: classes {missing} do not occur in {cfg.dataset!r}")
    keep = np.isin(y, classes)
    x, y = x[keep], y[keep]
    local = np.searchsorted(np.array(classes), y) if classes == sorted(classes) else np.array(
        [classes.index(int(v)) for v in y]
    )
    for t in cfg.transforms:
        x = _apply_transform(x, t)
    if input_shape is not None:
        x = reshape_like(x, input_shape)
    tr, va, te = _stratified_split(local, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    if cfg.samples_per_class is not None:
        rng = np.random.default_rng(cfg.split_seed + 1)
        tr = np.sort(
            np.concatenate(
                [rng.permutation(tr[local[tr] == c])[: cfg.samples_per_class] for c in range(len(classes))]
            )
        )
    as_x = lambda idx: torch.from_numpy(np.ascontiguousarray(x[idx]))  # noqa: E731
    as_y = lambda idx: torch.from_numpy(local[idx].astype(np.int64))  # noqa: E731
    return TaskData(
        name=cfg.display_name(),
        classes=classes,
        input_shape=tuple(x.shape[1:]),
        x_train=as_x(tr),
        y_train=as_y(tr),
        x_val=as_x(va),
        y_val=as_y(va),
        x_test=as_x(te),
        y_test=as_y(te),
    )


def build_stream(source: TaskConfig, targets: list[TaskConfig]) -> list[TaskData]:
    """Source first, then targets; every target is reshaped to the source's input shape so one backbone reads all."""
    src = build_task(source)
    return [src] + [build_task(t, input_shape=None if t.kind == CAUSAL_LM else src.input_shape) for t in targets]
