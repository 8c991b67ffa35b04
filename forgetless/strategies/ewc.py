"""ewc (Kirkpatrick et al., PNAS 2017): loss + λ/2·Σ_i F_i (θ_i − θ*_i)² over the shared backbone.

F is the diagonal Fisher information, computed from per-sample gradients on each finished task's training data and
accumulated over tasks (F ← γ·F + F_k; γ = 1 is plain accumulation, γ < 1 is "online EWC"); θ* is the backbone after the
last finished task. The source counts as a finished task: its Fisher and anchor are taken from the pre-trained model
before the first target (`after_source`), so EWC protects the source from the first target on. F and θ* are buffers
in `model.extras` (structure in `build()`, values in `after_source`/`after_task`), so checkpoints capture them.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch.func import functional_call

from forgetless.backbones.transfer_model import head_key
from forgetless.data.kinds import CAUSAL_LM, CLASSIFICATION
from forgetless.strategies import register
from forgetless.strategies._penalties import ParamStore, diagonal_fisher, named, quadratic_penalty
from forgetless.strategies._phases import finetune_phase
from forgetless.strategies.base import Phase, Strategy, StrategyParams, TaskInfo

STORE = "ewc"


class EWCParams(StrategyParams):
    ewc_lambda: float = Field(100.0, ge=0.0, le=1e8, description="λ, penalty strength (typical 1-1e4)")
    decay: float = Field(1.0, ge=0.0, le=1.0, description="γ: F ← γ·F + F_new (1 = accumulate; <1 = online EWC)")
    fisher: Literal["empirical", "true"] = Field(
        "empirical", description="labels of the Fisher: the data's (empirical) or sampled from the model (true)")
    fisher_max_samples: int | None = Field(None, gt=0,
                                           description="cap on samples per rank for the Fisher (None = all)")
    include_source: bool = Field(True, description="also protect the source task (Fisher of the pre-trained model)")
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=10.0, description="backbone lr = scale x lr (typical 0.01-1)")


def backbone_logits_fn(model, task_index: int):
    """logits_fn for `diagonal_fisher`: the task's logits with backbone parameters replaced. A functional call of the
    backbone alone: on the whole model torch.func would have to untie modules registered under several names."""

    def fn(theta, x):
        if head_key(task_index) in model.input_transforms:
            x = model.input_transforms[head_key(task_index)](x)
        feats = functional_call(model.backbone, theta, (x,))
        return model.heads[head_key(task_index)](model.head_features(feats, task_index))

    return fn


def accumulate_fisher(store: ParamStore, fisher: dict, anchor: dict, decay: float) -> None:
    first = float(store.filled) == 0
    store.set("fisher", {n: fisher[n] + (0.0 if first else decay * store.get("fisher", n)) for n in store.names})
    store.set("anchor", anchor)


@register
class EWC(Strategy):
    name = "ewc"
    paper = "Kirkpatrick et al., Overcoming catastrophic forgetting in neural networks (PNAS 2017)"
    fidelity = "confirmed"
    task_kinds = (CLASSIFICATION, CAUSAL_LM)  # on a language model its head is a per-task vocabulary bias
    Config = EWCParams
    has_per_task_parts = True  # per-task heads; the shared backbone is protected by the penalty
    max_zero_stage = 2  # the penalty reads backbone weights outside a module's forward

    def build(self, model, tasks: list[TaskInfo]) -> None:
        model.extras[STORE] = ParamStore(named(model.backbone), kinds=["fisher", "anchor"])

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        return [finetune_phase(model, task, self.epochs, self.lr * self.params.backbone_lr_scale, self.lr)]

    def extra_loss(self, model, x, y, task: TaskInfo, logits):
        store = model.extras[STORE]
        if float(store.filled) == 0 or self.params.ewc_lambda == 0:
            return None
        return 0.5 * self.params.ewc_lambda * quadratic_penalty(named(model.backbone), store, "fisher")

    def _consolidate(self, model, task: TaskInfo, batches, all_reduce_mean) -> None:
        p = self.params
        params = named(model.backbone)
        f = diagonal_fisher(model, params, backbone_logits_fn(model, task.index), batches, all_reduce_mean,
                            labels=p.fisher, max_samples=p.fisher_max_samples, kind=task.kind)
        accumulate_fisher(model.extras[STORE], f, dict(params), p.decay)

    def after_source(self, model, source, batches, all_reduce_mean) -> None:
        if self.params.include_source:
            self._consolidate(model, source, batches, all_reduce_mean)

    def after_task(self, model, task, batches, all_reduce_mean) -> None:
        self._consolidate(model, task, batches, all_reduce_mean)

