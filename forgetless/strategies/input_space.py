"""input_space — tuning in the input space (Marullo, Tiezzi, Gori, Melacci, Tuytelaars, arXiv 2306.02947).

*Idea confirmed, module interpretation.* The pre-trained network is never updated; each task learns its head and a
transform of the input, T_k(x) = x + δ_k(x):
- `transform: conv`: δ_k is a small convolutional net (2-D convolutions for images (C, H, W), 1-D for sequences (C, L))
  whose last layer is zero-initialised, so T_k starts as the identity;
- `transform: prompt`: δ_k is a learned additive tensor of the input's shape (visual-prompt style), zero at the start.
Loss: CE(h_k(g(T_k(x))), y) + β·‖T_k(x) − x‖² (per-sample squared L2 norm, batch mean).

Two strategies live here:
- `input_space`: one (T_k, h_k) per task, frozen once the task is done; task-incremental evaluation selects them by
  task id, so earlier tasks and the source cannot be forgotten (the backbone never changes).
- `input_space_ci` (class-incremental variant): ONE transform T shared by all target tasks (registered under every
  target's key in `model.input_transforms`, so the platform applies it without a task id), protected across tasks by an
  EWC penalty on T's parameters, and a growing head: the heads of all tasks seen so far, concatenated (what
  class-incremental evaluation predicts with), trained with a cross-entropy over all seen classes. The source head reads
  the untransformed input, which needs no task id either.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from forgetless.backbones.transfer_model import head_key
from forgetless.data.kinds import CAUSAL_LM, CLASSIFICATION
from forgetless.strategies import register
from forgetless.strategies._penalties import ParamStore, diagonal_fisher, named, quadratic_penalty
from forgetless.strategies.base import ParamGroup, Phase, Strategy, StrategyParams, TaskInfo, head_params
from forgetless.strategies.ewc import accumulate_fisher


class InputTransform(nn.Module):
    """T(x) = x + δ(x); δ = conv-ReLU blocks then a zero-initialised conv back to the input's channels."""

    def __init__(self, input_shape: tuple[int, ...], hidden_channels: int, layers: int, kernel_size: int):
        super().__init__()
        if len(input_shape) == 3:
            conv = nn.Conv2d
        elif len(input_shape) == 2:
            conv = nn.Conv1d
        else:
            raise ValueError(f"input_space: inputs of shape {tuple(input_shape)} are neither images (C, H, W) nor "
                             f"sequences (C, L); token models are not supported yet")
        channels = input_shape[0]
        blocks: list[nn.Module] = []
        c_in = channels
        for _ in range(layers - 1):
            blocks += [conv(c_in, hidden_channels, kernel_size, padding=kernel_size // 2), nn.ReLU()]
            c_in = hidden_channels
        last = conv(c_in, channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(last.weight)  # T starts as the identity
        nn.init.zeros_(last.bias)
        self.delta = nn.Sequential(*blocks, last)
        self.last_sq_dist: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.delta(x)
        # The proximity term ‖T(x) − x‖² = ‖δ(x)‖² is recorded during training from *this* forward (the engine's own),
        # so the penalty needs no second pass and never reads weights outside a forward (ZeRO-3 safe).
        self.last_sq_dist = d.float().pow(2).flatten(1).sum(1).mean() if self.training else None
        return x + d


class AdditivePrompt(nn.Module):
    """T(x) = x + p, p a learned tensor of the input's shape, zero at the start."""

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        self.prompt = nn.Parameter(torch.zeros(tuple(input_shape)))
        self.last_sq_dist: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_sq_dist = self.prompt.float().pow(2).sum() if self.training else None
        return x + self.prompt


class SoftPrompt(nn.Module):
    """A causal-LM task's input transform: P learned vectors in front of the token embeddings (soft-prompt tuning,
    Lester et al. 2021), small random at the start; the decoder itself never changes."""

    is_prefix = True

    def __init__(self, tokens: int, hidden: int):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(tokens, hidden) * 0.02)
        self.last_sq_dist: torch.Tensor | None = None  # no proximity term: the prompt adds input, it changes none

    def forward(self) -> torch.Tensor:
        return self.prompt


class InputSpaceParams(StrategyParams):
    transform: Literal["conv", "prompt"] = Field("conv", description="conv: x + δ(x) by a small conv net; "
                                                                     "prompt: x + a learned tensor")
    hidden_channels: int = Field(16, gt=0, le=1024, description="conv: channels of δ's hidden layers (typ. 8-64)")
    layers: int = Field(2, ge=1, le=8, description="conv: layers of δ, the last zero-initialised (typ. 1-4)")
    kernel_size: int = Field(3, ge=1, le=15, description="conv: kernel size, odd (typ. 3-7)")
    beta: float = Field(0.001, ge=0.0, le=100.0, description="β of the proximity penalty β·‖T(x) − x‖² (typ. 0-0.1)")
    transform_lr_scale: float = Field(1.0, gt=0.0, le=100.0, description="transform lr = scale x lr (typ. 0.1-10)")
    head_lr_scale: float = Field(1.0, gt=0.0, le=100.0, description="head lr = scale x lr (typ. 1-10)")
    prompt_tokens: int = Field(8, ge=1, le=1024, description="causal_lm: soft-prompt vectors in front of every block "
                                                              "(block_size + prompt_tokens must fit the model's context)")


def make_transform(p: InputSpaceParams, input_shape: tuple[int, ...], model=None,
                   kind: str = CLASSIFICATION) -> nn.Module:
    if kind == CAUSAL_LM:  # token ids: tune the input space of the embeddings instead, a soft prompt
        return SoftPrompt(p.prompt_tokens, model.backbone.hidden_size)
    if p.transform == "prompt":
        return AdditivePrompt(input_shape)
    if p.kernel_size % 2 == 0:
        raise ValueError(f"input_space: kernel_size must be odd (a same-size output), got {p.kernel_size}")
    return InputTransform(input_shape, p.hidden_channels, p.layers, p.kernel_size)


def proximity(model, task: TaskInfo) -> torch.Tensor | None:
    t = model.input_transforms[head_key(task.index)]
    return t.last_sq_dist


@register
class InputSpace(Strategy):
    name = "input_space"
    paper = ("Marullo et al., Continual Learning with Pretrained Backbones by Tuning in the Input Space "
             "(arXiv 2306.02947)")
    fidelity = "interpretation"  # idea confirmed (abstract), module design is this project's reading
    Config = InputSpaceParams
    has_per_task_parts = True
    max_zero_stage = 3  # nothing reads weights outside a forward
    task_kinds = (CLASSIFICATION, CAUSAL_LM)  # on a language model: soft-prompt tuning (SoftPrompt)

    def build(self, model, tasks: list[TaskInfo]) -> None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(1234)  # the same transforms on every rank and on every rebuild
        for t in tasks[1:]:
            model.input_transforms[head_key(t.index)] = make_transform(self.params, t.input_shape, model, t.kind)
        torch.random.set_rng_state(gen_state)

    def check(self, cfg, tasks: list, load_weights) -> None:
        from forgetless.backbones.hf import context_length  # deferred: only causal-LM streams read a model folder

        blocks = [t.input_shape[-1] for t in tasks if t.kind == CAUSAL_LM]
        if blocks:
            ctx = context_length(cfg.backbone.name[len("hf:"):])
            if ctx is not None and max(blocks) + self.params.prompt_tokens > ctx:
                raise ValueError(f"prompt_tokens ({self.params.prompt_tokens}) + block_size ({max(blocks)}) exceed the "
                                 f"model's context ({ctx}); lower block_size or prompt_tokens")

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        p = self.params
        return [Phase(name="input_space", epochs=self.epochs, param_groups=[
            ParamGroup("transform", list(model.input_transforms[head_key(task.index)].parameters()),
                       self.lr * p.transform_lr_scale),
            ParamGroup("head", head_params(model, task), self.lr * p.head_lr_scale),
        ], eval_modules=[model.backbone])]

    def extra_loss(self, model, x, y, task: TaskInfo, logits):
        d = proximity(model, task)
        return None if d is None or self.params.beta == 0 else self.params.beta * d


class InputSpaceCIParams(InputSpaceParams):
    ewc_lambda: float = Field(100.0, ge=0.0, le=1e8,
                              description="λ of the EWC penalty on the shared transform (typ. 1-1e4)")
    fisher: Literal["empirical", "true"] = Field("empirical", description="labels of the Fisher (see ewc)")
    growing_head_ce: float = Field(
        1.0, ge=0.0, le=100.0, description="weight of the cross-entropy over all seen classes (the growing head)")


STORE = "input_space_ci"


@register
class InputSpaceCI(Strategy):
    name = "input_space_ci"
    paper = InputSpace.paper
    fidelity = "interpretation"
    Config = InputSpaceCIParams
    # One shared transform drifts across tasks, so there are no per-task parts for a task id to select.
    has_per_task_parts = False
    max_zero_stage = 2  # the EWC penalty reads the transform's weights outside a forward

    def build(self, model, tasks: list[TaskInfo]) -> None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(1234)
        shared = make_transform(self.params, tasks[-1].input_shape)
        torch.random.set_rng_state(gen_state)
        for t in tasks[1:]:
            model.input_transforms[head_key(t.index)] = shared  # the same module under every target's key
        model.extras[STORE] = ParamStore(named(shared), kinds=["fisher", "anchor"])

    def _shared(self, model) -> nn.Module:
        return model.input_transforms[head_key(1)]

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        p = self.params
        return [Phase(name="input_space_ci", epochs=self.epochs, param_groups=[
            ParamGroup("transform", list(self._shared(model).parameters()), self.lr * p.transform_lr_scale),
            ParamGroup("head", head_params(model, task), self.lr * p.head_lr_scale),
        ], eval_modules=[model.backbone])]

    def extra_loss(self, model, x, y, task: TaskInfo, logits):
        p = self.params
        loss = torch.zeros((), device=logits.device)
        d = proximity(model, task)
        if d is not None and p.beta:
            loss = loss + p.beta * d
        store = model.extras[STORE]
        if float(store.filled) > 0 and p.ewc_lambda:
            loss = loss + 0.5 * p.ewc_lambda * quadratic_penalty(named(self._shared(model)), store, "fisher")
        if p.growing_head_ce and task.index >= 1:
            # Logits of every head seen so far, as class-incremental evaluation computes them: the source head on the
            # raw input (frozen, no gradient), earlier target heads on the shared transform's output, this task's head.
            with torch.no_grad():
                src = model(x, 0)
            feats = model.features(x, task.index)
            old = [model.heads[head_key(j)](model.head_features(feats, j)) for j in range(1, task.index)]
            all_logits = torch.cat([src, *old, logits], dim=1).float()
            offset = sum(model.num_classes[: task.index])
            loss = loss + p.growing_head_ce * F.cross_entropy(all_logits, y + offset)
        return loss

    def after_task(self, model, task, batches, all_reduce_mean) -> None:
        shared = self._shared(model)
        key = head_key(task.index)

        def logits_fn(theta, x):
            # A functional call of the shared transform alone: on the whole model, torch.func would have to untie the
            # module registered under several keys (and does not restore it as parameters afterwards).
            feats = model.backbone(functional_call(shared, theta, (x,)))
            return model.heads[key](model.head_features(feats, task.index))

        params = named(shared)
        f = diagonal_fisher(model, params, logits_fn, batches, all_reduce_mean, labels=self.params.fisher)
        accumulate_fisher(model.extras[STORE], f, dict(params), 1.0)
