"""Every check that can run before Ray starts: strategies against the config, DeepSpeed's extra keys, storage,
the user's weights (weights_only), a Hugging Face model against the config (its config.json and module tree, no
weights: preflight_lm), tracking, the tasks and a built-in backbone built once on them.
"""
from __future__ import annotations

import re
import warnings

import torch

from forgetless import storage
from forgetless.backbones import TransferModel, build_backbone, is_builtin_backbone
from forgetless.config import ConfigError, ExperimentConfig
from forgetless.data import build_stream
from forgetless.platform.driver import preflight_lm
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.worker import shared_tasks
from forgetless.platform.worker.engine import check_deepspeed_extra
from forgetless.platform.worker.model_io import load_pretrained, load_torch_file
from forgetless.strategies import (
    available_strategies,
    get_strategy_class,
    make_strategy,
)
from forgetless.strategies.base import task_infos


def preflight(cfg: ExperimentConfig) -> str:
    """Everything that can be checked without starting Ray; returns the resolved tracking URI."""
    _check_strategies(cfg)
    if cfg.deepspeed.extra:
        try:
            check_deepspeed_extra(cfg.deepspeed, cfg.scaling.use_gpu)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    # storage first: a missing bucket or wrong credentials is the likeliest cluster error, and the clearest
    storage.preflight(cfg.storage)
    weights = None
    if cfg.backbone.weights:
        storage.check_readable(cfg.backbone.weights, "backbone.weights")
        weights = _load_user_weights(cfg.backbone.weights)
    # a Hugging Face model's config.json and module tree against block sizes, prompts, tokenizers, layer names
    model_facts = preflight_lm.check_model(cfg)
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_reachable(uri)
    # The tasks are built once here too, so a bad class id or an unreadable file fails before Ray starts.
    try:
        tasks = build_stream(cfg.source, cfg.targets)
    except (ValueError, OSError) as e:
        raise ConfigError(f"tasks: {e}") from None
    preflight_lm.check_built_tasks(cfg, model_facts, tasks)
    shared_tasks.remember(cfg, tasks)  # the runs' workers read these from the object store instead of rebuilding
    _check_builtin_model(cfg, tasks, weights)
    for s in cfg.strategies:  # the strategies' own whole-experiment checks (e.g. a permutation spec exists)
        try:
            make_strategy(s.name, s.params, cfg.train.epochs, cfg.train.lr).check(cfg, tasks, load_torch_file)
        except (ValueError, OSError) as e:
            raise ConfigError(f"strategies[{s.display_name()}]: {e}") from None
    return uri


def _check_strategies(cfg: ExperimentConfig) -> None:
    for s in cfg.strategies:
        cls = get_strategy_class(s.name)
        if not cls.transfer:
            raise ConfigError(f"strategies[{s.display_name()}]: {s.name} is the platform's own source pre-training, "
                              f"not a transfer strategy; configure it under pretrain: and list transfer strategies")
        if cfg.deepspeed.zero_stage > cls.max_zero_stage:
            raise ConfigError(
                f"strategies[{s.display_name()}]: {s.name} supports DeepSpeed ZeRO stage <= {cls.max_zero_stage} "
                f"(it reads weights outside a module's forward); set deepspeed.zero_stage to {cls.max_zero_stage}"
            )
        if cfg.deepspeed.partitions_only and not cls.works_on_partitions:
            keep = [n for n in available_strategies() if get_strategy_class(n).works_on_partitions
                    and get_strategy_class(n).transfer]
            raise ConfigError(
                f"strategies[{s.display_name()}]: {s.name} reads or rewrites whole weights outside the engine, so "
                f"under ZeRO-3 every worker would build and gather the full model, which deepspeed.partitions_only "
                f"refuses; strategies that stay partitioned: {keep} (or set deepspeed.partitions_only: false)")
        if cls.supported_backbones is not None and not any(cfg.backbone.name.startswith(b)
                                                           for b in cls.supported_backbones):
            raise ConfigError(f"strategies[{s.display_name()}]: {s.name} does not support backbone "
                              f"{cfg.backbone.name!r}; supported: {list(cls.supported_backbones)}")
        if cfg.evaluation == "task_incremental" and not cls.has_per_task_parts:
            raise ConfigError(f"evaluation: {s.name} keeps no per-task parts, so task-incremental evaluation does not "
                              f"apply; set evaluation: class_incremental")


