"""Causal-LM tasks: the task kind (loss, scores, perplexity), the corpora and their readers, the split by document and
the packing, the config's checks, and every applicable strategy trained on a tiny GPT-2 by real DeepSpeed engines."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import ONE_RANK_DEEPSPEED_PRELUDE  # noqa: E402
from forgetless.config import load_config  # noqa: E402
from forgetless.data import lm  # noqa: E402
from forgetless.data.kinds import CAUSAL_LM, per_sample_scores, sample_labels, task_loss  # noqa: E402
from forgetless.data.spec import TaskConfig  # noqa: E402
from forgetless.data.tasks import build_task  # noqa: E402
from forgetless.errors import ConfigError  # noqa: E402
from forgetless.platform.analysis import metrics as M  # noqa: E402


def make_tiny_decoder(folder: Path, docs: int = 40, vocab: int = 300) -> Path:
    """A 2-layer GPT-2 (hidden 32) with a byte-level BPE tokenizer trained on the first prose documents."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = lm.train_tokenizer(list(lm.prose_documents()[:docs]), vocab, folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp("lm") / "tiny-gpt2")


def lm_config(folder: Path, strategies, **extra) -> dict:
    task = {"kind": "causal_lm", "block_size": 32, "max_train_blocks": 48, "max_eval_blocks": 16}
    cfg = {"name": "lm", "source": {**task, "dataset": "prose"}, "targets": [{**task, "dataset": "python_code"}],
           "backbone": {"name": f"hf:{folder}"}, "pretrain": {"epochs": 1, "checkpoint_every": 1, "batch_size": 16},
           "train": {"epochs": 2, "lr": 0.003, "batch_size": 8}, "strategies": strategies}
    cfg.update(extra)
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# the task kind: loss, scores, perplexity


