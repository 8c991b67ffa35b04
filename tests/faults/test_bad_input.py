"""Bad input is refused before anything starts: exit 2, one line on stderr, no traceback, no Ray (issue 12, part 4).

A table of the named cases, then hypothesis-generated mutations of the valid configs (examples/*.yaml and conftest's
TINY): wrong types, unknown keys, out-of-range numbers, bad strategy and backbone params, junk deepspeed.extra, bad
--set paths, broken YAML text, binary bytes. `forgetless compare` runs in-process (`forgetless.cli.main`).

Ray is never started here: before running the command, every generated input is checked to fail in the steps that
come before Ray (load_config, preflight.preflight, the embedded cluster's resource check); an input that passes them is
valid after all and is rejected as an example, so the command is only ever run on inputs it must refuse.
"""
from __future__ import annotations

import copy
import io
import os
import string
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import psutil
import pytest
import ray
import torch
import yaml
from conftest import TINY
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from forgetless import cli
from forgetless.backbones.builtin import CNN1dParams, ConvParams, MLPParams
from forgetless.backbones.resnet import ResNetParams
from forgetless.config import ConfigError, load_config
from forgetless.platform.worker.engine import PLATFORM_DEEPSPEED_KEYS
from forgetless.platform.driver.ray_cluster import check_embedded_resources
from forgetless.platform.driver.preflight import preflight
from forgetless.strategies import available_strategies, get_strategy_class

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BASES = {"TINY": TINY, **{p.stem: yaml.safe_load(p.read_text()) for p in sorted(EXAMPLES.glob("*.yaml"))}}
GENERATED_EXAMPLES = 1100
COUNTS: dict[str, int] = {}  # refused inputs per family, checked by test_at_least_1000_generated_inputs_were_refused


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    """The command runs in a fresh folder (its default ./forgetless_runs and ./mlflow.db), on the embedded default."""
    if ray.is_initialized():  # an earlier file in this process started it (conftest's ray_session starts it again)
        ray.shutdown()
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("bad_input")
    mp.chdir(folder)
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        mp.delenv(name, raising=False)
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield folder, children_before
    mp.undo()


def refusal(config: Path, overrides: list[str]) -> str | None:
    """The error of the steps `forgetless compare` takes before Ray starts, or None for a valid input."""
    try:
        cfg = load_config(config, overrides)
        preflight(cfg)
        check_embedded_resources(cfg)
    except ConfigError as e:
        return str(e)
    return None


def assert_refused_in_one_line(argv: list[str], children_before: set[int]) -> str:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(argv)
    lines = err.getvalue().splitlines()
    assert code == 2, (argv, err.getvalue())
    assert len(lines) == 1 and lines[0].startswith("forgetless: error: "), (argv, err.getvalue())
    assert "Traceback" not in err.getvalue()
    assert not ray.is_initialized(), argv
    spawned = [p for p in psutil.Process().children(recursive=True) if p.pid not in children_before]
    assert not spawned, (argv, [p.name() for p in spawned])
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# the named cases of the issue


