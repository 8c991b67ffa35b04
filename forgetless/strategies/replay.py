"""replay — experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning"; Rolnick et al.
2019, "Experience Replay for Continual Learning"), and for language models the data mixing users are advised against
forgetting: a share of general text in every batch.

Classifiers: a memory of earlier tasks' *training* examples (`memory_size` examples over the whole stream, chosen by
reservoir sampling or class-balanced) is mixed into every micro-batch of the task in training: with share s, a batch of
b examples of the task gets b·s/(1−s) replayed ones (fractions carried over to the next batch, so the share is exact
over an epoch). Each replayed example is scored by its own task's head (task-incremental training: the loss of an
example is the cross-entropy over its own head's classes), so the shared backbone keeps serving the old heads.
Language models: every block of a replayed corpus (`replay_tasks`, default: the earlier tasks, so the source) has the
block length of the task in training, so the share of blocks is the share of tokens; the replayed blocks train through
the task's own output (data mixing: one model, mixed text).

The memory never holds a validation or test example: it is filled from `TrainingData.splits`, the training splits only.
It is a list of (task, index into that task's training split) pairs, the same on every rank (a deterministic function
of the seed and the stream), kept as buffers in `model.extras` so that every checkpoint saves it and a resumed run
restores it exactly; each rank replays only its own disjoint slice of it, so no example is replayed by two workers.
It changes the data, not the weights: it works under every ZeRO stage and on ZeRO-3 partitions.

Deviation, documented: earlier heads stay frozen (the project keeps old heads frozen so their accuracy stays
measurable): replayed examples train the backbone through their own frozen head, and the current task's head.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from forgetless.data.kinds import CAUSAL_LM, CLASSIFICATION, task_loss
from forgetless.data.sharding import derive_seed, rank_slice
from forgetless.strategies import register
from forgetless.strategies._phases import finetune_phase
from forgetless.strategies.base import Phase, Strategy, StrategyParams, TaskInfo, TrainingData

MEMORY = "replay_memory"


class ReplayParams(StrategyParams):
    share: float = Field(0.25, ge=0.0, lt=1.0, description=(
        "fraction of every training micro-batch that is replayed (causal_lm: of its tokens, blocks being of equal "
        "length); 0 = plain fine-tuning; typical 0.01-0.5"))
    memory_size: int | None = Field(200, gt=0, description=(
        "examples the memory keeps over the whole stream, split across workers (each replays only its own part); "
        "None = every training example of the replayed tasks (a general corpus mixed in whole)"))
    selection: Literal["reservoir", "class_balanced"] = Field("reservoir", description=(
        "how the memory chooses examples: reservoir (a uniform sample of every replayed example seen so far) or "
        "class_balanced (equal numbers per task and class; classification only)"))
    replay_tasks: list[str] | None = Field(None, description=(
        "names of the stream's tasks to replay, e.g. [prose] to mix a general corpus into every other task; None = "
        "every task trained before the current one, the source included"))
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=10.0, description="backbone lr = scale x lr (typical 0.01-1)")


class ReplayMemory(nn.Module):
    """The memory as buffers (so checkpoints save it): slot i holds example `index[i]` of task `task[i]`'s training
    split (−1: empty); `seen` counts the examples the reservoir has seen; `admitted[j]`: task j's examples were
    offered to the memory."""

    def __init__(self, size: int, n_tasks: int):
        super().__init__()
        self.register_buffer("task", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("admitted", torch.zeros(n_tasks, dtype=torch.long))

    def entries(self) -> torch.Tensor:
        """(n, 2) the filled slots' (task, index), in slot order."""
        full = self.task >= 0
        return torch.stack([self.task[full], self.index[full]], dim=1).cpu()


def reservoir_admit(memory: ReplayMemory, task: int, n: int, seed: int) -> None:
    """Offer the n training examples of `task` to the reservoir (in a seeded order): the memory stays a uniform sample
    of every example offered so far (Vitter's algorithm R), drawn with a generator seeded by (seed, task)."""
    g = torch.Generator().manual_seed(derive_seed(seed, task, 1))
    order = torch.randperm(n, generator=g)
    size = len(memory.task)
    count = int(memory.seen) + torch.arange(1, n + 1)  # the reservoir's count as each example arrives
    slot = (torch.rand(n, generator=g, dtype=torch.float64) * count).long()  # uniform in [0, count)
    slot = torch.where(count <= size, count - 1, slot)  # while not full, each example takes the next free slot
    for i in torch.nonzero(slot < size).flatten().tolist():  # later examples overwrite earlier ones
        memory.task[slot[i]] = task
        memory.index[slot[i]] = order[i]
    memory.seen += n


