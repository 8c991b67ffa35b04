"""The checks of a Hugging Face backbone (`hf:FOLDER`) against the model it names, before Ray starts: the model's own
config.json (read alone, never the weights) and its module tree (built on torch's meta device: names and layer types,
no memory, no weights) decide whether the config's numbers and names fit it.

- the context: every causal-LM task's `block_size` (plus a soft prompt's `prompt_tokens`) and every text task's
  length fit the model's position table (`n_positions` / `max_position_embeddings`);
- the vocabulary: a task's tokenizer has no more tokens than the model's embedding (`vocab_size`), and every token id
  of the built tasks has an embedding;
- the names: a strategy parameter that names layers of the model (LoRA's `target_modules`) names layers that exist and
  that the adapter can adapt, with the closest existing names in the error; a strategy that picks its layers itself
  (LoRA without `target_modules`) finds some;
- the heads: causal-LM tasks need a model type with a causal-LM head; gradient checkpointing needs a model that has it.

Each problem is one ConfigError naming the field and the fix (the CLI prints it in one line and exits 2).
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from forgetless import storage
from forgetless.config import ConfigError, ExperimentConfig
from forgetless.data.kinds import CAUSAL_LM
from forgetless.strategies import get_strategy_class

HF_PREFIX = "hf:"
CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")
# Strategy parameters whose value is a list of layer names of the backbone (matched as PEFT matches them: a module
# whose dotted name is the entry or ends with "." + the entry).
MODULE_NAME_PARAMS = ("target_modules",)


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know of the model: read from config.json and the module tree built on `meta`."""

    folder: str  # as given after hf: (a path or s3://)
    model_type: str
    context: int | None  # the longest input its position table takes; None: config.json does not say
    context_key: str | None  # which config.json key said it
    vocab_size: int | None
    module_types: tuple[tuple[str, str], ...]  # (dotted name, class name) of every module, in model order
    adaptable: frozenset[str]  # dotted names of the modules a LoRA adapter can wrap (linear, Conv1D, embedding)
    supports_gradient_checkpointing: bool


def check_model(cfg: ExperimentConfig) -> ModelFacts | None:
    """Before the tasks are built: the model's config and module tree against the config's numbers and names.
    None for a backbone that is not `hf:`."""
    if not cfg.backbone.name.startswith(HF_PREFIX):
        return None
    folder = cfg.backbone.name[len(HF_PREFIX):]
    config_text = _read_config_json(folder)
    output = cfg.backbone.params.get("output", "features")
    _check_flags(cfg.backbone.params)
    facts = _model_facts(folder, config_text, output)
    if cfg.backbone.params.get("gradient_checkpointing") and not facts.supports_gradient_checkpointing:
        raise ConfigError(f"backbone.params.gradient_checkpointing: this {facts.model_type} model ({cfg.backbone.name}) "
                          f"does not support gradient checkpointing; remove gradient_checkpointing")
    _check_lm_context(cfg, facts)
    _check_tokenizers(cfg, facts)
    for s in cfg.strategies:
        _check_named_modules(s, facts)
    return facts


def _check_flags(params: dict) -> None:
    """The backbone's on/off params are true or false, not a word that Python would take as true."""
    for flag in ("gradient_checkpointing", "pretrained"):
        if flag in params and not isinstance(params[flag], bool):
            raise ConfigError(f"backbone.params.{flag}: {params[flag]!r} is not true or false; write {flag}: true "
                              f"or {flag}: false")