class PickledCode:
    """Unpickled, this would create a folder: the refusal must come before anything of it runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _tiny(**fields) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg.update(copy.deepcopy(fields))
    return cfg


def _weights(folder: Path, kind: str) -> str:
    path = folder / f"weights_{kind}.pt"
    if kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "pickle":
        torch.save({"backbone.body.1.weight": PickledCode(folder / "pickle_ran")}, path)
    elif kind == "list":
        torch.save([torch.zeros(3)], path)
    elif kind == "other_architecture":
        torch.save({"body.1.weight": torch.zeros(7, 7), "body.1.bias": torch.zeros(7)}, path)
    return str(path)


NAMED_CASES = [
    # (case, config (a dict, or a file kind), --set overrides, what the line must say)
    ("unknown built-in backbone param", _tiny(backbone={"name": "mlp", "params": {"hidden": [32], "depth": 3}}), [],
     "backbone: params.depth: backbone 'mlp' has no such parameter"),
    ("wrongly typed built-in backbone param", _tiny(backbone={"name": "mlp", "params": {"hidden": "32"}}), [],
     "params.hidden: Input should be a valid list"),
    ("cnn1d kernel_size not a number", _tiny(backbone={"name": "cnn1d", "params": {"kernel_size": "5"}}), [],
     "params.kernel_size"),
    ("resnet width of 0", _tiny(backbone={"name": "resnet", "params": {"widths": [16, 0]}}), [], "params.widths.1"),
    ("cnn2d on inputs it cannot take", _tiny(backbone={"name": "cnn2d", "params": {"channels": [4, 4, 4, 4, 4]}}),
     [], "cannot take the tasks' inputs"),
    ("junk deepspeed.extra: misspelt key", _tiny(deepspeed={"extra": {"steps_per_prnt": 10}}), [],
     "deepspeed.extra.steps_per_prnt: DeepSpeed has no such setting"),
    ("junk deepspeed.extra: wrong type in a ZeRO field",
     _tiny(deepspeed={"extra": {"zero_optimization": {"reduce_bucket_size": "big"}}}), [],
     "DeepSpeedZeroConfig.reduce_bucket_size"),
    ("junk deepspeed.extra: wrong type at the top", _tiny(deepspeed={"extra": {"wall_clock_breakdown": "yes"}}), [],
     "deepspeed.extra.wall_clock_breakdown: expected true/false"),
    ("deepspeed.extra sets what forgetless sets", _tiny(deepspeed={"extra": {"train_batch_size": 7}}), [],
     "set train.batch_size"),
    ("text file as backbone.weights", "weights:text", [], "backbone.weights"),
    ("pickle of arbitrary objects as backbone.weights", "weights:pickle", [], "pickled Python objects"),
    ("a list of tensors as backbone.weights", "weights:list", [], "not a state dict"),
    ("weights of another architecture", "weights:other_architecture", [], "backbone.weights: "),
    ("binary file as the config", "binary", [], "is not a text file"),
    ("folder as the config", "folder", [], "is a folder"),
    ("--set a list item that does not exist", TINY, ["strategies.9.name=x"], "there is no item 9"),
    ("--set a path through a value", TINY, ["train.epochs.x=1"], "is the value 2, not a mapping"),
    ("--set a list index that is not a number", TINY, ["targets.first.classes=[1]"], "must be an item number"),
    ("num_workers above the machine's CPUs", _tiny(scaling={"num_workers": 512}), [],
     "the embedded Ray cluster) has"),
    ("YAML syntax error", "yaml", [], "not valid YAML at line 4, column 8: while parsing a flow mapping (begun at line 3, column 9)"),
]


def _config_path(folder: Path, config) -> str:
    path = folder / "named.yaml"
    if config == "binary":
        path.write_bytes(b"\x80\x93\x00\xffPK\x03\x04" + bytes(range(256)))
    elif config == "folder":
        return str(folder)
    elif config == "yaml":
        path.write_text("name: tiny\nseed: 0\nsource: {dataset: digits\ntargets: []\n")
    elif isinstance(config, str) and config.startswith("weights:"):
        path.write_text(yaml.safe_dump(_tiny(backbone={"name": "mlp", "params": {"hidden": [32]},
                                                       "weights": _weights(folder, config.split(":")[1])})))
    else:
        path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("case, config, overrides, needle", NAMED_CASES, ids=[c[0] for c in NAMED_CASES])
def test_named_bad_inputs_are_refused_in_one_line_before_ray(cli_dir, case, config, overrides, needle):
    folder, children_before = cli_dir
    argv = ["compare", _config_path(folder, config), *[a for o in overrides for a in ("--set", o)]]
    line = assert_refused_in_one_line(argv, children_before)
    assert needle in line, line
    assert not (folder / "pickle_ran").exists()  # the pickled code never ran
    assert not (folder / "mlflow.db").exists()  # nothing started, nothing written


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has GPUs")
def test_use_gpu_without_gpus_is_refused_before_ray(cli_dir):
    folder, children_before = cli_dir
    path = folder / "gpu.yaml"
    path.write_text(yaml.safe_dump(_tiny(scaling={"num_workers": 1, "use_gpu": True})))
    line = assert_refused_in_one_line(["compare", str(path)], children_before)
    assert "scaling.use_gpu: 1 workers need 1 GPUs" in line


# ---------------------------------------------------------------------------------------------------------------------
# generated bad inputs

WORDS = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=8)
WRONG_VALUES = {  # values of another kind than the original, by the original's kind
    str: [{"zz_junk": 1}, [[1]], 3.5],
    bool: ["maybe", [1], {"zz_junk": 1}, 7],
    int: ["seven", [1], {"zz_junk": 1}, 2.5],
    float: ["fast", [0.1], {"zz_junk": 1}],
    list: ["zz-not-a-list", {"zz_junk": 1}, 5],
    dict: ["zz-not-a-mapping", [1, 2], 5],
}
OUT_OF_RANGE = [-1, 0, -0.5, 10**9, -10**9, 1e30, float("nan")]
BACKBONE_PARAMS = {"mlp": MLPParams, "cnn2d": ConvParams, "cnn1d": CNN1dParams, "resnet": ResNetParams}
JUNK_PARAM_VALUES = ["zz", [0], [-3], {"zz": 1}, 0, -1, 2.5, [True], None, [[1]], "", -10**6]
TRANSFER_STRATEGIES = [n for n in available_strategies() if get_strategy_class(n).transfer]
DEEPSPEED_BOOL_KEYS = ["wall_clock_breakdown", "prescale_gradients", "memory_breakdown", "dump_state",
                       "dataloader_drop_last", "disable_allgather"]
DEEPSPEED_SECTIONS = ["zero_optimization", "fp16", "bf16", "comms_logger", "tensorboard", "csv_monitor"]
DEEPSPEED_REMOVED = ["nebula", "amp", "elasticity", "sparse_attention", "curriculum_learning"]
YAML_BREAKERS = ["[", "]", "{", "}", ": :", "\t", "&", "*x", "!!python/object/apply:os.system ['true']", "'", '"',
                 "%", "@", "`", "|\n  - ", "\x00", "? ", "- - ", ":\n", "\x07"]


def _nodes(data, path=()):
    """(path, value) of every node below the root; paths are tuples of keys and list indexes."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        yield path + (key,), value
        yield from _nodes(value, path + (key,))


