"""Multiple-choice tasks in the lm-evaluation-harness style: a context, choices, the index of the right one (`gold`).

A causal language model answers by the log-likelihood of each choice's tokens after the context (`acc`: the most likely
choice is gold) and by that log-likelihood divided by the choice's length in characters (`acc_norm`, the harness's
length-normalised accuracy, which does not favour short choices).

Items come from a JSONL file (one object per line: {"context": str, "choices": [str, ...], "gold": int}) or from the
built-in suite `stdlib_docstrings`, made offline from the Python that runs forgetless:

    stdlib_docstrings (version 1): for each public top-level function or class of the standard-library modules that
    the `prose` corpus reads docstrings from (every other top-level module, data/lm.py), not named like its module,
    whose docstring is at least 40 characters and does not name it, and whose module has at least 4 public top-level
    names: the context is the first paragraph of the docstring (whitespace collapsed, at most 300 characters) and
    the question "Which name of module M does it document?"; the choices are the name and 3 other public names of the
    same module (seeded by the version, in a seeded order). 4 choices: chance is 25 %. Python 3.11.7 gives 314 items
    (digest 7982a9fc1797). The `python_code` corpus never holds those modules, so training on it cannot teach the
    answers (the `python_tests` corpus may: it tests every part of the standard library). The items depend on the
    Python version: `suite_digest` names the exact set (two runs scored the same questions when their digests agree).

Tokenised, a task is a set of sequences (one per item and choice): context tokens (cut from the left to fit
`max_tokens`) then choice tokens, right-padded with the end-of-text token (a causal model never reads the padding that
follows what it scores).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from forgetless.storage import read_bytes

SUITE_VERSION = 1
CHOICES = 4
BUILTIN_SUITES = ("stdlib_docstrings",)


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    gold: int


def _public_defs(tree: ast.Module) -> list[ast.AST]:
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return [n for n in tree.body if isinstance(n, kinds) and not n.name.startswith("_")]


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())[:300]


def _module_items(module: str, tree: ast.Module, rng: np.random.Generator) -> list[ChoiceItem]:
    defs = _public_defs(tree)
    names = sorted({n.name for n in defs})
    if len(names) < CHOICES:
        return []
    items = []
    for node in defs:
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 40 or node.name == module or re.search(rf"\b{re.escape(node.name)}\b", doc):
            continue
        others = [n for n in names if n != node.name]
        picked = [node.name] + [others[i] for i in rng.choice(len(others), CHOICES - 1, replace=False)]
        order = rng.permutation(CHOICES)
        choices = tuple(f" {picked[i]}" for i in order)
        context = (f'Module {module}. Docstring: "{_first_paragraph(doc)}"\n'
                   f"Which name of module {module} does it document? Answer:")
        items.append(ChoiceItem(context, choices, int(np.flatnonzero(order == 0)[0])))
    return items


@functools.cache
def stdlib_docstring_items() -> tuple[ChoiceItem, ...]:
    """The built-in suite (version `SUITE_VERSION`), deterministic for a given Python: see the module docstring."""
    from forgetless.data.lm import _stdlib_modules  # the same module list (and half) the prose corpus reads

    rng = np.random.default_rng(SUITE_VERSION)
    items: list[ChoiceItem] = []
    for path in _stdlib_modules()[0::2]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        items += _module_items(path.stem, tree, rng)
    return tuple(items)


def read_jsonl_items(name: str, raw: bytes) -> list[ChoiceItem]:
    """Items of a JSONL file; a malformed line is a ValueError naming the line and what is wrong."""
    items = []
    for number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        choices, gold = row.get("choices"), row.get("gold")
        if not isinstance(row.get("context"), str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{name}: line {number} needs a string context and a list of at least 2 non-empty "
                             f"string choices")
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ValueError(f"{name}: line {number}: gold must be the index of the right choice (0 to "
                             f"{len(choices) - 1}), got {gold!r}")
        items.append(ChoiceItem(row["context"], tuple(choices), gold))
    if not items:
        raise ValueError(f"{name}: no items")
    return items


def load_items(dataset: str, max_items: int | None, seed: int = 0) -> list[ChoiceItem]:
    """The items of a suite: built-in by name, or a JSONL path / s3:// URI; at most `max_items` (a seeded choice kept in
    file order)."""
    items = list(stdlib_docstring_items()) if dataset in BUILTIN_SUITES else read_jsonl_items(dataset,
                                                                                               read_bytes(dataset))
    if max_items is not None and len(items) > max_items:
        keep = np.sort(np.random.default_rng(seed).choice(len(items), max_items, replace=False))
        items = [items[i] for i in keep]
    return items


def suite_digest(items: list[ChoiceItem]) -> str:
    """A short hash of a suite's items: two runs scored the same questions exactly when their digests agree."""
    text = json.dumps([[i.context, list(i.choices), i.gold] for i in items])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class ChoiceSequences:
    """A tokenised multiple-choice task: one row per (item, choice)."""

    name: str
    tokens: torch.Tensor  # (S, L) int64, right-padded with the end-of-text token
    start: torch.Tensor  # (S,) position of the first choice token
    end: torch.Tensor  # (S,) one past the last choice token
    item: torch.Tensor  # (S,) the item of each row
    chars: torch.Tensor  # (S,) float64, the choice's length in characters (acc_norm)
    gold: torch.Tensor  # (I,) the right choice's row of each item
    digest: str


