"""Text tasks for Hugging Face backbones: tokenise texts with the model folder's own tokenizer into a task file.

A forgetless task holds tensors, so text is tokenised once, before training, into a `.npz` task file that any `dataset:`
field accepts (a local path or s3://):

    x: float32 (N, 2, L)  channel 0 = token ids, channel 1 = attention mask (1 = token, 0 = padding; right padding)
    y: int64   (N,)       class labels

(ids are stored as float32 because every task tensor is; ids below 2**24 are exact, i.e. every real vocabulary.)
The `hf:` backbone reads this layout. Sources of texts:
- a Parquet file (path or s3://) with a `text` column and a `label` column;
- the built-in `docstrings` task: real English text that ships with Python itself, the docstrings of the public
  functions of a few standard-library modules, labelled by module (no download).

Command line:  python -m forgetless.data.text --model DIR --out task.npz (--parquet FILE | --builtin docstrings)
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from forgetless.storage import check_model_folder, local_folder, read_bytes, write_bytes

# Modules whose public callables have real, stable docstrings; the label is the module's index here.
DOCSTRING_MODULES = ("math", "os", "inspect", "socket", "statistics", "os.path")


def docstring_texts(modules: Sequence[str] = DOCSTRING_MODULES, per_class: int = 30) -> tuple[list[str], np.ndarray]:
    """(texts, labels): the first paragraph of the docstrings of each module's public callables, label = module index.
    Deterministic (sorted names), at most `per_class` per module."""
    texts, labels = [], []
    for label, name in enumerate(modules):
        mod = importlib.import_module(name)
        n = 0
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr)
            if not callable(obj):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            text = " ".join(doc.split("\n\n")[0].split())
            if len(text) < 20:
                continue
            texts.append(text)
            labels.append(label)
            n += 1
            if n >= per_class:
                break
    return texts, np.asarray(labels, dtype=np.int64)


def load_tokenizer(model: str):
    """The tokenizer saved in a model folder (local path or s3://), loaded offline; padding made explicit."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer  # deferred: optional, ~3 s to import, and only after HF_HUB_OFFLINE is set

    check_model_folder(model)
    tok = AutoTokenizer.from_pretrained(local_folder(model), local_files_only=True)
    if tok.pad_token is None:
        # GPT-2-style tokenizers have no pad token; the attention mask (not the id) marks padding, so eos will do.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    tok.padding_side = "right"  # the backbone's `last` pooling reads the last kept position
    return tok


def tokenize(texts: Sequence[str], model: str, max_length: int = 64) -> np.ndarray:
    """Texts -> float32 (N, 2, max_length): token ids and attention mask, padded/truncated to max_length."""
    tok = load_tokenizer(model)
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    if ids.max() >= 2**24:
        raise ValueError(f"token id {ids.max()} does not fit exactly in float32")
    return np.stack([ids, enc["attention_mask"]], axis=1).astype(np.float32)


def read_parquet_texts(uri: str) -> tuple[list[str], np.ndarray]:
    import pyarrow.parquet as pq  # deferred: only Parquet sources need it

    table = pq.read_table(io.BytesIO(read_bytes(uri)))
    for col in ("text", "label"):
        if col not in table.column_names:
            raise ValueError(f"{uri}: a text dataset needs columns 'text' and 'label'; found {table.column_names}")
    return [str(t) for t in table.column("text").to_pylist()], table.column("label").to_numpy().astype(np.int64)


def write_text_task(texts: Sequence[str], labels: np.ndarray, model: str, out: str, max_length: int = 64) -> str:
    """Tokenise with `model`'s tokenizer and write the task file `out` (.npz; a path or s3://)."""
    if not out.endswith(".npz"):
        raise ValueError(f"{out}: the task file must end in .npz")
    x = tokenize(texts, model, max_length)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=np.asarray(labels, dtype=np.int64))
    write_bytes(out if out.startswith("s3://") else str(Path(out).expanduser().resolve()), buf.getvalue())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m forgetless.data.text", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model folder (path or s3://) whose tokenizer to use")
    ap.add_argument("--out", required=True, help="task file to write (.npz, path or s3://)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--parquet", help="Parquet file with 'text' and 'label' columns")
    src.add_argument("--builtin", choices=["docstrings"], help="a built-in text task")
    ap.add_argument("--max-length", type=int, default=64)
    a = ap.parse_args(argv)
    texts, labels = read_parquet_texts(a.parquet) if a.parquet else docstring_texts()
    write_text_task(texts, labels, a.model, a.out, a.max_length)
    print(f"wrote {a.out}: {len(texts)} texts, {len(set(labels.tolist()))} classes, max_length {a.max_length}")


if __name__ == "__main__":
    main()