def class_balanced_fill(memory: ReplayMemory, labels: dict[int, torch.Tensor], seed: int) -> None:
    """Refill the memory with an equal share of every (task, class) of the admitted tasks (the first groups get one
    more while the size does not divide): each group keeps the head of its own seeded order, so a class's examples
    shrink to a subset of what it kept before as new tasks arrive."""
    groups = [(j, c) for j in sorted(labels) for c in torch.unique(labels[j]).tolist()]
    size = len(memory.task)
    quota = [size // len(groups) + (1 if g < size % len(groups) else 0) for g in range(len(groups))]
    chosen = []
    for (j, c), q in zip(groups, quota):
        members = torch.nonzero(labels[j] == c).flatten()
        order = members[torch.randperm(len(members), generator=torch.Generator().manual_seed(derive_seed(seed, j, c)))]
        chosen += [(j, i) for i in order[:q].tolist()]
    memory.task.fill_(-1)
    memory.index.fill_(-1)
    for s, (j, i) in enumerate(chosen):
        memory.task[s], memory.index[s] = j, i


@register
class Replay(Strategy):
    name = "replay"
    paper = ("Chaudhry et al., On Tiny Episodic Memories in Continual Learning (2019); Rolnick et al., Experience "
             "Replay for Continual Learning (NeurIPS 2019)")
    fidelity = "confirmed"
    task_kinds = (CLASSIFICATION, CAUSAL_LM)
    Config = ReplayParams
    has_per_task_parts = True  # per-task heads
    max_zero_stage = 3
    works_on_partitions = True  # it changes the data, not the weights: no hook reads or rewrites a weight

    def build(self, model, tasks: list[TaskInfo]) -> None:
        self.infos = list(tasks)
        if self.params.memory_size is not None:
            model.extras[MEMORY] = ReplayMemory(self.params.memory_size, len(tasks))

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        return [finetune_phase(model, task, self.epochs, self.lr * self.params.backbone_lr_scale, self.lr)]

    # -- which examples -----------------------------------------------------------------------------------------------
    def replayed_tasks(self, stage: int) -> list[int]:
        """Indices of the tasks replayed while task `stage` trains (never the task itself)."""
        names = self.params.replay_tasks
        if names is None:
            return list(range(stage))
        return [t.index for t in self.infos if t.name in names and t.index != stage]

    def admit(self, model, stage: int, data: TrainingData) -> None:
        """Offer the memory every replayed task it has not seen yet (every rank alike: the same memory everywhere)."""
        if MEMORY not in model.extras:  # no size limit: the pool is the replayed tasks' whole training splits
            return
        memory = model.extras[MEMORY]
        new = [j for j in self.replayed_tasks(stage) if not memory.admitted[j]]
        for j in new:
            memory.admitted[j] = 1
            if self.params.selection == "reservoir":
                reservoir_admit(memory, j, len(data.splits[j][0]), data.seed)
        if new and self.params.selection == "class_balanced":
            admitted = torch.nonzero(memory.admitted).flatten().tolist()
            class_balanced_fill(memory, {j: data.splits[j][1] for j in admitted}, data.seed)

    def rank_entries(self, model, stage: int, data: TrainingData) -> torch.Tensor:
        """(n, 2) the (task, index) pairs this rank replays: its slice of a seeded order of the memory's entries of the
        replayed tasks (or, with no size limit, of every training example of those tasks); disjoint across ranks."""
        replayed = self.replayed_tasks(stage)
        if MEMORY in model.extras:
            pool = model.extras[MEMORY].entries()
            pool = pool[torch.isin(pool[:, 0], torch.tensor(replayed, dtype=torch.long))]
        else:  # no size limit: every training example of the replayed tasks
            pool = torch.zeros((0, 2), dtype=torch.long)
            for j in replayed:
                n = len(data.splits[j][0])
                pool = torch.cat([pool, torch.stack([torch.full((n,), j), torch.arange(n)], dim=1)])
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(derive_seed(data.seed, stage, 2)))
        return pool[rank_slice(order, data.rank, data.world)]

    # -- the mixed batches ---------------------------------------------------------------------------------------------
    def train_batches(self, model, task: TaskInfo, batches, data: TrainingData) -> Iterator[tuple]:
        self.admit(model, task.index, data)
        entries = self.rank_entries(model, task.index, data) if self.params.share > 0 else torch.zeros((0, 2))
        draw = _Cycle(entries.long(), derive_seed(data.epoch_seed, data.rank, 3))
        owed = 0.0
        for xb, yb in batches:
            owed += len(xb) * self.params.share / (1.0 - self.params.share)
            m = int(owed) if len(entries) else 0
            owed -= m
            picked = draw.take(m)
            xs, ys = [xb], [self.labels(task, task.index, yb)]
            for j in picked[:, 0].unique().tolist():
                rows = picked[picked[:, 0] == j, 1]
                x, y = data.splits[j]
                xs.append(x[rows])
                ys.append(self.labels(task, j, y[rows]))
            yield torch.cat(xs), torch.cat(ys)

    def heads(self, task: TaskInfo) -> list[int]:
        """The heads a classification step runs (every rank the same: ZeRO-3 gathers the same layers everywhere)."""
        return list(range(max([task.index, *self.replayed_tasks(task.index)]) + 1))

    def labels(self, task: TaskInfo, j: int, y: torch.Tensor) -> torch.Tensor:
        """Classification: task j's labels as positions in the concatenated logits of `heads`; text: the tokens."""
        if task.kind == CAUSAL_LM:
            return y
        return y + sum(t.num_classes for t in self.infos[:j])

    def training_forward(self, engine, task: TaskInfo, x, y):
        if task.kind == CAUSAL_LM:
            logits = engine(x, task.index)
            return logits, task_loss(task.kind, logits, y)
        logits = engine(x, self.heads(task))
        return logits, own_head_cross_entropy(logits, y, [t.num_classes for t in self.infos[:len(self.heads(task))]])

    # -- where it cannot apply -----------------------------------------------------------------------------------------
    def check(self, cfg, tasks, load_weights) -> None:
        p, names = self.params, [t.name for t in tasks]
        unknown = sorted(set(p.replay_tasks or []) - set(names))
        if unknown:
            raise ValueError(f"params.replay_tasks: {unknown} are not tasks of the stream {names}; name the source "
                             f"or a target")
        if cfg.evaluation != "task_incremental":
            raise ValueError("evaluation: replay trains each replayed example through its own task's head "
                             "(task-incremental); set evaluation: task_incremental")
        if tasks[0].kind == CAUSAL_LM:
            check_text_replay(p, tasks)


