"""Reading an experiment config: the YAML file (one-line errors with line and column) and `--set key.path=value`
overrides applied to the raw mapping before it is validated (`forgetless.config.load_config` does both)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from forgetless.errors import ConfigError


def _parse_value(text: str) -> Any:
    # `--set a.b=3` should give an int, `--set a=[1,2]` a list: parse the value as YAML.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (values parsed as YAML) to a raw config mapping.

    List items are addressed by index (`strategies.0.params.alpha=0.1`); a missing mapping key is created (the schema
    then says whether it exists), a missing list item or a path through a plain value is a ConfigError.
    """
    data = json.loads(json.dumps(data))  # deep copy of plain data
    _expand_strategy_names(data)  # `strategies: [finetune]` -> mappings, so `strategies.0.params.x=...` has a place
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=3")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if "" in parts:
            raise ConfigError(f"--set {item!r}: {key.strip()!r} has an empty part; write dotted field names, "
                              f"e.g. --set train.epochs=3")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, item, ".".join(parts[:depth]))
        _place(node, parts[-1], _parse_value(value), item, ".".join(parts[:-1]))
    return data


def _expand_strategy_names(data: dict[str, Any]) -> None:
    if isinstance(data.get("strategies"), list):
        data["strategies"] = [{"name": s} if isinstance(s, str) else s for s in data["strategies"]]


def _child(node: Any, part: str, item: str, where: str) -> Any:
    """The node under `node[part]` on the way down an override's path (a mapping created where none is)."""
    if isinstance(node, list):
        return node[_index(node, part, item, where)]
    if not isinstance(node, dict):
        raise _not_a_container(node, item, where)
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _place(node: Any, last: str, value: Any, item: str, where: str) -> None:
    if isinstance(node, list):
        node[_index(node, last, item, where)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise _not_a_container(node, item, where)


def _not_a_container(node: Any, item: str, where: str) -> ConfigError:
    return ConfigError(f"--set {item!r}: {where} is the value {node!r}, not a mapping or a list, so it has no fields; "
                       f"set {where} itself (--set {where}=...)")


def _index(node: list, part: str, item: str, where: str) -> int:
    try:
        i = int(part)
    except ValueError:
        raise ConfigError(f"--set {item!r}: {where} is a list, so {part!r} must be an item number "
                          f"(0 to {len(node) - 1})") from None
    if not 0 <= i < len(node):
        raise ConfigError(f"--set {item!r}: {where} has {len(node)} item(s), numbered 0 to {len(node) - 1}; "
                          f"there is no item {part}")
    return i


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; ConfigError (one line, with line and column for syntax) otherwise."""
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; pass the path of a YAML file (see examples/)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not a text file (byte {e.start} is not UTF-8); pass the "
                          f"path of a YAML file") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({e.strerror}); check its permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML {_yaml_where(e, text)}: {_yaml_problem(e)}; fix the YAML there") \
            from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields (name: ..., source: ...), "
                          f"not {type(data).__name__}")
    return data


def _yaml_where(e: yaml.YAMLError, text: str) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        line, column = mark.line, mark.column
    else:  # a ReaderError (a character YAML does not allow) knows only its offset in the text
        offset = getattr(e, "position", 0)
        line = text.count("\n", 0, offset)
        column = offset - (text.rfind("\n", 0, offset) + 1)
    return f"at line {line + 1}, column {column + 1}"  # PyYAML counts from 0, editors from 1


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.reader.ReaderError):
        return f"character {e.character!r} is not allowed in YAML ({e.reason})"
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    mark = getattr(e, "context_mark", None)
    if context and mark is not None:  # where the unclosed bracket or quote began
        context += f" (begun at line {mark.line + 1}, column {mark.column + 1})"
    return " ".join((f"{context}: {problem}" if context else problem).split())
