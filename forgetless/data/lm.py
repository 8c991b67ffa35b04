"""Causal-LM tasks: documents of text -> deterministic split by document -> tokens -> fixed-length blocks.

Documents come from a built-in corpus that ships with Python itself (no download), or from user files, a local path
or s3://:
- `prose`: English prose, Python's documentation topics (`pydoc_data.topics`, the text `help('TOPIC')` prints: one
  document per topic) and the docstrings of half of the standard-library modules (one document per module; read with
  `ast`, nothing is imported);
- `python_code`: Python source code, the other half of the standard-library modules (one document per file), so the two
  corpora never share a module;
- `python_tests`: test code, every fourth of the standard library's test files (`test/test_*.py`), a third style of
  text for streams of three corpora (prose -> code -> tests);
- `.txt` (documents separated by blank lines), `.jsonl` (one JSON object per line, its `text` field), `.parquet` (a
  `text` column), or a `datasets.save_to_disk` folder (its Arrow files' `text` column; read with pyarrow, the
  `datasets` package is not needed). `text_field` renames the field.

Splits are by document (seeded), before tokenisation, so no document straddles train and test. Each split's documents
are tokenised with the tokenizer of the task (a Hugging Face tokenizer folder, normally the model folder), joined with
the end-of-text token and cut into blocks of `block_size` tokens (the remainder is dropped). A task then holds:

    x: float32 (N, 1, block_size)  token ids (exact below 2**24: every real vocabulary), the layout `hf:` backbones read
    y: int64   (N, block_size)     the same ids: position t is scored on token t+1 (`data.kinds`)
"""
from __future__ import annotations

import ast
import functools
import io
import json
import os
import sysconfig
from pathlib import Path
from typing import Callable

import numpy as np

from forgetless.storage import is_s3, list_files, read_bytes

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _stdlib_modules() -> list[Path]:
    """The standard library's top-level modules (sorted), without the ones that act on import (`this` prints,
    `antigravity` opens a browser): they are only read as text here, but the corpus should not depend on them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.glob("*.py")) if p.stem not in ("this", "antigravity", "__phello__")]


def _module_docstrings(path: Path) -> str:
    """The module's, classes' and functions' docstrings of one source file, in file order, blank-line separated."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except SyntaxError:  # a test file of the stdlib that is deliberately broken
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d)


@functools.lru_cache(maxsize=None)
def prose_documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics  # deferred: 0.5 MB of text, only this corpus needs it

    docs = [topics[k] for k in sorted(topics)]
    docs += [d for d in (_module_docstrings(p) for p in _stdlib_modules()[0::2]) if len(d) > 200]
    return tuple(docs)


@functools.lru_cache(maxsize=None)
def python_code_documents() -> tuple[str, ...]:
    return tuple(p.read_text(encoding="utf-8", errors="replace") for p in _stdlib_modules()[1::2])


@functools.lru_cache(maxsize=None)
def python_tests_documents() -> tuple[str, ...]:
    """Test code: every fourth of the standard library's own test files (`test/test_*.py`, one document per file);
    unittest classes and assertions, a style neither `prose` nor `python_code` holds (their modules are top-level
    `*.py` files, never under `test/`)."""
    tests = sorted((Path(sysconfig.get_paths()["stdlib"]) / "test").glob("test_*.py"))
    return tuple(p.read_text(encoding="utf-8", errors="replace") for p in tests[0::4])


BUILTIN_CORPORA: dict[str, Callable[[], tuple[str, ...]]] = {"prose": prose_documents,
                                                             "python_code": python_code_documents,
                                                             "python_tests": python_tests_documents}


def is_text_source(dataset: str) -> bool:
    """A built-in corpus, a text file of a known kind, or a folder (`save_to_disk`) / s3:// prefix."""
    return dataset in BUILTIN_CORPORA or dataset.endswith(TEXT_SUFFIXES) or is_s3(dataset) or Path(
        dataset).expanduser().is_dir()


# ---------------------------------------------------------------------------------------------------------------------
# reading documents