def test_perplexity_of_a_hand_computed_block():
    """One block [0, 1, 2] over a 4-token vocabulary: position 0 gives the next token (1) probability 1/2, position 1
    gives token 2 probability 1/4, so the mean token loss is (ln 2 + ln 4) / 2 = 1.5 ln 2 and the perplexity
    2^1.5 = 2.828; the last position predicts nothing. Next-token accuracy: position 0's argmax is token 1 (right),
    position 1's is token 0 (wrong): 1/2."""
    p = torch.tensor([[[0.1, 0.5, 0.2, 0.2], [0.5, 0.15, 0.25, 0.1], [0.25, 0.25, 0.25, 0.25]]])
    logits, y = p.log(), torch.tensor([[0, 1, 2]])
    loss = task_loss(CAUSAL_LM, logits, y)
    assert loss.item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert M.perplexity(loss.item()) == pytest.approx(2 ** 1.5, abs=1e-5)
    correct, loss_sum, count = per_sample_scores(CAUSAL_LM, logits, y)
    assert (correct.item(), count.item()) == (1.0, 2.0)
    assert loss_sum.item() / count.item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    # uniform guessing over V tokens has perplexity V; classification keeps plain cross-entropy and accuracy
    assert M.perplexity(task_loss(CAUSAL_LM, torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long)).item()) \
        == pytest.approx(7.0)
    c, _, n = per_sample_scores("classification", torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    assert c.tolist() == [1.0, 0.0] and n.tolist() == [1.0, 1.0]


def test_the_causal_lm_loss_and_its_gradient_are_the_mean_over_the_next_token_predictions():
    """The loss shifts the labels, not the logits: the same value and gradient as the cross-entropy of the first L-1
    positions against tokens 1..L, and the last position (it predicts nothing) gets no gradient."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 11, (3, 6), generator=g)
    logits = torch.randn(3, 6, 11, generator=g, requires_grad=True)
    sliced = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), y[:, 1:].reshape(-1))
    (want,) = torch.autograd.grad(sliced, logits)
    loss = task_loss(CAUSAL_LM, logits, y)
    (got,) = torch.autograd.grad(loss, logits)
    assert loss.item() == pytest.approx(sliced.item(), rel=1e-6)
    assert torch.allclose(got, want, atol=1e-7) and got[:, -1].abs().max().item() == 0.0
    assert got[:, :-1].abs().min().item() > 0  # every prediction counts


def test_true_fisher_labels_of_a_language_model_are_next_tokens():
    """Sampled labels keep the block's first token and put the token drawn at position t at t+1 (what t predicts)."""
    logits = torch.full((1, 3, 5), -1e9)
    logits[0, 0, 4], logits[0, 1, 3], logits[0, 2, 2] = 0.0, 0.0, 0.0  # certain draws: 4, 3, 2
    assert sample_labels(CAUSAL_LM, logits, torch.tensor([[1, 1, 1]])).tolist() == [[1, 4, 3]]


def test_perplexity_forgetting_from_a_hand_computed_loss_matrix():
    L = [[math.log(10), math.log(50)], [math.log(12), math.log(20)]]  # source 10 -> 12, target 50 -> 20
    assert M.loss_increase(L) == pytest.approx(math.log(1.2))  # nats: the source's cross-entropy rose by ln 1.2
    s = M.summarize_losses(L)
    assert s["source/perplexity_ratio"] == pytest.approx(1.2) and s["forgetting/perplexity_ratio"] == pytest.approx(1.2)
    assert s["source/perplexity_before"] == pytest.approx(10)
    assert s["target/corpus_mean_perplexity"] == pytest.approx(20)


def test_the_matrix_holds_the_score_the_config_names(decoder, tmp_path):
    acc, loss = [[0.5, 0.1], [0.4, 0.3]], [[math.log(2), math.log(10)], [math.log(4), math.log(5)]]
    np.testing.assert_allclose(M.score_matrix(acc, loss, "accuracy"), acc)
    np.testing.assert_allclose(M.score_matrix(acc, loss, "token_probability"), [[0.5, 0.1], [0.25, 0.2]])
    assert M.summarize(M.score_matrix(acc, loss, "token_probability"))["forgetting/max"] == pytest.approx(0.25)
    cfg = load_config(lm_config(decoder, ["finetune"], score="token_probability"))
    # which score R holds is read from the stored test results: not part of a run's identity
    assert cfg.transfer_key(cfg.strategies[0]) == cfg.model_copy(update={"score": "accuracy"}).transfer_key(
        cfg.strategies[0])
    with pytest.raises(ConfigError, match="score"):
        load_config(lm_config(decoder, ["finetune"], score="perplexity"))


# ---------------------------------------------------------------------------------------------------------------------
# corpora, readers, split, packing


def test_builtin_corpora_are_real_disjoint_and_deterministic():
    prose, code = lm.prose_documents(), lm.python_code_documents()
    assert len(prose) > 100 and len(code) > 50
    assert any("for" in d and "statement" in d for d in prose)  # pydoc's topics, e.g. the `for` statement
    assert sum("def " in d for d in code) > 0.8 * len(code)
    assert not set(prose) & set(code)
    mods = lm._stdlib_modules()
    assert not set(mods[0::2]) & set(mods[1::2])


def test_split_by_document_and_packing():
    tr, va, te = lm.split_documents(10, 0.2, 0.2, seed=3)
    assert sorted([*tr, *va, *te]) == list(range(10)) and (len(va), len(te)) == (2, 2)
    assert [a.tolist() for a in lm.split_documents(10, 0.2, 0.2, seed=3)] == [tr.tolist(), va.tolist(), te.tolist()]
    assert lm.split_documents(10, 0.2, 0.2, seed=4)[2].tolist() != te.tolist()
    blocks = lm.pack([[1, 2, 3], [4, 5]], eos_id=0, block_size=3)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]  # the trailing eos is the dropped remainder
    assert lm.take_blocks(np.arange(10)[:, None], 4, 0).ravel().tolist() == sorted(
        lm.take_blocks(np.arange(10)[:, None], 4, 0).ravel().tolist())


def test_text_files_jsonl_parquet_and_save_to_disk_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["first document.", "second one\nwith two lines.", "third."]
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    folder = tmp_path / "saved"
    folder.mkdir()
    table = pa.table({"text": docs})
    with pa.ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as w:  # what save_to_disk writes
        w.write_table(table)
    assert lm.load_documents(str(tmp_path / "c.txt")) == docs
    assert lm.load_documents(str(tmp_path / "c.jsonl"), text_field="body") == docs
    assert lm.load_documents(str(tmp_path / "c.parquet")) == docs
    assert lm.load_documents(str(folder)) == docs
    with pytest.raises(ValueError, match="text_field"):
        lm.load_documents(str(tmp_path / "c.jsonl"))


