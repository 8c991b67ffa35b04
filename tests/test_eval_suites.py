"""General-ability suites (`eval_tasks:`): the built-in multiple-choice suite, JSONL items, log-likelihood scoring (acc,
acc_norm) checked by hand, held-out corpora, the config's checks, and the suites' forgetting."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from forgetless.config import load_config
from forgetless.data import lm, mc_tasks
from forgetless.data.eval_suites import build_eval_suites
from forgetless.errors import ConfigError
from forgetless.platform.analysis.eval_tasks import eval_task_forgetting

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    import sys

    sys.path.insert(0, str(HERE))
    from test_language_models import make_tiny_decoder

    return make_tiny_decoder(tmp_path_factory.mktemp("lm") / "tiny-gpt2")


def test_the_builtin_suite_is_deterministic_four_way_and_disjoint_from_the_code_corpus():
    items = mc_tasks.stdlib_docstring_items()
    assert len(items) >= 100
    rebuilt = mc_tasks.stdlib_docstring_items.__wrapped__()
    assert mc_tasks.suite_digest(list(items)) == mc_tasks.suite_digest(list(rebuilt))
    prose_modules = {p.stem for p in lm._stdlib_modules()[0::2]}
    golds = []
    for item in items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4 and 0 <= item.gold < 4
        module = item.context.split(".", 1)[0].removeprefix("Module ")
        assert module in prose_modules  # never a module the code corpus trains on
        assert item.choices[item.gold].strip() != module
        doc = item.context.split('Docstring: "', 1)[1].rsplit('"', 1)[0]
        assert not re.search(rf"\b{re.escape(item.choices[item.gold].strip())}\b", doc)  # the answer is not given
        golds.append(item.gold)
    assert all(0.15 < golds.count(g) / len(golds) < 0.35 for g in range(4))  # gold positions shuffled: chance 25 %


def test_jsonl_items_and_one_line_errors(tmp_path):
    good = tmp_path / "mc.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [{"context": "2+2=", "choices": [" 4", " 5"], "gold": 0},
                                                      {"context": "sky is", "choices": [" blue", " red", " x"],
                                                       "gold": 2}]))
    items = mc_tasks.load_items(str(good), None)
    assert [i.gold for i in items] == [0, 2] and items[1].choices == (" blue", " red", " x")
    assert len(mc_tasks.load_items(str(good), 1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "a", "choices": [" b", " c"], "gold": 2}))
    with pytest.raises(ValueError, match=r"bad.jsonl: line 1: gold must be the index of the right choice \(0 to 1\)"):
        mc_tasks.load_items(str(bad), None)
    bad.write_text(json.dumps({"context": "a", "choices": [" b"], "gold": 0}))
    with pytest.raises(ValueError, match="line 1 needs a string context and a list of at least 2"):
        mc_tasks.load_items(str(bad), None)


def test_choice_loglikelihood_by_hand():
    """Vocabulary of 3. Row: tokens [0, 1, 2], the choice is positions 1..2. Position 0's logits give token 1
    log-probability log(e^2 / (e^0 + e^2 + e^0)); position 1's give token 2 log(1/3) (uniform)."""
    logits = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]]])
    tokens = torch.tensor([[0, 1, 2]])
    expected = (2.0 - math.log(2 + math.exp(2))) + math.log(1 / 3)
    got = mc_tasks.sequence_loglik(logits, tokens, torch.tensor([1]), torch.tensor([3]))
    assert float(got) == pytest.approx(expected, rel=1e-9)
    only_first = mc_tasks.sequence_loglik(logits, tokens, torch.tensor([1]), torch.tensor([2]))
    assert float(only_first) == pytest.approx(2.0 - math.log(2 + math.exp(2)), rel=1e-9)


def test_acc_and_length_normalised_acc_differ_where_they_should():
    """Item 0: the long gold choice has the lower total but the higher per-character log-likelihood."""
    seqs = mc_tasks.ChoiceSequences("t", torch.zeros(4, 2, dtype=torch.long), torch.zeros(4), torch.zeros(4),
                                    item=torch.tensor([0, 0, 1, 1]), chars=torch.tensor([10.0, 2.0, 3.0, 3.0],
                                                                                        dtype=torch.float64),
                                    gold=torch.tensor([0, 3]), digest="")
    scores = mc_tasks.choice_scores(torch.tensor([-5.0, -2.0, -9.0, -1.0], dtype=torch.float64), seqs)
    assert scores == {"acc": 0.5, "acc_norm": 1.0}