_SAVE_HINT = "save the weights with torch.save(model.state_dict(), PATH)"


def _load_user_weights(uri: str) -> dict[str, torch.Tensor]:
    """backbone.weights as the workers will load it (torch.load, weights_only=True), here, before anything starts."""
    with warnings.catch_warnings(record=True) as caught:
        # torch warns about a pickle protocol other than torch.save's before it refuses such a file ("Detected pickle
        # protocol 4 ..."): a line on stderr above the one-line error; what it says goes into that error instead
        warnings.simplefilter("always")
        try:
            state = load_torch_file(uri)
        except Exception as e:  # noqa: BLE001 - torch.load raises a different type for each kind of file it cannot read
            raise _weights_error(uri, e, _pickle_protocol(caught)) from None
    return _state_dict_or_refuse(uri, state)


def _pickle_protocol(caught: list[warnings.WarningMessage]) -> str:
    found = next((re.search(r"pickle protocol (\d+)", str(w.message)) for w in caught
                  if "pickle protocol" in str(w.message)), None)
    return f", written with pickle protocol {found.group(1)}, not torch.save's 2" if found else ""


def _weights_error(uri: str, e: Exception, protocol: str) -> ConfigError:
    if str(e).startswith("Weights only load failed"):
        refused = re.search(r"(?i)unsupported global:? (?:GLOBAL )?([\w.]+)", str(e))
        what = f" ({refused.group(1)}{protocol})" if refused else f" ({protocol[2:]})" if protocol else ""
        return ConfigError(f"backbone.weights: {uri} holds pickled Python objects{what}, which forgetless never "
                           f"unpickles (torch.load with weights_only=True); {_SAVE_HINT}")
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return ConfigError(f"backbone.weights: {uri} is not a PyTorch weights file ({type(e).__name__}: {first}"
                       f"{protocol}); {_SAVE_HINT}")


def _state_dict_or_refuse(uri: str, state) -> dict[str, torch.Tensor]:
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items())):
        what = f"a {type(state).__name__}" + (f" of {len(state)} item(s)" if hasattr(state, "__len__") else "")
        raise ConfigError(f"backbone.weights: {uri} holds {what}, not a state dict (parameter names to tensors); "
                          f"{_SAVE_HINT}")
    return state


def _check_builtin_model(cfg: ExperimentConfig, tasks, weights: dict[str, torch.Tensor] | None) -> None:
    """Build a built-in backbone on the tasks' inputs once (milliseconds) and load backbone.weights into it: a shape
    the backbone cannot take or weights of another architecture fail here, not in every worker after Ray started.
    (hf:, timm:, torchvision: backbones are checked by their own config checks; building one here would cost more.)"""
    if not is_builtin_backbone(cfg.backbone.name):
        return
    infos = task_infos(tasks)
    try:
        backbone = build_backbone(cfg.backbone.name, infos[0].input_shape, cfg.backbone.params).eval()
        with torch.no_grad():
            for shape in sorted({t.input_shape for t in infos}):
                backbone(torch.zeros(2, *shape))
    except (ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"backbone: {cfg.backbone.name} with params {cfg.backbone.params} cannot take the tasks' "
                          f"inputs {sorted({t.input_shape for t in infos})} ({first}); change backbone.params or "
                          f"the backbone") from None
    if weights is not None:
        try:
            load_pretrained(TransferModel(backbone, [t.num_classes for t in infos]), weights)
        except (ValueError, RuntimeError) as e:  # torch's size-mismatch message spans lines: one line, shortened
            problem = " ".join(str(e).split())[:300]
            raise ConfigError(f"backbone.weights: {problem}; give weights saved from this backbone with these "
                              f"backbone.params") from None
