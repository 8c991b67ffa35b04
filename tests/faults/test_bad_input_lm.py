"""Language-model configs checked against the model before anything starts (issue 34): a block longer than the model's
context, adapter target modules the model does not have, a soft prompt that does not fit, a tokenizer larger than
the model's vocabulary, a model folder whose config.json is broken, and the config-level LM mistakes, each refused in
one line naming the field and the fix, before Ray starts.

Generated cases (hypothesis, >= 500, each malformed by construction) call the steps `forgetless compare` takes before
Ray (load_config, preflight) in this process: every one must raise a one-line ConfigError that names its field, with
Ray never initialised and no tracking store written. A handful of the same refusals, and the untrusted-pickle
`backbone.weights` of issue 28, run through the real CLI in subprocesses (side by side): exit 2, the whole stderr one
line, no traceback, Ray never started.
"""
from __future__ import annotations

import copy
import json
import os
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")
pytest.importorskip("peft")

from forgetless.config import ConfigError, load_config
from forgetless.data import lm
from forgetless.platform.driver.preflight import preflight

CONTEXT = 64  # n_positions of the tiny decoder
VOCAB = 300
GENERATED_EXAMPLES = 520
COUNTS: dict[str, int] = {}  # refused inputs per family, checked by test_at_least_500_generated_lm_inputs_were_refused
SECONDS: list[float] = []

# Layer names of other architectures (none is a layer of GPT-2), the layers of GPT-2 an adapter can wrap, and modules
# of GPT-2 that are not layers an adapter can wrap.
FOREIGN_LAYERS = ["q_proj", "v_proj", "k_proj", "o_proj", "query", "value", "key", "dense", "fc1", "fc2", "gate_proj",
                  "up_proj", "down_proj", "W_pack", "qkv", "out_proj", "c_attention", "attn.q_proj"]
GPT2_LAYERS = ["c_attn", "c_proj", "c_fc", "attn.c_attn", "mlp.c_fc", "lm_head"]
GPT2_NOT_ADAPTABLE = ["attn", "mlp", "h", "transformer", "ln_1", "ln_2", "ln_f", "drop", "act", "attn_dropout",
                      "resid_dropout", "h.0", "0", "h.1.attn", "transformer.h"]
WORDS = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=8)


def make_decoder(folder: Path) -> Path:
    """A 2-layer GPT-2 (context 64, hidden 16) with a byte-level BPE tokenizer of 300 tokens, no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = lm.train_tokenizer(list(lm.prose_documents()[:40]), VOCAB, folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=CONTEXT, n_embd=16, n_layer=2, n_head=2,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny decoder, a tokenizer with more tokens than its vocabulary, and model folders with broken config.json."""
    root = tmp_path_factory.mktemp("lm_bad_input")
    decoder = make_decoder(root / "tiny-gpt2")
    big = lm.train_tokenizer(list(lm.prose_documents()[:120]), 2 * VOCAB, root / "big-tokenizer")
    assert len(big) > VOCAB
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    return {"decoder": decoder, "big_tokenizer": root / "big-tokenizer", "broken": broken}


@pytest.fixture(scope="module")
def in_folder(tmp_path_factory):
    """The checks run in a fresh folder (a tracking store would be written there) with no Ray address."""
    if ray.is_initialized():  # an earlier test of this process started it
        ray.shutdown()
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("lm_cwd")
    mp.chdir(folder)
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        mp.delenv(name, raising=False)
    yield folder
    mp.undo()


def base_config(decoder: Path, strategies=None) -> dict:
    task = {"kind": "causal_lm", "block_size": 32, "max_train_blocks": 8, "max_eval_blocks": 4}
    return {"name": "lm", "source": {**task, "dataset": "prose", "name": "prose"},
            "targets": [{**task, "dataset": "python_code", "name": "code"}],
            "backbone": {"name": f"hf:{decoder}"}, "pretrain": {"epochs": 1, "checkpoint_every": 1},
            "train": {"epochs": 1}, "strategies": strategies or ["finetune"], "scaling": {"num_workers": 1}}