def check_built_tasks(cfg: ExperimentConfig, facts: ModelFacts | None, tasks) -> None:
    """After the tasks are built: every text input fits the context and every token id has an embedding."""
    if facts is None:
        return
    fields = ["source"] + [f"targets[{i}]" for i in range(len(cfg.targets))]
    for where, task in zip(fields, tasks):
        if len(task.input_shape) > 2:  # images: no positions, no token ids
            continue
        length = int(task.input_shape[-1])
        if facts.context is not None and length > facts.context:
            raise ConfigError(f"{where}: its inputs are {length} tokens long, longer than the model's context of "
                              f"{facts.context} positions ({facts.context_key} in {facts.folder}/config.json); "
                              f"build the task's token ids with at most {facts.context} tokens")
        if facts.vocab_size is None:
            continue
        ids = [task.y_train, task.y_val, task.y_test] if task.kind == CAUSAL_LM else [
            x if x.dim() == 2 else x[:, 0] for x in (task.x_train, task.x_val, task.x_test)]  # channel 0: the ids
        highest = max(int(t.max()) for t in ids if t.numel())
        if highest >= facts.vocab_size:
            raise ConfigError(f"{where}: its token ids go up to {highest}, but the model's vocabulary has "
                              f"{facts.vocab_size} tokens (vocab_size in {facts.folder}/config.json); tokenize the "
                              f"task with the model's own tokenizer")


# ---------------------------------------------------------------------------------------------------------------------
# the model, without its weights


def _read_config_json(folder: str) -> str:
    uri = storage.join(folder, "config.json")
    try:
        return storage.read_bytes(uri).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"backbone.name: cannot read {uri} ({type(e).__name__}: {_first_line(e)}); give a folder "
                          f"written by save_pretrained") from None


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """Transformers' own warnings (a config's token ids, a model class's notices) would print lines before the one
    line of an error: kept off while the preflight reads the model."""
    from transformers.utils import (
        logging as hf_logging,  # deferred: optional, ~3 s to import
    )

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _model_facts(folder: str, config_text: str, output: str) -> ModelFacts:
    config = _parse_config(folder, config_text)
    model_cls = _model_class(folder, config, output)
    names, adaptable = _module_tree(config_text, output)
    context_key = next((k for k in CONTEXT_KEYS if isinstance(getattr(config, k, None), int)), None)
    vocab = getattr(config, "vocab_size", None)
    return ModelFacts(folder=folder, model_type=config.model_type, context_key=context_key,
                      context=int(getattr(config, context_key)) if context_key else None,
                      vocab_size=int(vocab) if isinstance(vocab, int) else None, module_types=names,
                      adaptable=adaptable,
                      supports_gradient_checkpointing=bool(getattr(model_cls, "supports_gradient_checkpointing", False)))


def _parse_config(folder: str, config_text: str):
    from transformers import AutoConfig  # deferred: optional, ~3 s to import

    where = f"backbone.name: {folder}/config.json"
    try:
        data = json.loads(config_text)
    except ValueError as e:
        raise ConfigError(f"{where} is not valid JSON ({e}); give a folder written by save_pretrained") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ConfigError(f"{where} names no model_type; give a folder written by a Transformers model's "
                          f"save_pretrained")
    try:
        with _transformers_quiet():
            return AutoConfig.for_model(**data)
    except Exception as e:  # noqa: BLE001 - a config class raises whatever its values make it raise
        import transformers

        raise ConfigError(f"{where}: Transformers {transformers.__version__} cannot read it ({_first_line(e)}); use a "
                          f"model type this version knows, or another transformers version") from None


def _model_class(folder: str, config, output: str):
    from transformers.models.auto.modeling_auto import (  # deferred: as AutoConfig
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_MAPPING,
    )

    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if output == "lm_logits" else MODEL_MAPPING
    if type(config) not in mapping:
        if output == "lm_logits":
            raise ConfigError(f"backbone.name: {folder} holds a {config.model_type} model, which has no causal-LM head "
                              f"(next-token logits), which causal_lm tasks need; give a decoder such as GPT-2 or Llama")
        raise ConfigError(f"backbone.name: {folder} holds a {config.model_type} model, which Transformers' AutoModel "
                          f"does not build; give another model folder")
    return mapping[type(config)]