def test_tokenised_items_cut_the_context_from_the_left_and_pad(decoder):
    tok = lm.load_lm_tokenizer(str(decoder))
    item = mc_tasks.ChoiceItem("word " * 50, (" yes", " no"), 1)
    seqs = mc_tasks.tokenize_items("t", [item], tok, max_tokens=16)
    assert seqs.tokens.shape[0] == 2 and seqs.tokens.shape[1] <= 16
    for r, choice in enumerate(item.choices):
        ids = tok(choice, add_special_tokens=False)["input_ids"]
        assert seqs.tokens[r, seqs.start[r]:seqs.end[r]].tolist() == ids
        assert (seqs.tokens[r, seqs.end[r]:] == tok.eos_token_id).all()
    assert seqs.gold.tolist() == [1] and seqs.item.tolist() == [0, 0]


def test_suites_score_a_tiny_decoder_and_a_better_answer_wins(decoder, tmp_path):
    """Scores through the worker's sharded evaluation (one rank): a held-out corpus' perplexity is exp of its loss; a
    suite whose gold is always the model's most likely continuation scores acc 1."""
    from forgetless.backbones.hf import HFBackbone  # noqa: F401  (the hf: backbone the config builds)
    from forgetless.platform.worker.evaluation import evaluate_suites
    from forgetless.platform.worker.model_io import build_model
    from forgetless.strategies import make_strategy

    heldout = tmp_path / "heldout.txt"  # a small held-out corpus: 12 documents of unittest-like lines
    heldout.write_text("\n\n".join(f"self.assertEqual(f({i}), {i * i})\n" * 20 for i in range(12)))
    cfg = load_config(lm_cfg(decoder, eval_tasks=[
        {"kind": "causal_lm", "dataset": str(heldout), "name": "tests_heldout", "block_size": 32,
         "max_eval_blocks": 8},
        {"kind": "multiple_choice", "dataset": "stdlib_docstrings", "max_items": 12, "max_tokens": 48}]))
    model = build_model(cfg, corpus_infos(decoder), make_strategy("finetune", {}, 1, 0.1))
    suites = build_eval_suites(cfg.eval_tasks)
    out = evaluate_suites(model, suites, "val", 0, 1, torch.device("cpu"))
    assert out["tests_heldout"]["perplexity"] == pytest.approx(math.exp(out["tests_heldout"]["loss"]))
    assert 0.0 <= out["stdlib_docstrings"]["acc"] <= 1.0 and len(suites[1].choices.gold) == 12
    # a JSONL suite built from the model's own preferences: the right answer is the likelier one
    seqs = suites[1].choices
    from forgetless.platform.worker.evaluation import _choice_loglik

    ll = _choice_loglik(model, seqs, 0, 1, torch.device("cpu"), 64)
    rows = [json.dumps({"context": it.context, "choices": list(it.choices),
                        "gold": int(torch.argmax(ll[seqs.item == i]))})
            for i, it in enumerate(mc_tasks.load_items("stdlib_docstrings", 12))]
    (tmp_path / "mine.jsonl").write_text("\n".join(rows))
    mine = load_config(lm_cfg(decoder, eval_tasks=[{"kind": "multiple_choice", "dataset": str(tmp_path / "mine.jsonl"),
                                                    "max_tokens": 48}]))
    assert evaluate_suites(model, build_eval_suites(mine.eval_tasks), "val", 0, 1,
                           torch.device("cpu"))["mine"]["acc"] == 1.0


def corpus_infos(folder: Path) -> list:
    """The stream's task descriptions (what build_model needs) without tokenising the corpora."""
    from forgetless.data.kinds import CAUSAL_LM
    from forgetless.strategies.base import TaskInfo

    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    return [TaskInfo(i, name, vocab, [], (1, 32), CAUSAL_LM) for i, name in enumerate(["prose", "python_code"])]


def lm_cfg(folder: Path, **extra) -> dict:
    task = {"kind": "causal_lm", "block_size": 32, "max_train_blocks": 8, "max_eval_blocks": 8}
    return {"name": "lm", "source": {**task, "dataset": "prose"}, "targets": [{**task, "dataset": "python_code"}],
            "backbone": {"name": f"hf:{folder}"}, "strategies": ["finetune"], **extra}


def test_config_fills_tokenizers_and_refuses_clashes(decoder):
    cfg = load_config(lm_cfg(decoder, eval_tasks=[{"kind": "multiple_choice", "dataset": "stdlib_docstrings"},
                                                  {"kind": "causal_lm", "dataset": "python_tests"}]))
    assert all(t.tokenizer == str(Path(decoder).resolve()) for t in cfg.eval_tasks)
    with pytest.raises(ConfigError, match=r"eval_tasks: names must differ .* \['prose'\]"):
        load_config(lm_cfg(decoder, eval_tasks=[{"kind": "causal_lm", "dataset": "prose"}]))
    with pytest.raises(ConfigError, match="eval_tasks: 'digits_all' is a classification task"):
        load_config(lm_cfg(decoder, eval_tasks=[{"dataset": "digits"}]))
    plain = load_config(lm_cfg(decoder))  # eval tasks are part of what a run measures, so of its identity
    assert plain.transfer_key(plain.strategies[0]) != cfg.transfer_key(cfg.strategies[0])