def load_documents(dataset: str, text_field: str = "text") -> list[str]:
    """Every document of a corpus, in a deterministic order."""
    if dataset in BUILTIN_CORPORA:
        return list(BUILTIN_CORPORA[dataset]())
    if dataset.endswith(TEXT_SUFFIXES):
        return _documents_of_file(dataset, read_bytes(dataset), text_field)
    files = list_files(dataset) if is_s3(dataset) else list_files(str(Path(dataset).expanduser()))
    arrow = [f for f in files if f.endswith(".arrow")]
    if not arrow:
        raise ValueError(f"{dataset}: not a text file ({', '.join(TEXT_SUFFIXES)}) and no datasets.save_to_disk "
                         f"folder (no .arrow files under it)")
    return [d for f in arrow for d in _arrow_texts(f, read_bytes(f), text_field)]


def _documents_of_file(name: str, raw: bytes, text_field: str) -> list[str]:
    if name.endswith(".txt"):
        text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
        return [d.strip() for d in text.split("\n\n") if d.strip()]
    if name.endswith(".jsonl"):
        rows = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
        missing = [i for i, r in enumerate(rows) if text_field not in r]
        if missing:
            raise ValueError(f"{name}: line {missing[0] + 1} has no field {text_field!r} (set text_field)")
        return [str(r[text_field]) for r in rows]
    import pyarrow.parquet as pq  # deferred: only Parquet sources need it

    table = pq.read_table(io.BytesIO(raw))
    return _column(name, table, text_field)


def _arrow_texts(name: str, raw: bytes, text_field: str) -> list[str]:
    import pyarrow as pa  # deferred: only save_to_disk folders need it

    # datasets.save_to_disk writes Arrow IPC *stream* files (data-00000-of-00001.arrow)
    table = pa.ipc.open_stream(io.BytesIO(raw)).read_all()
    return _column(name, table, text_field)


def _column(name: str, table, text_field: str) -> list[str]:
    if text_field not in table.column_names:
        raise ValueError(f"{name}: no column {text_field!r}; columns {table.column_names} (set text_field)")
    return [str(t) for t in table.column(text_field).to_pylist() if t]


# ---------------------------------------------------------------------------------------------------------------------
# split, tokenise, pack


def split_documents(n: int, val: float, test: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the train/val/test documents: a seeded permutation, at least one document per split."""
    if n < 3:
        raise ValueError(f"a causal-LM task needs at least 3 documents (one per split); got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_te = max(1, int(round(test * n)))
    n_va = max(1, int(round(val * n)))
    return np.sort(perm[n_te + n_va:]), np.sort(perm[n_te:n_te + n_va]), np.sort(perm[:n_te])


def pack(token_lists: list[list[int]], eos_id: int, block_size: int) -> np.ndarray:
    """Documents' tokens joined with `eos_id` after each, cut into (N, block_size) blocks; the remainder is dropped."""
    flat = np.fromiter((t for ids in token_lists for t in (*ids, eos_id)), dtype=np.int64)
    n = len(flat) // block_size
    return flat[: n * block_size].reshape(n, block_size)


def take_blocks(blocks: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` blocks, a seeded choice kept in corpus order (None: all)."""
    if limit is None or len(blocks) <= limit:
        return blocks
    return blocks[np.sort(np.random.default_rng(seed).choice(len(blocks), limit, replace=False))]


def load_lm_tokenizer(folder: str):
    """A Hugging Face tokenizer saved in a folder (local or s3://), offline; it must have an end-of-text token."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer  # deferred: optional, ~3 s to import, and only after HF_HUB_OFFLINE is set

    from forgetless.storage import local_folder

    tok = AutoTokenizer.from_pretrained(local_folder(folder), local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"{folder}: the tokenizer has no end-of-text (eos) token to separate documents")
    return tok


def tokenize_documents(docs: list[str], tokenizer) -> list[list[int]]:
    return tokenizer(docs, add_special_tokens=False)["input_ids"]


def train_tokenizer(docs: list[str], vocab_size: int, out: str | os.PathLike):
    """A GPT-2-style byte-level BPE tokenizer trained offline (Hugging Face `tokenizers`) on `docs`, saved in `out` as a
    `PreTrainedTokenizerFast` (tokenizer.json + tokenizer_config.json); end-of-text token `<|endoftext|>` (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # deferred: optional
    from transformers import PreTrainedTokenizerFast  # deferred: optional

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   model_max_length=1_000_000)
    fast.save_pretrained(str(out))
    return fast