@functools.lru_cache(maxsize=8)
def _module_tree(config_text: str, output: str) -> tuple[tuple[tuple[str, str], ...], frozenset[str]]:
    """(name, class name) of every module of the model `config_text` describes, and the names of those a LoRA adapter
    can wrap. Built on the meta device: shapes without storage, so even a large model costs milliseconds and no
    memory. Cached by the config's text (the tree follows from it alone)."""
    from transformers.pytorch_utils import Conv1D  # deferred: as AutoConfig

    config = _parse_config("", config_text)
    model_cls = _model_class("", config, output)
    try:
        with _transformers_quiet(), torch.device("meta"):
            model = model_cls(config)
    except Exception as e:  # noqa: BLE001 - a model's constructor raises whatever its config's values make it raise
        raise ConfigError(f"backbone.name: config.json describes a {config.model_type} model that cannot be built "
                          f"({type(e).__name__}: {_first_line(e)}); give a folder written by save_pretrained") from None
    adaptable_types = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)
    names = tuple((n, type(m).__name__) for n, m in model.named_modules() if n)
    adaptable = frozenset(n for n, m in model.named_modules() if n and isinstance(m, adaptable_types))
    return names, adaptable


# ---------------------------------------------------------------------------------------------------------------------
# the config's numbers and names against the model


def _task_fields(cfg: ExperimentConfig) -> list[tuple[str, object]]:
    return [("source", cfg.source)] + [(f"targets[{i}]", t) for i, t in enumerate(cfg.targets)]


def _check_lm_context(cfg: ExperimentConfig, facts: ModelFacts) -> None:
    if facts.context is None:
        return
    said = f"{facts.context_key} in {facts.folder}/config.json"
    lm_tasks = [(where, t) for where, t in _task_fields(cfg) if t.kind == CAUSAL_LM]
    for where, t in lm_tasks:
        if t.block_size > facts.context:
            raise ConfigError(f"{where}.block_size: {t.block_size} tokens do not fit the model's context of "
                              f"{facts.context} positions ({said}); set block_size to at most {facts.context}")
    for i, t in enumerate(cfg.eval_tasks):  # a held-out corpus' blocks, a multiple-choice suite's sequences
        key = "max_tokens" if hasattr(t, "max_tokens") else "block_size"
        if getattr(t, key) > facts.context:
            raise ConfigError(f"eval_tasks[{i}].{key}: {getattr(t, key)} tokens do not fit the model's context of "
                              f"{facts.context} positions ({said}); set {key} to at most {facts.context}")
    if not lm_tasks:
        return
    longest = max(t.block_size for _, t in lm_tasks)
    for s in cfg.strategies:
        declared = get_strategy_class(s.name).Config.model_fields.get("prompt_tokens")
        prompt = s.params.get("prompt_tokens", declared.default if declared is not None else None)
        if isinstance(prompt, int) and prompt + longest > facts.context:
            raise ConfigError(f"strategies[{s.display_name()}].params.prompt_tokens: prompt_tokens ({prompt}) + "
                              f"block_size ({longest}) exceed the model's context ({facts.context}) ({said}): the soft "
                              f"prompt's vectors take positions too; set prompt_tokens to at most "
                              f"{max(facts.context - longest, 0)} or lower block_size")


def _check_tokenizers(cfg: ExperimentConfig, facts: ModelFacts) -> None:
    """A task's tokenizer with more tokens than the model's vocabulary makes ids the embedding has no row for."""
    if facts.vocab_size is None:
        return
    from forgetless.data.lm import (
        load_lm_tokenizer,  # deferred: transformers' tokenizers, only for causal-LM tasks
    )

    for where, t in _task_fields(cfg):
        if t.kind != CAUSAL_LM or t.tokenizer is None:
            continue
        size = _tokenizer_size(t.tokenizer, load_lm_tokenizer)
        if size > facts.vocab_size:
            own = storage.normalize(t.tokenizer) == storage.normalize(facts.folder)
            fix = ("the folder's tokenizer and model do not belong together; save both from the same model" if own
                   else "use the model's own tokenizer (remove tokenizer:) or a model trained with this tokenizer")
            raise ConfigError(f"{where}.tokenizer: {t.tokenizer} has {size} tokens, more than the model's vocabulary "
                              f"of {facts.vocab_size} (vocab_size in {facts.folder}/config.json): ids from "
                              f"{facts.vocab_size} up have no embedding; {fix}")


