"""Hugging Face Transformers model folders as feature backbones: `hf:/path/to/folder` or `hf:s3://bucket/prefix`.

Encoders (BERT, RoBERTa, ViT, ...) and decoders (GPT-2, Llama-style) load with `AutoModel` from a local folder (an
`s3://` folder is downloaded once into a local cache first). The hub is never contacted: a hub name such as
`hf:bert-base-uncased` is a configuration error that says how to give a folder instead.

Inputs (the tensors a forgetless task holds):
- text models: token ids as made by `forgetless.data.text` — shape (B, 2, L), channel 0 the ids, channel 1 the attention
  mask (ids alone, (B, 1, L), mean "no padding"); the model folder's tokenizer made them;
- vision models: pixel values in [0, 1], shape (B, C, H, W); the model's own preprocessing (resize to its image size,
  grey -> RGB, normalisation with its `preprocessor_config.json` mean/std) runs inside the backbone.

Features: one vector per input (`feature_dim` = hidden size), pooled by `pooling`: `cls` (first token: BERT/ViT style),
`last` (last non-padding token: how GPT-2/Llama classify), `mean` (masked mean), `pooler` (the model's pooler output),
or `auto` (last for decoders, cls otherwise).

`output: lm_logits` (set by the config for causal-LM tasks): the decoder with its own language-model head
(`AutoModelForCausalLM`, the output projection tied to the input embeddings where the model ties them), returning
next-token logits (B, L, V) (`feature_dim` = V); each task's head is then a per-task vocabulary bias (`VocabBias`,
zero at the start), so the pretrained model's own predictions are where every task starts.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forgetless.backbones.registry import register_backbone_prefix
from forgetless.storage import cache_root, check_model_folder, local_folder

__all__ = ["HFBackbone", "build", "cache_root", "check", "check_model_folder", "local_folder", "plain_model",
           "save_pretrained", "save_pretrained_state"]

POOLINGS = ("auto", "cls", "mean", "last", "pooler")
OUTPUTS = ("features", "lm_logits")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _offline_env() -> None:
    # Belt and braces next to local_files_only=True: nothing in transformers/huggingface_hub may reach the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------------------------------


def _is_decoder(config) -> bool:
    from transformers.models.auto.modeling_auto import (  # deferred: transformers is optional and takes ~3 s to import
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    # Decoder-only = has a causal-LM head class but no masked-LM one (BERT-likes have both).
    mt = config.model_type
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


class HFBackbone(nn.Module):
    """A Transformers `AutoModel` (no task head) that maps a batch to pooled features."""

    def __init__(self, spec: str, input_shape: tuple[int, ...], pooling: str = "auto",
                 gradient_checkpointing: bool = False, dtype: str = "float32", pretrained: bool = True,
                 output: str = "features"):
        super().__init__()
        _offline_env()
        from transformers import AutoConfig  # deferred: optional, ~3 s to import (and after _offline_env)
        from transformers.models.auto.modeling_auto import (  # deferred: as AutoConfig
            MODEL_FOR_CAUSAL_LM_MAPPING,
            MODEL_MAPPING,
        )

        _check_params(pooling, dtype, output)
        self.output = output
        self.spec = spec
        self.folder = local_folder(spec)
        # True: the weights come from the folder, so the platform trains only a source head on the frozen backbone
        # instead of pre-training it from scratch (see train_loop).
        self.pretrained = bool(pretrained)
        config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        if getattr(config, "use_cache", None):
            config.use_cache = False  # no key/value cache: we never generate, and it costs memory
        kwargs: dict[str, Any] = {}
        model_cls = (MODEL_FOR_CAUSAL_LM_MAPPING if output == "lm_logits" else MODEL_MAPPING)[type(config)]
        if pooling != "pooler" and "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
            # An unused pooler would get no gradients (ZeRO and DDP both dislike unused trainable weights).
            kwargs["add_pooling_layer"] = False
        if pretrained:
            from transformers.utils import logging as hf_logging  # deferred: as AutoConfig

            # Its load report lists the pooler we left out on purpose as "unexpected" on every rank: keep it quiet.
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                self.model = model_cls.from_pretrained(self.folder, config=config, local_files_only=True,
                                                       dtype=DTYPES[dtype], **kwargs)
            finally:
                hf_logging.set_verbosity(level)
        else:
            self.model = model_cls(config, **kwargs).to(DTYPES[dtype])
        self.modality = "vision" if self.model.main_input_name == "pixel_values" else "text"
        self.decoder = self.modality == "text" and _is_decoder(config)
        self.pooling = ("last" if self.decoder else "cls") if pooling == "auto" else pooling
        self.feature_dim = int(config.vocab_size if output == "lm_logits" else config.hidden_size)
        self.hidden_size = int(config.hidden_size)  # width of a soft prompt's vectors (input-space tuning)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if gradient_checkpointing:
            # Non-reentrant checkpointing works with frozen inputs (embeddings of a frozen model) and with ZeRO-3.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.modality == "vision":
            self._setup_vision(config, input_shape)
        else:
            if len(input_shape) not in (1, 2) or (len(input_shape) == 2 and input_shape[0] not in (1, 2)):
                raise ValueError(f"{spec}: a text model needs token inputs of shape (2, L) (ids, mask) or (1, L); "
                                 f"got {input_shape}; build the task with forgetless.data.text")
            self.pad_id = int(config.pad_token_id if config.pad_token_id is not None else 0)

    # -- vision preprocessing --------------------------------------------------------------------------------------
    def _setup_vision(self, config, input_shape: tuple[int, ...]) -> None:
        if len(input_shape) != 3:
            raise ValueError(f"{self.spec}: a vision model needs image inputs (C, H, W); got {input_shape}")
        self.in_channels = int(input_shape[0])
        self.num_channels = int(getattr(config, "num_channels", 3))
        if self.in_channels not in (1, self.num_channels):
            raise ValueError(f"{self.spec}: inputs have {self.in_channels} channels, the model takes "
                             f"{self.num_channels}")
        size = getattr(config, "image_size", None)
        self.image_size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size)) if size else None
        mean, std = [0.0] * self.num_channels, [1.0] * self.num_channels
        proc = self.folder / "preprocessor_config.json"
        if proc.exists():
            p = json.loads(proc.read_text())
            if p.get("do_normalize", True) and p.get("image_mean") is not None:
                mean, std = list(p["image_mean"]), list(p["image_std"])
        # Buffers, not parameters: they never train, and they travel with the model to its device.
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def preprocess_images(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.num_channels != 1:
            x = x.expand(-1, self.num_channels, -1, -1)
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x.float(), size=self.image_size, mode="bilinear", align_corners=False)
        return (x - self.pixel_mean) / self.pixel_std

    # -- forward ---------------------------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return next(p for p in self.model.parameters()).dtype

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        if prefix is not None:
            return self.prompted_logits(x, prefix)
        if self.modality == "vision":
            out = self.model(pixel_values=self.preprocess_images(x).to(self._dtype()))
            mask = None
        else:
            if x.dim() == 2:
                x = x[:, None, :]
            ids = x[:, 0].round().long()
            # ids alone: no mask at all, so the model takes its unpadded path (no data-dependent check of the mask,
            # which per-sample gradients under vmap, EWC's Fisher, cannot trace)
            mask = x[:, 1].round().long() if x.shape[1] == 2 else None
            out = self.model(input_ids=ids, attention_mask=mask)
            if self.output == "lm_logits":
                return out.logits
        return self.pool(out, mask)

    def prompted_logits(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Next-token logits of the ids with `prefix` (P, hidden) input vectors in front (a soft prompt), for the ids'
        positions only. The embedding runs as a module call, so ZeRO-3 gathers its weight as in any forward."""
        if self.output != "lm_logits":
            raise ValueError(f"{self.spec}: a soft prompt applies to a language model's logits (output lm_logits)")
        ids = (x if x.dim() == 2 else x[:, 0]).round().long()
        emb = self.model.get_input_embeddings()(ids)
        p = prefix.to(emb.dtype).unsqueeze(0).expand(len(ids), -1, -1)
        return self.model(inputs_embeds=torch.cat([p, emb], dim=1)).logits[:, prefix.shape[0]:]

    def make_head(self, num_outputs: int) -> nn.Module | None:
        """A task's head (TransferModel asks): a vocabulary bias on the LM's logits; None: the default linear head."""
        return VocabBias(self.feature_dim) if self.output == "lm_logits" else None

    def pool(self, out, mask: torch.Tensor | None) -> torch.Tensor:
        h = out.last_hidden_state
        if self.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ValueError(f"{self.spec}: this model has no pooler; use pooling cls, mean or last")
            return out.pooler_output
        if self.pooling == "cls":
            return h[:, 0]
        if mask is None:
            mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
        if self.pooling == "mean":
            m = mask.to(h.dtype).unsqueeze(-1)
            return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        # last: the last position the mask keeps (right padding)
        last = mask.sum(1).clamp_min(1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]