def refusal(config: dict, overrides: list[str]) -> str | None:
    """The error of the steps `forgetless compare` takes before Ray starts, or None."""
    try:
        preflight(load_config(config, overrides))
    except ConfigError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# generated malformed language-model configs and overrides, each refused by construction


def _task_path(where: str) -> str:
    return "source" if where == "source" else "targets.0"


@st.composite
def block_longer_than_the_context(draw, f):
    where = draw(st.sampled_from(["source", "targets"]))
    size = draw(st.integers(CONTEXT + 1, 65536))
    cfg = base_config(f["decoder"])
    if draw(st.booleans()):
        return cfg, [f"{_task_path(where)}.block_size={size}"], "block_size"
    task = cfg["source"] if where == "source" else cfg["targets"][0]
    task["block_size"] = size
    return cfg, [], "block_size"


@st.composite
def target_modules_the_model_lacks(draw, f):
    foreign = draw(st.lists(st.one_of(st.sampled_from(FOREIGN_LAYERS), WORDS.map(lambda w: "zz" + w)), min_size=1,
                            max_size=3))
    known = draw(st.lists(st.sampled_from(GPT2_LAYERS), max_size=2))
    names = draw(st.permutations(foreign + known))
    return _lora(f, names, draw(st.booleans())) + ("did you mean",)


@st.composite
def target_modules_that_are_not_layers(draw, f):
    names = draw(st.lists(st.sampled_from(GPT2_NOT_ADAPTABLE), min_size=1, max_size=2, unique=True))
    known = draw(st.lists(st.sampled_from(GPT2_LAYERS), max_size=2))
    return _lora(f, names + known, draw(st.booleans())) + ("an adapter cannot wrap",)


def _lora(f, names: list[str], as_override: bool) -> tuple:
    if as_override:
        return base_config(f["decoder"], ["finetune", "lora"]), [f"strategies.1.params.target_modules={names}"]
    return base_config(f["decoder"], [{"name": "lora", "params": {"r": 4, "target_modules": names}}]), []


@st.composite
def soft_prompt_longer_than_the_room(draw, f):
    block = draw(st.integers(8, CONTEXT))
    prompt = draw(st.integers(CONTEXT - block + 1, 1024))
    cfg = base_config(f["decoder"], [{"name": "input_space", "params": {"prompt_tokens": prompt}}])
    overrides = [f"source.block_size={block}", f"targets.0.block_size={block}"]
    if draw(st.booleans()):  # the prompt by override instead
        cfg["strategies"] = ["input_space"]
        overrides.append(f"strategies.0.params.prompt_tokens={prompt}")
    return cfg, overrides, "prompt_tokens"


@st.composite
def tokenizer_larger_than_the_vocabulary(draw, f):
    where = draw(st.sampled_from(["source", "targets"]))
    field = "source.tokenizer" if where == "source" else "targets[0].tokenizer"
    block = draw(st.integers(8, CONTEXT))  # any block that fits: the tokenizer is what does not
    overrides = [f"source.block_size={block}", f"targets.0.block_size={block}"]
    return base_config(f["decoder"]), [*overrides, f"{_task_path(where)}.tokenizer={f['big_tokenizer']}"], field


@st.composite
def broken_model_config(draw, f):
    content = draw(st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=40).filter(lambda t: not _is_json_mapping_with_type(t)),  # junk or JSON without model_type
        st.sampled_from(["{}", "[]", "null", '{"model_type": 3}', '{"model_type": "zz_no_such_model"}',
                         '{"model_type": "vit"}', '{"model_type": "bert", "vocab_size": "many"}']),
        st.dictionaries(WORDS, st.integers(), max_size=3).map(json.dumps),
    ))
    (f["broken"] / "config.json").write_text(content)
    cfg = base_config(f["decoder"])
    cfg["backbone"] = {"name": f"hf:{f['broken']}"}
    return cfg, [], "backbone.name"


def _is_json_mapping_with_type(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict) and "model_type" in json.loads(text)
    except ValueError:
        return False