def _set(data, path, value):
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@st.composite
def wrong_type(draw, base):
    nodes = [(p, v) for p, v in _nodes(base) if type(v) in WRONG_VALUES]
    path, value = draw(st.sampled_from(nodes))
    return _set(base, path, draw(st.sampled_from(WRONG_VALUES[type(value)]))), []


@st.composite
def unknown_key(draw, base):
    mappings = [()] + [p for p, v in _nodes(base) if isinstance(v, dict)]
    path = draw(st.sampled_from(mappings))
    key = "zz_" + draw(WORDS)
    value = draw(st.sampled_from([1, "x", [1], {"a": 1}, None]))
    return (_set(base, path + (key,), value) if path else {**copy.deepcopy(base), key: value}), []


@st.composite
def out_of_range(draw, base):
    nodes = [p for p, v in _nodes(base) if type(v) in (int, float)]
    return _set(base, draw(st.sampled_from(nodes)), draw(st.sampled_from(OUT_OF_RANGE))), []


@st.composite
def bad_strategy_params(draw, base):
    name = draw(st.sampled_from(TRANSFER_STRATEGIES))
    field = draw(st.sampled_from([*get_strategy_class(name).Config.model_fields, "zz_" + draw(WORDS)]))
    params = {field: draw(st.sampled_from(JUNK_PARAM_VALUES))}
    return {**copy.deepcopy(base), "strategies": [{"name": name, "params": params}]}, []


@st.composite
def bad_backbone_params(draw, base):
    name = draw(st.sampled_from(sorted(BACKBONE_PARAMS)))
    field = draw(st.sampled_from([*BACKBONE_PARAMS[name].model_fields, "zz_" + draw(WORDS)]))
    params = {field: draw(st.sampled_from(JUNK_PARAM_VALUES))}
    return {**copy.deepcopy(base), "backbone": {"name": name, "params": params}}, []


