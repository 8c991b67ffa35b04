"""Write docs/configuration.md, the reference of every experiment-config field, from the pydantic models themselves
(forgetless/config.py, forgetless/config_sections.py, forgetless/search_config.py, and the task and strategy models
they hold): each field's type and constraints, default, description, and an example (the field's own `examples=`,
else the first value one of the configs in examples/ gives it).

    .venv/bin/python tools/config_reference.py > docs/configuration.md

tests/test_config_reference.py fails when the committed page differs from this output, or when a field of a config
section has no description.
"""
from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parent.parent
REGENERATE = ".venv/bin/python tools/config_reference.py > docs/configuration.md"
EXAMPLE_MAX_CHARS = 100
_BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}


def nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models inside a field's type (through unions, lists and mappings)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from nested_models(arg)


def _container_step(annotation: Any) -> str:
    """How a nested model's path continues below a field: `[]` for a list item, `.<key>` for a mapping's value."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        steps = [_container_step(a) for a in typing.get_args(annotation)]
        return next((s for s in steps if s), "")
    if origin is list:
        return "[]"
    if origin is dict:
        return ".<key>"
    return ""


def model_sections(root: type[BaseModel], path: str = "",
                   sections: dict[type[BaseModel], list[str]] | None = None) -> dict[type[BaseModel], list[str]]:
    """Every model reachable from root (depth first, in field order) -> the config paths where it appears."""
    sections = {} if sections is None else sections
    sections.setdefault(root, []).append(path)
    for name, field in root.model_fields.items():
        field_path = f"{path}.{name}" if path else name
        for model in nested_models(field.annotation):
            if model is not root:  # (no config model holds itself)
                model_sections(model, field_path + _container_step(field.annotation), sections)
    return sections


def anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def type_text(annotation: Any) -> str:
    """A field's type as a reader writes it in YAML terms."""
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{anchor(annotation)})"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f'"{a}"' if isinstance(a, str) else json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_text(a) for a in args)
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return f"mapping {type_text(args[0])} → {type_text(args[1])}"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def constraints_text(field: FieldInfo) -> str:
    """The bounds pydantic enforces on a field (`> 0`, `at least 1 item`, a pattern)."""
    parts = []
    for item in field.metadata:
        for attribute, symbol in _BOUNDS.items():
            if getattr(item, attribute, None) is not None:
                parts.append(f"{symbol} {getattr(item, attribute)}")
        if getattr(item, "min_length", None) is not None:
            parts.append(f"at least {item.min_length} item(s)")
        if getattr(item, "pattern", None) is not None:
            parts.append(f"matches `{item.pattern}`")
    return ", ".join(parts)


def yaml_value(value: Any) -> str:
    """A value as one line of YAML (flow style)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return "(its defaults)" if isinstance(value, BaseModel) else f"`{yaml_value(value)}`"
    return f"`{yaml_value(field.default)}`"


# The example configs a field's example is taken from, the first that sets it: a fixed list (the demo first), so that
# a new file in examples/ does not change this page
EXAMPLE_FILES = ("digits_transfer.yaml", "split_digits_stream.yaml", "replay_digits_stream.yaml",
                 "fast_vs_finetune.yaml", "trajectory_digits.yaml", "expanse_digits_to_mnist1d.yaml",
                 "expanse_zero3.yaml", "early_stop_search.yaml", "pareto_search.yaml", "lm_prose_to_code.yaml",
                 "lm_three_corpora.yaml")


def example_configs() -> list[tuple[str, dict]]:
    """(file name, mapping) of the example configs, in EXAMPLE_FILES's order."""
    return [(name, yaml.safe_load((REPO / "examples" / name).read_text())) for name in EXAMPLE_FILES]


def values_at(node: Any, parts: list[str]) -> Iterator[Any]:
    """The values at a config path (`[]` steps into every list item, `<key>` into every mapping value)."""
    if not parts:
        yield node
        return
    head, rest = parts[0], parts[1:]
    if head == "[]" and isinstance(node, list):
        for item in node:
            yield from values_at(item, rest)
    elif head == "<key>" and isinstance(node, dict):
        for item in node.values():
            yield from values_at(item, rest)
    elif isinstance(node, dict) and head in node:
        yield from values_at(node[head], rest)


def _path_parts(path: str) -> list[str]:
    return [p for p in path.replace("[]", ".[]").split(".") if p]


def example_text(field: FieldInfo, paths: list[str], examples: list[tuple[str, dict]]) -> str:
    """The field's own example, else the first value an example config gives it."""
    if field.examples:
        return f"`{yaml_value(field.examples[0])}`"
    for path in paths:
        for name, data in examples:
            for value in values_at(data, _path_parts(path)):
                text = yaml_value(value) if value not in (None, {}, []) else ""
                if text and len(text) <= EXAMPLE_MAX_CHARS:  # a long nested value: its own section has examples
                    return f"`{text}` ({name})"
    return other_choice(field) or default_example(field)