def check_text_replay(p: ReplayParams, tasks) -> None:
    """A language-model stream: blocks must be of one length (a batch is one tensor, the share one of tokens)."""
    if p.selection == "class_balanced":
        raise ValueError("params.selection: class_balanced needs classes and causal_lm tasks have none; use "
                         "selection: reservoir")
    lengths = {t.name: tuple(t.x_train.shape[1:]) for t in tasks}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"block_size: replay mixes blocks of one corpus into another's batches, so every task "
                         f"needs the same block_size; they have { {k: v[-1] for k, v in lengths.items()} }")


def own_head_cross_entropy(logits: torch.Tensor, y: torch.Tensor, num_classes: list[int]) -> torch.Tensor:
    """Mean cross-entropy of each example over its own task's head only: `logits` are the heads' concatenated outputs,
    `y` positions in them; the other heads' logits are masked out."""
    ends = torch.cumsum(torch.tensor(num_classes, device=y.device), 0)
    owner = torch.searchsorted(ends, y, right=True)
    starts = ends[owner] - torch.tensor(num_classes, device=y.device)[owner]
    cols = torch.arange(logits.shape[1], device=y.device)[None, :]
    own = (cols >= starts[:, None]) & (cols < ends[owner][:, None])
    return F.cross_entropy(logits.float().masked_fill(~own, float("-inf")), y)


class _Cycle:
    """Draws a rank's replay entries without replacement, a fresh seeded order each time they run out."""

    def __init__(self, entries: torch.Tensor, seed: int):
        self.entries, self.generator, self.queue = entries, torch.Generator().manual_seed(seed), []

    def take(self, m: int) -> torch.Tensor:
        out = []
        while len(out) < m:
            if not self.queue:
                self.queue = torch.randperm(len(self.entries), generator=self.generator).tolist()
            out.append(self.queue.pop())
        return self.entries[out] if out else torch.zeros((0, 2), dtype=torch.long)