@st.composite
def junk_deepspeed_extra(draw, base):
    key_and_value = draw(st.one_of(
        st.tuples(WORDS.map(lambda w: "zz_" + w), st.sampled_from([1, "x", {"a": 1}])),
        st.tuples(st.sampled_from([k for k in PLATFORM_DEEPSPEED_KEYS if "." not in k]), st.sampled_from([1, 64]))
        .map(lambda kv: (kv[0], {"type": "Adam"} if kv[0] in ("optimizer", "scheduler") else kv[1])),
        st.tuples(st.sampled_from(DEEPSPEED_BOOL_KEYS), st.sampled_from(["yes", 3, [1], {"a": 1}])),
        st.tuples(st.sampled_from(DEEPSPEED_SECTIONS), st.sampled_from([3, "x", [1], {"zz_bogus": 1}])),
        st.tuples(st.sampled_from(DEEPSPEED_REMOVED), st.sampled_from([{}, {"enabled": True}])),
    ))
    deepspeed = {**copy.deepcopy(base.get("deepspeed", {})), "extra": dict([key_and_value])}
    return {**copy.deepcopy(base), "deepspeed": deepspeed}, []


@st.composite
def bad_set_path(draw, base):
    scalars = [".".join(map(str, p)) for p, v in _nodes(base) if not isinstance(v, (dict, list))]
    word = draw(WORDS)
    n_strategies = len(base.get("strategies", [None]))
    override = draw(st.sampled_from([
        f"strategies.{n_strategies + draw(st.integers(0, 50))}.name=x",
        f"strategies.-{draw(st.integers(1, 9))}.name=x",
        f"strategies.{word}.name=x",
        f"{draw(st.sampled_from(scalars))}.{word}=1",
        f"{draw(st.sampled_from(scalars))}..{word}=1",
        f".{word}=1",
        f"{word}.=1",
        f"train.{word}",
        f"zz_{word}.{word}=1",
    ]))
    return copy.deepcopy(base), [override]


@st.composite
def broken_yaml(draw, base):
    text = yaml.safe_dump(base, sort_keys=False)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(YAML_BREAKERS)) + text[at:]
    else:
        text = text[:draw(st.integers(0, len(text) - 1))]
    return text, []


@st.composite
def binary_bytes(draw, base):
    data = draw(st.binary(max_size=300))
    at = draw(st.integers(0, len(data)))
    return data[:at] + b"\x80" + data[at:], []  # a byte no UTF-8 text starts a character with


FAMILIES = {f.__name__: f for f in (wrong_type, unknown_key, out_of_range, bad_strategy_params, bad_backbone_params,
                                    junk_deepspeed_extra, bad_set_path, broken_yaml, binary_bytes)}


@st.composite
def bad_inputs(draw):
    family = draw(st.sampled_from(sorted(FAMILIES)))
    base = draw(st.sampled_from(sorted(BASES)))
    config, overrides = draw(FAMILIES[family](BASES[base]))
    return family, config, overrides


def _write(folder: Path, config) -> Path:
    path = folder / "generated.yaml"
    if isinstance(config, bytes):
        path.write_bytes(config)
    elif isinstance(config, str):
        path.write_text(config)
    else:
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@settings(max_examples=GENERATED_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(bad_inputs())
def test_generated_bad_inputs_are_refused_in_one_line_before_ray(cli_dir, generated):
    folder, children_before = cli_dir
    family, config, overrides = generated
    path = _write(folder, config)
    if refusal(path, overrides) is None:
        reject()  # the mutation happens to be a valid config (e.g. a seed of -1): nothing to refuse
    event(family)
    assert_refused_in_one_line(["compare", str(path), *[a for o in overrides for a in ("--set", o)]],
                               children_before)
    COUNTS[family] = COUNTS.get(family, 0) + 1


def test_at_least_1000_generated_inputs_were_refused():
    if not COUNTS:
        pytest.skip("runs after test_generated_bad_inputs_are_refused_in_one_line_before_ray (same module)")
    assert sum(COUNTS.values()) >= 1000, COUNTS
    assert set(COUNTS) == set(FAMILIES), COUNTS  # every family produced refused inputs