class VocabBias(nn.Module):
    """A causal-LM task's own part: a bias added to every position's next-token logits, zero at the start."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.bias.to(logits.dtype)


def context_length(spec: str) -> int | None:
    """The longest input a model folder's decoder takes (its position table), from config.json; None if unsaid."""
    config = json.loads((local_folder(spec) / "config.json").read_text())
    return next((int(config[k]) for k in ("n_positions", "max_position_embeddings") if k in config), None)


def _check_params(pooling: str, dtype: str, output: str = "features") -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output {output!r}: use one of {list(OUTPUTS)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: use one of {list(POOLINGS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {list(DTYPES)}")


_PARAMS = {"pooling", "gradient_checkpointing", "dtype", "pretrained", "output"}


def check(spec: str, params: dict[str, Any]) -> None:
    """Config-time validation of `hf:<spec>` and its params (raises ValueError with the fix)."""
    check_model_folder(spec)
    unknown = set(params) - _PARAMS
    if unknown:
        raise ValueError(f"hf backbone params: unknown {sorted(unknown)}; known: {sorted(_PARAMS)}")
    _check_params(params.get("pooling", "auto"), params.get("dtype", "float32"), params.get("output", "features"))


def build(spec: str, input_shape: tuple[int, ...], **params) -> HFBackbone:
    return HFBackbone(spec, input_shape, **params)


# ---------------------------------------------------------------------------------------------------------------------
# export: the fine-tuned backbone as a Hugging Face folder again


def plain_model(backbone: HFBackbone) -> nn.Module:
    """A copy of the backbone's Transformers model with any PEFT (LoRA) layers merged into their base weights and
    removed, so it saves as, and loads back into, the plain model class. Needs full weights (not ZeRO-3 partitions)."""
    model = copy.deepcopy(backbone.model)
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer  # deferred: peft is optional (absent: nothing to merge)
    except ImportError:
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return model


def save_pretrained(backbone: HFBackbone, dest: str | os.PathLike) -> Path:
    """Write the (merged) backbone as a Hugging Face folder, with the source folder's tokenizer/preprocessor files."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model = plain_model(backbone)
    if backbone.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.save_pretrained(dest)
    _copy_side_files(backbone.folder, dest)
    return dest


def save_pretrained_state(backbone: HFBackbone, state: dict[str, torch.Tensor], dest: str | os.PathLike,
                          max_shard_size: str = "2GB") -> Path:
    """Write a Hugging Face folder from a full state dict of `backbone.model` (names as in its `state_dict()`), without
    a module that holds the weights: the one export of a ZeRO-3 run, whose model is partitioned. Safetensors shards
    (with their index when there is more than one), config.json, and the source folder's tokenizer/preprocessor
    files; `AutoModel.from_pretrained(dest)` loads it. Not for a model with PEFT layers (use `save_pretrained`)."""
    # deferred: huggingface_hub comes with transformers (optional)
    from huggingface_hub import save_torch_state_dict

    if any("lora_" in k or ".base_layer." in k for k in state):
        raise ValueError("save_pretrained_state: the state has PEFT (LoRA) layers; merge them first "
                         "(save_pretrained does)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    backbone.model.config.save_pretrained(dest)
    save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, dest, max_shard_size=max_shard_size)
    _copy_side_files(backbone.folder, dest)
    return dest


def save_lora_adapter(backbone: HFBackbone, state: dict[str, torch.Tensor], adapter_dest: str | os.PathLike,
                      base_dest: str | os.PathLike, adapter_name: str = "default") -> bool:
    """An unmerged LoRA update as PEFT writes it: `adapter_dest` (adapter_config.json, adapter_model.safetensors) and
    the model it applies to, `base_dest` (a Hugging Face folder of the weights without the adapters), so that
    `PeftModel.from_pretrained(AutoModel.from_pretrained(base_dest), adapter_dest)` is the fine-tuned backbone.
    `state`: a full state dict of `backbone.model` with its adapters. Writes nothing and returns False when every
    lora_B is zero (the update was merged and the adapters restarted: the merged export is the whole model)."""
    from peft import get_peft_model_state_dict  # deferred: peft is optional
    from safetensors.torch import save_file

    if not any("lora_B" in k and torch.count_nonzero(v) for k, v in state.items()):
        return False
    adapter = get_peft_model_state_dict(backbone.model, state_dict=state, adapter_name=adapter_name)
    adapter_dest, base_dest = Path(adapter_dest), Path(base_dest)
    adapter_dest.mkdir(parents=True, exist_ok=True)
    # PEFT's own layout: keys under the PeftModel's "base_model.model." prefix, the adapter name left out
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in adapter.items()},
              adapter_dest / "adapter_model.safetensors")
    config = copy.deepcopy(backbone.model.peft_config[adapter_name])
    config.base_model_name_or_path = os.path.relpath(base_dest, adapter_dest)
    config.save_pretrained(adapter_dest)
    save_pretrained_state(backbone, {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k},
                          base_dest)
    return True


def _copy_side_files(source: Path, dest: Path) -> None:
    for f in source.iterdir():
        if f.is_file() and f.name not in ("config.json",) and not f.name.endswith((".safetensors", ".bin", ".pt",
                                                                                   ".index.json")) \
                and (dest / f.name).resolve() != f.resolve():  # saved over its own folder: the files are there
            shutil.copy2(f, dest / f.name)  # tokenizer, preprocessor, generation config...


register_backbone_prefix("hf:", build, check)