def test_lm_task_blocks_come_from_disjoint_documents(decoder, tmp_path):
    import re

    cfg = TaskConfig(kind="causal_lm", dataset="prose", tokenizer=str(decoder), block_size=32, max_eval_blocks=None)
    task = build_task(cfg)
    assert task.x_train.shape[1:] == (1, 32) and task.y_train.shape[1:] == (32,)
    assert torch.equal(task.x_train[:, 0].long(), task.y_train) and task.num_classes == 300
    assert torch.equal(build_task(cfg).y_test, task.y_test)  # deterministic
    # 30 documents that say which they are: every block's text names documents of its own split only
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"doc{i:02d} " * 12}) for i in range(30)))
    small = build_task(TaskConfig(kind="causal_lm", dataset=str(tmp_path / "docs.jsonl"), tokenizer=str(decoder),
                                  block_size=8, max_eval_blocks=None))
    tok = lm.load_lm_tokenizer(str(decoder))
    seen = {s: {m for row in getattr(small, f"y_{s}").tolist() for m in re.findall(r"doc(\d\d)", tok.decode(row))}
            for s in ("train", "val", "test")}
    assert len(seen["test"]) == 6 and len(seen["val"]) == 6 and len(seen["train"]) >= 15
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["val"] and not seen["val"] & seen["test"]


# ---------------------------------------------------------------------------------------------------------------------
# config


def test_config_fills_the_lm_head_and_tokenizer_and_refuses_what_does_not_apply(decoder, tmp_path):
    cfg = load_config(lm_config(decoder, ["finetune", {"name": "lora", "params": {"r": 4}}, "l2_sp", "ewc", "lwf",
                                          "lp_ft", "linear_probe", "input_space"]))
    assert cfg.backbone.params["output"] == "lm_logits" and cfg.targets[0].tokenizer == str(decoder)
    for name in ("fast", "expanse", "trajectory_transfer", "input_space_ci"):
        with pytest.raises(ConfigError, match=rf"strategies: {name} does not apply to causal_lm tasks.*finetune"):
            load_config(lm_config(decoder, [name]))
    with pytest.raises(ConfigError, match="all classification or all causal_lm"):
        load_config(lm_config(decoder, ["finetune"], targets=[{"dataset": "digits"}]))
    with pytest.raises(ConfigError, match="backbone.name: causal_lm tasks need a Hugging Face decoder"):
        load_config(lm_config(decoder, ["finetune"], backbone={"name": "mlp"}))
    with pytest.raises(ConfigError, match="evaluation: causal_lm"):
        load_config(lm_config(decoder, ["finetune"], evaluation="class_incremental"))
    with pytest.raises(ConfigError, match="classes: a causal_lm task has no classes"):
        load_config(lm_config(decoder, ["finetune"], source={"kind": "causal_lm", "dataset": "prose",
                                                             "classes": [0, 1]}))
    with pytest.raises(ConfigError, match="unknown text dataset"):
        load_config(lm_config(decoder, ["finetune"], source={"kind": "causal_lm", "dataset": "x.npz"}))