def other_choice(field: FieldInfo) -> str:
    """An example where no config sets the field: a choice other than the default (a Literal's or a bool's)."""
    choices = [a for arg in [field.annotation, *typing.get_args(field.annotation)]
               for a in (typing.get_args(arg) if typing.get_origin(arg) is Literal else ())]
    if field.annotation is bool:
        choices = [True, False]
    others = [c for c in choices if c != field.default]
    return f"`{yaml_value(others[0])}`" if others else ""


def default_example(field: FieldInfo) -> str:
    """The last resort: the default, said to be one."""
    if field.is_required() or field.default_factory is not None or field.default is None:
        return ""
    return f"`{yaml_value(field.default)}` (the default)"


def strategy_examples(name: str, examples: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """(file, params) of every use of strategy `name` in the example configs, as the configs its params come from."""
    found = []
    for file, data in examples:
        items = data.get("strategies") or ([data["strategy"]] if "strategy" in data else [])
        found += [(file, item.get("params") or {}) for item in items
                  if isinstance(item, dict) and item.get("name") == name]
    return found


def cell(text: str) -> str:
    """Table-safe text: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("\\\\|", "\\|")


def field_rows(model: type[BaseModel], paths: list[str], examples: list[tuple[str, dict]]) -> list[str]:
    rows = ["| field | type | default | description | example |", "| --- | --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        kind = type_text(field.annotation)
        bounds = constraints_text(field)
        field_paths = [f"{p}.{name}" if p else name for p in paths]
        rows.append(f"| `{name}` | {kind}{', ' + cell(bounds) if bounds else ''} | {default_text(field)} | "
                    f"{cell(field.description or '(no description)')} | "
                    f"{cell(example_text(field, field_paths, examples))} |")
    return rows


def model_section(model: type[BaseModel], paths: list[str], examples: list[tuple[str, dict]]) -> list[str]:
    where = ", ".join(f"`{p}`" for p in paths if p) or "the top level of the YAML file"
    lines = [f'<a id="{anchor(model)}"></a>', f"## {model.__name__}", "",
             f"Where: {where} ({model.__module__}).", ""]
    doc = (model.__doc__ or "").strip()
    if doc and not doc.startswith(("A base class", "Usage docs")):
        lines += [" ".join(doc.split()), ""]
    return lines + field_rows(model, [p for p in paths], examples) + [""]


def strategy_sections(examples: list[tuple[str, dict]]) -> list[str]:
    """One table per registered strategy: its `params:` (the strategy's own Config model)."""
    from forgetless.strategies import available_strategies, get_strategy_class

    lines = ["# Strategy params", "",
             "A strategy's `params:` (in `strategies: [{name: ..., params: {...}}]`) are checked by the strategy's own "
             "Config model (forgetless/strategies/; docs/strategies.md says what each strategy does).", ""]
    for name in sorted(available_strategies()):
        config = get_strategy_class(name).Config
        if not config.model_fields:
            lines += [f"### {name}", "", "No params.", ""]
            continue
        lines += [f"### {name}", "", f"Config: {config.__module__}.{config.__qualname__}", ""]
        lines += field_rows(config, [""], strategy_examples(name, examples))
        lines.append("")
    return lines


def reference_page() -> str:
    from forgetless.config import ExperimentConfig

    examples = example_configs()
    sections = model_sections(ExperimentConfig)
    lines = ["# Configuration reference", "",
             "<!-- Generated from the pydantic models; do not edit by hand. Regenerate with:",
             f"     {REGENERATE}", "     (tests/test_config_reference.py fails when this page is stale) -->", "",
             "Every field of an experiment config (the YAML file given to `forgetless run / compare / tune / submit`, "
             "or a mapping given to `forgetless.run()`): its type and bounds, default, what it does, and an example "
             "(from the configs in examples/ where one sets it). Any field can also be set on the command line with "
             "`--set path=value` (e.g. `--set train.lr=0.002`, `--set strategies.0.params.alpha=0.1`). Unknown keys "
             "are refused. Environment variables: [environment.md](environment.md).", "",
             "Sections: " + ", ".join(f"[{m.__name__}](#{anchor(m)})" for m in sections) + ", "
             "[strategy params](#strategy-params).", ""]
    for model, paths in sections.items():
        lines += model_section(model, paths, examples)
    lines += strategy_sections(examples)
    return "\n".join(lines).rstrip() + "\n"


def undocumented_fields() -> list[str]:
    """`module.Model.field` for every field of a config section (every model an ExperimentConfig holds) that has no
    description. (Strategy params are their strategies' own models: listed on the page, not checked here.)"""
    from forgetless.config import ExperimentConfig

    return [f"{m.__module__}.{m.__name__}.{name}" for m in model_sections(ExperimentConfig)
            for name, f in m.model_fields.items() if not f.description]


if __name__ == "__main__":
    print(reference_page(), end="")
