"""General-ability suites: `eval_tasks:` of a config, tasks that are never trained, scored at every evaluation point.

Two kinds:
- a held-out corpus (a `causal_lm` task, data/spec.py TaskConfig): next-token accuracy, mean token loss and
  perplexity on its validation blocks (curves) and its test blocks (the rows of R);
- `multiple_choice` (data/mc_tasks.py): a built-in suite or a JSONL file, scored by the log-likelihood of each choice
  (acc and length-normalised acc_norm); it has no splits, so curves and rows score the same items.

Both are read by the source's output (head 0: the pre-trained model's own vocabulary bias), so they measure what the
model keeps of its general ability while it learns the targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from forgetless.data import mc_tasks
from forgetless.data.kinds import CAUSAL_LM
from forgetless.data.spec import TaskConfig

MULTIPLE_CHOICE = "multiple_choice"


class ChoiceTaskConfig(BaseModel):
    """A multiple-choice suite in the lm-evaluation-harness style, scored by the log-likelihood of each choice."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: Literal["multiple_choice"] = Field(description="multiple_choice: context, choices and gold per item")
    dataset: str = Field(..., description="stdlib_docstrings (built in: 314 items on Python 3.11.7, 4 choices, chance "
                                          "25%) or a .jsonl file / s3:// URI of {context, choices, gold} lines")
    name: str | None = Field(None, description="defaults to the dataset's name")
    max_items: int | None = Field(None, gt=0, description="score a seeded subset of at most this many items")
    max_tokens: int = Field(128, ge=8, le=65536, description="context + choice tokens per scored sequence (the "
                                                             "context is cut from the left); at most the model's "
                                                             "context length")
    tokenizer: str | None = Field(None, description="tokenizer folder; default: the hf: backbone's model folder")

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str) -> str:
        problem = mc_tasks.builtin_or_file(v)
        if problem:
            raise ValueError(problem)
        return v

    def display_name(self) -> str:
        return self.name or (self.dataset if self.dataset in mc_tasks.BUILTIN_SUITES else
                             self.dataset.rstrip("/").rsplit("/", 1)[-1].removesuffix(".jsonl"))


def _eval_kind(v) -> str:
    kind = v.get("kind") if isinstance(v, dict) else getattr(v, "kind", None)
    return MULTIPLE_CHOICE if kind == MULTIPLE_CHOICE else "corpus"


EvalTaskConfig = Annotated[Annotated[ChoiceTaskConfig, Tag(MULTIPLE_CHOICE)] | Annotated[TaskConfig, Tag("corpus")],
                           Discriminator(_eval_kind)]


def check_eval_tasks(eval_tasks: list, stream_names: list[str], stream_kind: str, tokenizer: str | None) -> None:
    """The config's checks of `eval_tasks:` (ValueError naming the field and the fix); fills each one's tokenizer with
    the stream's (the backbone folder's) where it names none."""
    if not eval_tasks:
        return
    if stream_kind != CAUSAL_LM:
        raise ValueError("eval_tasks: general-ability suites score a language model; this stream is classification "
                         "(remove eval_tasks, or make every task kind: causal_lm)")
    names = [t.display_name() for t in eval_tasks]
    clash = sorted({n for n in names if names.count(n) > 1 or n in stream_names})
    if clash:
        raise ValueError(f"eval_tasks: names must differ from each other and from the stream's tasks, repeated: "
                         f"{clash} (set `name:`)")
    for t in eval_tasks:
        if isinstance(t, TaskConfig) and t.kind != CAUSAL_LM:
            raise ValueError(f"eval_tasks: {t.display_name()!r} is a {t.kind} task; an eval task is a held-out "
                             f"corpus (kind: causal_lm) or kind: multiple_choice")
        if t.tokenizer is None:
            t.tokenizer = tokenizer


@dataclass
class EvalSuite:
    """A built eval task: `corpus` (a causal-LM TaskData) or `choices` (tokenised multiple-choice sequences)."""

    name: str
    corpus: object = None  # TaskData
    choices: mc_tasks.ChoiceSequences | None = None

    @property
    def kind(self) -> str:
        return MULTIPLE_CHOICE if self.choices is not None else CAUSAL_LM


def build_eval_suites(eval_tasks: list) -> list[EvalSuite]:
    """Every eval task built, deterministically (every worker builds the same)."""
    from forgetless.data.lm import load_lm_tokenizer  # deferred: transformers
    from forgetless.data.tasks import build_lm_task

    suites = []
    for t in eval_tasks:
        if isinstance(t, ChoiceTaskConfig):
            items = mc_tasks.load_items(t.dataset, t.max_items)
            seqs = mc_tasks.tokenize_items(t.display_name(), items, load_lm_tokenizer(t.tokenizer), t.max_tokens)
            suites.append(EvalSuite(t.display_name(), choices=seqs))
        else:
            suites.append(EvalSuite(t.display_name(), corpus=build_lm_task(t)))
    return suites