def tokenize_items(name: str, items: list[ChoiceItem], tokenizer, max_tokens: int) -> ChoiceSequences:
    rows, starts, owners, chars, gold = [], [], [], [], []
    for i, item in enumerate(items):
        ctx = tokenizer(item.context, add_special_tokens=False)["input_ids"]
        for c, choice in enumerate(item.choices):
            ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if len(ids) >= max_tokens:
                raise ValueError(f"eval task {name!r}: a choice of item {i} is {len(ids)} tokens, max_tokens is "
                                 f"{max_tokens}; raise max_tokens")
            keep = ctx[-(max_tokens - len(ids)):]
            if c == item.gold:
                gold.append(len(rows))
            rows.append(keep + ids)
            starts.append(len(keep))
            owners.append(i)
            chars.append(len(choice))
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), tokenizer.eos_token_id, dtype=torch.long)
    for r, ids in enumerate(rows):
        tokens[r, : len(ids)] = torch.tensor(ids)
    return ChoiceSequences(name, tokens, torch.tensor(starts), torch.tensor([len(r) for r in rows]),
                           torch.tensor(owners), torch.tensor(chars, dtype=torch.float64), torch.tensor(gold),
                           suite_digest(items))


def choice_scores(loglik: torch.Tensor, seqs: ChoiceSequences) -> dict[str, float]:
    """acc and acc_norm from every row's summed log-likelihood (float64, (S,)): per item, the arg-max choice (ties go to
    the first) against gold."""
    n_items = len(seqs.gold)
    acc = norm = 0
    for i in range(n_items):
        rows = torch.nonzero(seqs.item == i).flatten()
        acc += int(rows[torch.argmax(loglik[rows])] == seqs.gold[i])
        norm += int(rows[torch.argmax(loglik[rows] / seqs.chars[rows])] == seqs.gold[i])
    return {"acc": acc / n_items, "acc_norm": norm / n_items}


def sequence_loglik(logits: torch.Tensor, tokens: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's tokens [start, end) given what precedes them: position p's logits score
    token p+1. logits (B, L, V), tokens (B, L); returns (B,) float64."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    pos = torch.arange(1, tokens.shape[1], device=tokens.device)[None, :]
    scored = (pos >= start[:, None]) & (pos < end[:, None])
    return (logp * scored).sum(1)


def builtin_or_file(dataset: str) -> str | None:
    """None when `dataset` names a built-in suite or an existing .jsonl file (or s3://); else what is wrong."""
    if dataset in BUILTIN_SUITES or dataset.startswith("s3://"):
        return None
    if not dataset.endswith(".jsonl"):
        return f"unknown multiple-choice suite {dataset!r}: use one of {list(BUILTIN_SUITES)} or a .jsonl file"
    if not Path(dataset).expanduser().exists():
        return f"multiple-choice file {dataset!r} does not exist"
    return None