def _tokenizer_size(folder: str, load) -> int:
    try:
        with _transformers_quiet():
            return len(load(folder))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"tokenizer: cannot load a tokenizer from {folder} ({type(e).__name__}: {_first_line(e)}); "
                          f"give a folder written by a tokenizer's save_pretrained") from None


def _check_named_modules(s, facts: ModelFacts) -> None:
    """Every strategy parameter that names layers of the model names layers a LoRA-style adapter can wrap."""
    if s.name == "lora" and s.params.get("target_modules") is None:
        _check_default_targets(s, facts)
    for param in MODULE_NAME_PARAMS:
        wanted = s.params.get(param)
        if not isinstance(wanted, list):
            continue
        field = f"strategies[{s.display_name()}].params.{param}"
        leaves = _adaptable_leaves(facts)
        matches = {entry: [n for n, _ in facts.module_types if n == entry or n.endswith(f".{entry}")]
                   for entry in wanted}
        missing = [str(e) for e, found in matches.items() if not found]
        if missing:
            close = [c for e in missing for c in difflib.get_close_matches(e, leaves, n=3, cutoff=0.4)]
            raise ConfigError(f"{field}: {', '.join(map(repr, missing))} name{'s' if len(missing) == 1 else ''} no "
                              f"layer of this {facts.model_type} model (hf:{facts.folder}); did you mean "
                              f"{', '.join(dict.fromkeys(close)) or ', '.join(leaves[:6])}? Its layers an adapter can "
                              f"wrap: {', '.join(leaves)}")
        for entry, found in matches.items():
            if not any(n in facts.adaptable for n in found):
                inside = _leaves_under(facts, found)
                hint = f"did you mean {', '.join(inside)}?" if inside else \
                    f"its layers an adapter can wrap: {', '.join(leaves)}"
                raise ConfigError(f"{field}: {entry!r} names a {dict(facts.module_types)[found[0]]}, which an adapter "
                                  f"cannot wrap (it wraps linear, Conv1D, convolution and embedding layers); {hint}")


def _check_default_targets(s, facts: ModelFacts) -> None:
    """LoRA without target_modules takes PEFT's table for the model type, else query/value-like names by name."""
    from peft.utils import constants  # deferred: peft is optional (the `large` extra)

    from forgetless.strategies.lora import _FALLBACK_TARGETS  # deferred: as peft

    leaves = set(_adaptable_leaves(facts))
    defaults = tuple(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(facts.model_type, ()))
    if any(names and all(n in leaves for n in names) for names in [defaults, *_FALLBACK_TARGETS]):
        return
    raise ConfigError(f"strategies[{s.display_name()}].params.target_modules: LoRA has no default layers for model "
                      f"type {facts.model_type!r}; set target_modules to some of: {', '.join(sorted(leaves))}")


def _adaptable_leaves(facts: ModelFacts) -> list[str]:
    """The last parts of the adaptable modules' names (what target_modules lists), linear layers first, model order."""
    out: list[str] = []
    kinds = dict(facts.module_types)
    for linear_first in (True, False):
        for name, _ in facts.module_types:
            leaf = name.rsplit(".", 1)[-1]
            if name in facts.adaptable and (kinds[name] != "Embedding") == linear_first and leaf not in out \
                    and not leaf.isdigit():
                out.append(leaf)
    return out


def _leaves_under(facts: ModelFacts, parents: list[str]) -> list[str]:
    out: list[str] = []
    for name in sorted(facts.adaptable, key=[n for n, _ in facts.module_types].index):
        leaf = name.rsplit(".", 1)[-1]
        if any(name.startswith(p + ".") for p in parents) and leaf not in out:
            out.append(leaf)
    return out


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]