def test_forgetting_of_eval_tasks_by_hand():
    rows = [{"mc": {"acc": 0.5, "acc_norm": 0.6}, "corpus": {"acc": 0.4, "loss": 1.0, "perplexity": math.e}},
            {"mc": {"acc": 0.4, "acc_norm": 0.5}, "corpus": {"acc": 0.3, "loss": 2.0, "perplexity": math.e ** 2}},
            {"mc": {"acc": 0.3, "acc_norm": 0.65}, "corpus": {"acc": 0.35, "loss": 1.5, "perplexity": math.e ** 1.5}}]
    out = eval_task_forgetting(rows)
    assert out["eval/mc/forgetting"] == pytest.approx(0.2)
    assert out["eval/mc/forgetting_norm"] == pytest.approx(-0.05)
    assert out["eval/corpus/forgetting"] == pytest.approx(0.05)
    assert out["eval/corpus/loss_increase"] == pytest.approx(0.5)  # nats: losses subtract
    assert out["eval/corpus/perplexity_ratio"] == pytest.approx(math.e ** 1.5 / math.e)  # perplexities divide
    assert eval_task_forgetting([]) == {}


def test_an_eval_task_longer_than_the_context_is_refused_before_start(decoder, workdir):
    from forgetless.platform.driver.preflight import preflight

    cfg = load_config(lm_cfg(decoder, eval_tasks=[{"kind": "multiple_choice", "dataset": "stdlib_docstrings"}]))
    with pytest.raises(ConfigError, match=r"eval_tasks\[0\].max_tokens: 128 tokens do not fit the model's context of "
                                          r"64 positions .*; set max_tokens to at most 64"):
        preflight(cfg)


def test_the_suites_forgetting_is_a_metric_and_a_column_of_the_table():
    import numpy as np

    from forgetless.platform.analysis.results import StrategyResult, format_table

    history = [{"step": s, "stage": st, "acc": {"0": 0.5, "1": 0.2 + 0.1 * s}} for s, st in ((0, 0), (1, 1), (2, 1))]
    res = StrategyResult("finetune", "finetune", ["prose", "code"], np.array([[0.5, 0.2], [0.4, 0.4]]), history, [],
                         {"1/finetune": 10}, 2, 1.0, 1.0, None, None, "task_incremental",
                         eval_rows=[{"mc": {"acc": 0.5, "acc_norm": 0.5}}, {"mc": {"acc": 0.25, "acc_norm": 0.5}}])
    metrics = res.compute_metrics()
    assert metrics["eval/mc/forgetting"] == pytest.approx(0.25)
    header, row = format_table([res]).splitlines()[0], format_table([res]).splitlines()[2]
    assert "mc forgetting pp" in header and "25.0" in row


def test_the_worker_scores_the_suites_at_points_and_rows(decoder):
    """What train_loop's eval_point and record_row add (worker/eval_tasks.py), on a stand-in for one rank's run: the
    curves and the history record at a point; at each row the suites' columns, kept in the state, and the forgetting
    since row 0."""
    from types import SimpleNamespace

    from forgetless.platform.worker import eval_tasks
    from forgetless.platform.worker.job import RunState
    from forgetless.platform.worker.model_io import build_model
    from forgetless.strategies import make_strategy

    cfg = load_config(lm_cfg(decoder, eval_tasks=[{"kind": "multiple_choice", "dataset": "stdlib_docstrings",
                                                   "max_items": 6, "max_tokens": 48}]))
    model = build_model(cfg, corpus_infos(decoder), make_strategy("finetune", {}, 1, 0.1))
    state = RunState(task_names=["prose", "python_code"], history=[{"step": 0}])
    run = SimpleNamespace(job=SimpleNamespace(config=cfg, mode="transfer"), state=state, model=model, rank=0, world=1,
                          device=torch.device("cpu"), eval_suites=None)
    curves = eval_tasks.curve_point(run, "")
    assert set(curves) == {"val/eval/stdlib_docstrings/acc", "val/eval/stdlib_docstrings/acc_norm"}
    assert state.history[-1]["eval"]["stdlib_docstrings"]["acc"] == curves["val/eval/stdlib_docstrings/acc"]
    first = eval_tasks.row(run, "")
    with torch.no_grad():  # the model changes: the next row differs, and its forgetting says by how much
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    second = eval_tasks.row(run, "")
    assert len(state.eval_rows) == 2 and first["eval/stdlib_docstrings/forgetting"] == 0.0
    assert second["eval/stdlib_docstrings/forgetting"] == pytest.approx(
        first["test/eval/stdlib_docstrings/acc"] - second["test/eval/stdlib_docstrings/acc"])
    run.job.mode = "pretrain"  # the source pre-training run scores no suites
    assert eval_tasks.curve_point(run, "pretrain/") == {}