def test_cli_exits_2_on_a_strategy_that_does_not_apply(decoder, tmp_path):
    import yaml

    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(lm_config(decoder, ["expanse"])))
    out = subprocess.run([sys.executable, "-m", "forgetless.cli", "run", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "expanse does not apply to causal_lm tasks" in out.stderr


# ---------------------------------------------------------------------------------------------------------------------
# every applicable strategy under real DeepSpeed engines (one process, gloo, CPU; a subprocess so no process group
# leaks into pytest): the target's loss falls, and what each strategy promises about the source holds

_DS_SCRIPT = ONE_RANK_DEEPSPEED_PRELUDE + r"""
from forgetless.strategies.base import task_infos
infos = task_infos(tasks)
cpu = torch.device("cpu")
def batches(j):
    return lambda: ((tasks[j].x_train[i:i + 8], tasks[j].y_train[i:i + 8]) for i in range(0, 16, 8))
for spec in json.loads(sys.argv[2]):
    strategy = make_strategy(spec["name"], spec.get("params", {}), 1, cfg.train.lr)
    model = build_model(cfg, infos, strategy)
    before = evaluate(model, tasks, "val", 1, False, 0, 1, cpu)
    backbone0 = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    strategy.after_source(model, infos[0], batches(0), lambda t: t)
    ds = cfg.deepspeed.model_copy(update={"zero_stage": spec["zero"]})
    trainable = 0
    for p in range(len(strategy.phases(model, infos[1]))):
        phase = strategy.phases(model, infos[1])[p]
        set_trainable(model, phase)
        engine = make_engine(model, phase, cfg.train, ds, 1, False)
        trainable = max(trainable, sum(getattr(q, "ds_numel", q.numel()) for q in phase.trainable()))
        set_train_mode(model, phase)
        g = torch.Generator().manual_seed(p)
        for i in range(0, 48, 8):
            train_step(engine, model, strategy, phase, infos[1], tasks[1].x_train[i:i + 8], tasks[1].y_train[i:i + 8],
                       g, weight_access(model, spec["zero"]))
        full = full_state_dict(model, spec["zero"])
        model = build_model(cfg, infos, strategy)
        model.load_state_dict(full)
    strategy.after_task(model, infos[1], batches(1), lambda t: t)
    after = evaluate(model, tasks, "val", 1, False, 0, 1, cpu)
    same = all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone0.items()
               if k in model.backbone.state_dict())
    print("RESULT " + json.dumps({"label": spec.get("label", spec["name"]), "before": before, "after": after,
                                  "trainable": trainable, "backbone_unchanged": same}), flush=True)
"""

DS_CASES = [
    {"name": "finetune", "zero": 0}, {"name": "finetune", "zero": 1, "label": "finetune_z1"},
    {"name": "finetune", "zero": 3, "label": "finetune_z3"},
    {"name": "lora", "params": {"r": 4, "target_modules": ["c_attn", "c_proj", "c_fc"]}, "zero": 3},
    {"name": "l2_sp", "params": {"alpha": 1.0}, "zero": 2}, {"name": "ewc", "params": {"ewc_lambda": 10.0}, "zero": 2},
    {"name": "lwf", "zero": 2}, {"name": "lp_ft", "params": {"probe_epochs": 1}, "zero": 3},
    {"name": "linear_probe", "zero": 2}, {"name": "input_space", "params": {"prompt_tokens": 4}, "zero": 3},
]


def test_every_applicable_strategy_trains_a_tiny_decoder_under_deepspeed(decoder, tmp_path):
    cfg = lm_config(decoder, ["finetune"], train={"epochs": 1, "lr": 0.003, "batch_size": 8})
    script = tmp_path / "ds_lm.py"
    script.write_text(_DS_SCRIPT)
    out = subprocess.run([sys.executable, str(script), json.dumps(cfg),
                          json.dumps(DS_CASES)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = {r["label"]: r for r in (json.loads(line[7:]) for line in out.stdout.splitlines()
                                   if line.startswith("RESULT "))}
    assert set(res) == {c.get("label", c["name"]) for c in DS_CASES}
    for label, r in res.items():
        # the target's mean token loss falls under every strategy (linear_probe: the vocabulary bias alone)
        assert r["after"]["1"][1] < r["before"]["1"][1] - 1e-3, label
    for label in ("linear_probe", "input_space"):  # the decoder is frozen: the source's scores are bit-identical
        assert res[label]["backbone_unchanged"] and res[label]["after"]["0"] == res[label]["before"]["0"], label
    assert res["input_space"]["trainable"] == 4 * 32 + 300  # the soft prompt and the vocabulary bias
    for label in ("finetune", "finetune_z1", "finetune_z3", "lora", "l2_sp", "ewc", "lwf", "lp_ft"):
        assert not res[label]["backbone_unchanged"], label
    assert res["lora"]["trainable"] < res["finetune"]["trainable"] / 3  # adapters + the vocabulary bias only
    # the ZeRO stages train the same model the same way (same data, same seeds)
    assert res["finetune_z3"]["after"]["1"][1] == pytest.approx(res["finetune"]["after"]["1"][1], abs=2e-3)


# ---------------------------------------------------------------------------------------------------------------------
# end to end: Ray Train, 2 CPU workers, DeepSpeed ZeRO-2, MLflow


@pytest.mark.e2e
@pytest.mark.slow  # ~3 min on 2 cores (Ray, pre-training, two strategies); the DeepSpeed test above is the fast path
def test_lm_compare_end_to_end_logs_perplexity_curves_and_the_matrix(decoder, ray_session, workdir):
    import forgetless
    from forgetless.platform.tracking import mlflow_runs as tracking

    cfg = load_config(lm_config(decoder, ["finetune", {"name": "lora", "params": {"r": 4}}],
                                train={"epochs": 1, "lr": 0.003, "batch_size": 8}, scaling={"num_workers": 2},
                                deepspeed={"zero_stage": 2}, tracking={"log_model": False}))
    out = forgetless.compare(cfg)
    for res in out.results:
        R, L = res.accuracy_matrix, res.loss_matrix
        assert R.shape == L.shape == (2, 2) and res.task_kind == CAUSAL_LM
        assert L[1, 1] < L[0, 1]  # the code corpus was learned
        m = res.metrics
        assert m["source/loss_increase"] == pytest.approx(L[1, 0] - L[0, 0], rel=1e-6)
        assert m["source/perplexity_ratio"] == pytest.approx(math.exp(L[1, 0] - L[0, 0]), rel=1e-6)
        assert m["acc"] == pytest.approx(R[1, 1])
        client = tracking.client(out.tracking_uri)
        run = client.get_run(res.mlflow_run_id)
        assert run.data.metrics["source/loss_increase"] == m["source/loss_increase"]  # full precision
        curve = client.get_metric_history(res.mlflow_run_id, "val/task/python_code/perplexity")
        assert len(curve) >= 2 and curve[-1].value < curve[0].value
        assert {a.path for a in client.list_artifacts(res.mlflow_run_id)} >= {"accuracy_matrix.png",
                                                                                "accuracy_matrix.json"}
    assert "source loss increase" in out.table()
    # score: token_probability is read from the stored test results: the same runs (nothing retrained), R = exp(-L)
    again = forgetless.compare(cfg.model_copy(update={"score": "token_probability"}))
    for before, after in zip(out.results, again.results):
        assert after.mlflow_run_id == before.mlflow_run_id and after.score == "token_probability"
        np.testing.assert_allclose(after.accuracy_matrix, np.exp(-before.loss_matrix))
        assert after.metrics["forgetting/max"] == pytest.approx(math.exp(-before.loss_matrix[0, 0])
                                                                - math.exp(-before.loss_matrix[1, 0]))


def test_a_soft_prompt_that_does_not_fit_the_context_is_refused_before_start(decoder, workdir):
    from forgetless.platform.driver.preflight import preflight

    cfg = load_config(lm_config(decoder, [{"name": "input_space", "params": {"prompt_tokens": 40}}]))
    with pytest.raises(ConfigError, match=r"prompt_tokens \(40\) \+ block_size \(32\) exceed the model's context \(64\)"):
        preflight(cfg)


def test_pretraining_a_decoder_from_scratch_writes_a_hugging_face_folder(tmp_path, one_intra_op_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetless.platform.worker.lm_pretrain import DecoderShape, pretrain

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in lm.prose_documents()[:30]))
    out = pretrain(tmp_path / "lm", steps=12, lr=3e-3, batch_size=8, corpus=str(corpus), log=lambda s: None,
                   shape=DecoderShape(vocab_size=300, n_layer=1, n_embd=32, n_head=2, block_size=32))
    hist = out["history"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] and out["parameters"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "lm", local_files_only=True)
    assert model.config.vocab_size == len(tok) == 300 and tok.eos_token == "<|endoftext|>"
    assert json.loads((tmp_path / "lm" / "pretraining.json").read_text())["steps"] == 12