LM_FIELD_MISTAKES = [  # (override, what the line names)
    ("source.block_size=4", "block_size"), ("targets.0.block_size=0", "block_size"),
    ("source.block_size=-32", "block_size"), ("targets.0.block_size=100000", "block_size"),
    ("source.max_train_blocks=0", "max_train_blocks"), ("targets.0.max_eval_blocks=-1", "max_eval_blocks"),
    ("source.kind=causal", "kind"), ("targets.0.text_field=[1]", "text_field"),
    ("source.classes=[0,1]", "classes"), ("targets.0.transforms=[{kind: permute}]", "transforms"),
    ("evaluation=class_incremental", "evaluation"), ("backbone.params.output=features", "output"),
    ("score=perplexity", "score"), ("backbone.name=mlp", "backbone.name"), ("strategies=[fast]", "strategies"),
    ("strategies=[{name: lora, params: {r: 0}}]", "r"), ("strategies=[{name: lora, params: {target_modules: 5}}]",
                                                       "target_modules"),
    ("strategies=[{name: input_space, params: {prompt_tokens: 0}}]", "prompt_tokens"),
    ("targets.0.dataset=missing.jsonl", "does not exist"), ("source.dataset=x.npz", "unknown text dataset"),
    ("backbone.params.pooling=nowhere", "pooling"), ("backbone.params.zz_unknown=1", "unknown"),
    ("backbone.params.gradient_checkpointing=maybe", "gradient_checkpointing"),
]


@st.composite
def lm_field_mistake(draw, f):
    override, needle = draw(st.sampled_from(LM_FIELD_MISTAKES))
    return base_config(f["decoder"]), [override], needle


FAMILIES = {fam.__name__: fam for fam in (block_longer_than_the_context, target_modules_the_model_lacks,
                                          target_modules_that_are_not_layers, soft_prompt_longer_than_the_room,
                                          tokenizer_larger_than_the_vocabulary, broken_model_config, lm_field_mistake)}


@st.composite
def bad_lm_inputs(draw, f):
    family = draw(st.sampled_from(sorted(FAMILIES)))
    return (family, *draw(FAMILIES[family](f)))


