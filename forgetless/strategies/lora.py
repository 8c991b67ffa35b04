"""lora (Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022) through Hugging Face PEFT.

The pretrained weights W stay frozen; each targeted linear layer learns a low-rank update B·A (A: r x in, B: out x r,
B starts at zero so training starts from the pretrained function) scaled by alpha / r; the task's head trains too.
After each task the update is merged into W (W += alpha/r · B·A) and the adapters restart (A re-drawn, B = 0) for the
next task: the merged backbone is a plain model of the original class, exported as such.

ZeRO-3 pitfalls, and how they are avoided here:
- merging reads and writes full weights: the platform releases the engine at the end of every phase and hands
  `after_task` a plain model on gathered full weights, so the merge never touches a partition; a partitioned weight
  is refused with an error rather than merged wrongly;
- adapters must be identical on every rank: they are created (and re-created after a merge) under a fixed seed;
- saving: checkpoints and exports are consolidated state dicts (gathered on all ranks), never PEFT's own
  `save_pretrained` on a partitioned model, which would write empty tensors.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from forgetless.data.kinds import CAUSAL_LM, CLASSIFICATION
from forgetless.strategies import register
from forgetless.strategies.base import ParamGroup, Phase, Strategy, StrategyParams, TaskInfo, head_params

ADAPTER = "default"
# When PEFT's per-architecture table has no entry (or its names are not in this version of the model, e.g. ViT's
# attention is q_proj/v_proj in recent transformers), the query and value projections are found by name.
_FALLBACK_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("qkv",))


def default_targets(hf: nn.Module) -> list[str] | None:
    from peft.utils import constants  # deferred: peft is optional (the `large` extra) and imports transformers (~3 s)

    leaves = {n.rsplit(".", 1)[-1] for n, m in hf.named_modules() if isinstance(m, nn.Linear) or
              type(m).__name__ == "Conv1D"}
    defaults = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for names in [tuple(defaults.get(hf.config.model_type, ())), *_FALLBACK_TARGETS]:
        if names and all(n in leaves for n in names):
            return list(names)
    return None


class LoraParams(StrategyParams):
    r: int = Field(8, gt=0, le=1024, description="rank of the update")
    alpha: float = Field(16.0, gt=0.0, description="scale: the update is alpha / r · B·A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] | None = Field(
        None, description="names of the linear layers to adapt (default: PEFT's choice for the architecture, "
                          "e.g. query/value for BERT and ViT, c_attn for GPT-2, q_proj/v_proj for Llama)")
    head_lr_scale: float = Field(1.0, gt=0.0, le=100.0, description="head lr = scale x lr")
    merge_after_task: bool = Field(True, description="merge B·A into W after each task (adapters restart)")
    seed: int = Field(0, description="seed of the adapters' initialisation (identical on every rank)")


def _hf_model(model) -> nn.Module:
    inner = getattr(model.backbone, "model", None)
    if inner is None or not hasattr(inner, "config"):
        raise ValueError("lora needs a Hugging Face backbone (backbone name hf:<folder>)")
    return inner


def tuner_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer  # deferred: optional, see default_targets

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def lora_parameters(model) -> list[nn.Parameter]:
    return [p for n, p in model.backbone.named_parameters() if "lora_" in n]


def _accept_plain_checkpoints(backbone: nn.Module) -> None:
    """Let a checkpoint of the model *without* adapters (the pre-training stop point) load into the adapted one:
    `x.weight` of an adapted layer is stored as `x.base_layer.weight`, and adapters absent from the checkpoint keep
    their fresh initialisation."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        own = module.state_dict(keep_vars=True)
        plain = False
        for key in list(own):
            if ".base_layer." in key:
                old = prefix + key.replace(".base_layer.", ".")
                if old in state_dict and prefix + key not in state_dict:
                    state_dict[prefix + key] = state_dict.pop(old)
                    plain = True
        if plain:
            for key, value in own.items():
                if "lora_" in key and prefix + key not in state_dict:
                    state_dict[prefix + key] = value.detach()

    backbone.register_load_state_dict_pre_hook(hook)  # hook(module, state_dict, prefix, ...)


@register
class Lora(Strategy):
    name = "lora"
    paper = "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models (ICLR 2022), via Hugging Face PEFT"
    fidelity = "confirmed"
    task_kinds = (CLASSIFICATION, CAUSAL_LM)  # on a language model its head is a per-task vocabulary bias
    Config = LoraParams
    has_per_task_parts = True  # per-task heads; the merged backbone is shared
    max_zero_stage = 3
    supported_backbones = ("hf:",)

    def build(self, model, tasks: list[TaskInfo]) -> None:
        from peft import LoraConfig, inject_adapter_in_model  # deferred: optional, see default_targets

        hf = _hf_model(model)
        mt = hf.config.model_type
        targets = self.params.target_modules or default_targets(hf)
        if not targets:
            raise ValueError(f"lora: no default target modules for model type {mt!r}; set strategy params "
                             f"target_modules (names of its attention/MLP linear layers)")
        cfg = LoraConfig(r=self.params.r, lora_alpha=self.params.alpha, lora_dropout=self.params.dropout,
                         target_modules=list(targets), fan_in_fan_out=(mt == "gpt2"), bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params.seed)
            inject_adapter_in_model(cfg, hf, adapter_name=ADAPTER)
        if not tuner_layers(hf):
            raise ValueError(f"lora: target_modules {targets} matched no layer of {mt!r}")
        _accept_plain_checkpoints(model.backbone)

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        return [Phase(
            name="lora",
            epochs=self.epochs,
            param_groups=[ParamGroup("lora", lora_parameters(model), self.lr),
                          ParamGroup("head", head_params(model, task), self.lr * self.params.head_lr_scale)],
        )]

    def after_task(self, model, task: TaskInfo, batches, all_reduce_mean) -> None:
        if self.params.merge_after_task:
            merge_and_reset(model, seed=self.params.seed + task.index)


@torch.no_grad()
def merge_and_reset(model, seed: int) -> None:
    """W += alpha/r · B·A in every adapted layer, then fresh adapters (B = 0): same function, plain weights."""
    for name, layer in tuner_layers(_hf_model(model)):
        w = layer.get_base_layer().weight
        if w.numel() == 0 or getattr(w, "ds_status", None) is not None and w.numel() != getattr(w, "ds_numel", -1):
            raise RuntimeError(f"lora: {name} holds a ZeRO-3 partition, not the full weight; merge on gathered weights")
        layer.merge(safe_merge=True, adapter_names=[ADAPTER])
        layer.merged_adapters.clear()  # the sum now lives in W; the adapter restarts from zero
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer.reset_lora_parameters(ADAPTER, True)