def test_generated_lm_inputs_are_refused_in_one_line_before_ray(folders, in_folder):
    @settings(max_examples=GENERATED_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(bad_lm_inputs(folders))
    def refused(generated):
        family, config, overrides, needle = generated
        started = time.perf_counter()
        line = refusal(config, overrides)
        SECONDS.append(time.perf_counter() - started)
        assert line is not None, (family, overrides, config)  # every generated input is malformed by construction
        assert "\n" not in line.strip() and "Traceback" not in line, line
        assert needle in line, (family, needle, line)
        assert not ray.is_initialized()
        event(family)
        COUNTS[family] = COUNTS.get(family, 0) + 1

    refused()
    assert not (in_folder / "mlflow.db").exists() and not (in_folder / "forgetless_runs").exists()


def test_at_least_500_generated_lm_inputs_were_refused():
    if not COUNTS:
        pytest.skip("runs after test_generated_lm_inputs_are_refused_in_one_line_before_ray (same module)")
    print(f"refused per family: {COUNTS}; {sum(SECONDS):.1f} s in the checks")  # (shown with pytest -s)
    assert sum(COUNTS.values()) >= 500, COUNTS
    assert set(COUNTS) == set(FAMILIES), COUNTS  # every family produced refused inputs
    assert sum(SECONDS) < 30, f"{sum(SECONDS):.1f} s for {len(SECONDS)} refusals"  # CI time: each is milliseconds


# ---------------------------------------------------------------------------------------------------------------------
# named cases: the messages say what to do


def test_the_issue_cases_name_the_field_and_the_fix(folders, in_folder):
    decoder = folders["decoder"]
    line = refusal(base_config(decoder), ["targets.0.block_size=128"])
    assert line == (f"targets[0].block_size: 128 tokens do not fit the model's context of 64 positions (n_positions in "
                    f"{decoder}/config.json); set block_size to at most 64")
    line = refusal(base_config(decoder, [{"name": "lora", "params": {"target_modules": ["q_proj", "v_proj"]}}]), [])
    assert line.startswith("strategies[lora].params.target_modules: 'q_proj', 'v_proj' name no layer of this gpt2 "
                           "model") and "did you mean c_proj" in line and "c_attn, c_proj, c_fc" in line, line
    line = refusal(base_config(decoder, [{"name": "lora", "params": {"target_modules": ["attn"]}}]), [])
    assert "'attn' names a GPT2Attention, which an adapter cannot wrap" in line and "c_attn, c_proj" in line, line


def test_a_model_that_fits_passes_and_lora_defaults_are_checked(folders, in_folder, monkeypatch):
    """The checks refuse only what does not fit: a block of the full context, a prompt that exactly fits and LoRA on
    existing layers pass them (the in-process preflight then builds the tasks); LoRA without target_modules on a model
    type that has no default layers is refused."""
    from forgetless.platform.driver import preflight_lm

    decoder = folders["decoder"]
    fits = load_config(base_config(decoder, [{"name": "lora", "params": {"target_modules": ["attn.c_attn", "c_fc"]}},
                                             {"name": "input_space", "params": {"prompt_tokens": 32}}]))
    facts = preflight_lm.check_model(fits)
    assert (facts.context, facts.vocab_size, facts.model_type) == (CONTEXT, VOCAB, "gpt2")
    assert "transformer.h.1.attn.c_attn" in facts.adaptable and "transformer.h.1.attn" not in facts.adaptable
    no_default = load_config(base_config(decoder, ["lora"]))
    monkeypatch.setattr("forgetless.strategies.lora._FALLBACK_TARGETS", (("q_proj",),))
    monkeypatch.setattr("peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", {})
    with pytest.raises(ConfigError, match=r"strategies\[lora\].params.target_modules: LoRA has no default layers for "
                                          r"model type 'gpt2'; set target_modules to some of: .*c_attn"):
        preflight_lm.check_model(no_default)


# ---------------------------------------------------------------------------------------------------------------------
# the real CLI: the whole stderr is one line


class PickledCode:
    """Unpickled, this would create a folder: the refusal must come before anything of it runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _cli_cases(f, root: Path) -> dict[str, tuple[dict, str]]:
    from conftest import TINY

    pickled = root / "pickled.pt"
    torch.save({"backbone.body.1.weight": PickledCode(root / "pickle_ran")}, pickled, pickle_protocol=4)
    weights = {**copy.deepcopy(TINY), "backbone": {"name": "mlp", "params": {"hidden": [32]}, "weights": str(pickled)}}
    long_block = base_config(f["decoder"])
    long_block["targets"][0]["block_size"] = 128
    return {
        "block_size": (long_block, "targets[0].block_size: 128 tokens do not fit the model's context of 64"),
        "target_modules": (base_config(f["decoder"], [{"name": "lora", "params": {"target_modules": ["q_proj",
                                                                                                     "v_proj"]}}]),
                           "did you mean c_proj?"),
        "pickle_protocol_4_weights": (weights, ("holds pickled Python objects (written with pickle protocol 4, not "
                                               "torch.save's 2), which forgetless never unpickles")),
    }


def test_the_cli_refuses_them_in_one_line_of_stderr_before_ray(folders, tmp_path):
    """`forgetless compare` in subprocesses side by side: exit 2, stderr exactly one line (no library warning, no
    traceback before it), nothing on stdout, Ray never started (no "starting Ray" line, no tracking store, no runs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    procs = {}
    for name, (cfg, _) in _cli_cases(folders, tmp_path).items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "c.yaml").write_text(yaml.safe_dump(cfg))
        procs[name] = subprocess.Popen([sys.executable, "-m", "forgetless.cli", "compare", "c.yaml"], cwd=folder,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, (_, needle) in _cli_cases(folders, tmp_path).items():
        out, err = procs[name].communicate(timeout=180)
        assert procs[name].returncode == 2, (name, err)
        assert len(err.splitlines()) == 1 and err.startswith("forgetless: error: "), (name, err)
        assert needle in err and out == "", (name, err, out)
        assert not {"mlflow.db", "forgetless_runs"} & {p.name for p in (tmp_path / name).iterdir()}, name
    assert not (tmp_path / "pickle_ran").exists()  # the pickled code never ran
