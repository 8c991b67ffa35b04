"""The replay strategy on plain PyTorch (no Ray): which examples the memory holds (training splits only, reservoir or
class-balanced, disjoint slices per rank), the share mixed into each batch, each example scored by its own head, the
memory in the state dict (exact resume), refusals, and the claim: on a real stream it forgets less than fine-tuning."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ONE_RANK_DEEPSPEED_PRELUDE, run_one_rank_script
from forgetless.backbones import MLP, TransferModel
from forgetless.config import OptimConfig, load_config
from forgetless.data import build_stream
from forgetless.data.spec import TaskConfig, TaskTransform
from forgetless.data.tasks import TaskData
from forgetless.platform.worker.engine import make_optimizer
from forgetless.platform.worker.evaluation import evaluate
from forgetless.strategies import make_strategy
from forgetless.strategies.base import TrainingData, task_infos
from forgetless.strategies.replay import MEMORY, own_head_cross_entropy
from forgetless.strategies.training import TorchEngine, set_train_mode, set_trainable, train_step

SHAPE = (4,)


def marked_task(name: str, n_train: int, classes: int, base: int) -> TaskData:
    """A task whose every example carries its id in x[:, 0]: train ids base + 0..n-1, val ids base + 10_000 + i,
    test ids base + 20_000 + i, so any example seen later says which split it came from."""
    def split(offset: int, n: int):
        ids = torch.arange(n, dtype=torch.float32) + base + offset
        x = torch.stack([ids, torch.zeros(n), torch.ones(n), torch.zeros(n)], dim=1)
        return x, torch.arange(n) % classes

    (xt, yt), (xv, yv), (xs, ys) = split(0, n_train), split(10_000, 30), split(20_000, 30)
    return TaskData(name, list(range(classes)), SHAPE, xt, yt, xv, yv, xs, ys)


STREAM = [marked_task("src", 120, 3, 0), marked_task("t1", 80, 2, 100_000), marked_task("t2", 60, 2, 200_000)]


def replay(**params):
    strategy = make_strategy("replay", params, 1, 0.01)
    model = TransferModel(MLP(SHAPE, hidden=[8]), [t.num_classes for t in STREAM], seed=0)
    strategy.build(model, task_infos(STREAM))
    return strategy, model


def data_for(rank: int = 0, world: int = 1, epoch_seed: int = 5) -> TrainingData:
    """What the platform hands the strategy (train_loop.training_data, on a stand-in for the worker's run)."""
    from forgetless.platform.worker.train_loop import training_data  # deferred: the worker loop imports Ray

    run = SimpleNamespace(tasks=STREAM, rank=rank, world=world, job=SimpleNamespace(config=SimpleNamespace(seed=0)))
    return training_data(run, epoch_seed)


def own_batches(task: TaskData, size: int = 8):
    return [(task.x_train[i:i + size], task.y_train[i:i + size]) for i in range(0, len(task.x_train), size)]


def mixed(strategy, model, stage: int, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    info = task_infos(STREAM)[stage]
    return list(strategy.train_batches(model, info, iter(own_batches(STREAM[stage])), data_for(**kw)))


def test_the_platform_hands_over_training_splits_only():
    data = data_for()
    for task, (x, y) in zip(STREAM, data.splits):
        assert x is task.x_train and y is task.y_train


@pytest.mark.parametrize("selection", ["reservoir", "class_balanced"])
def test_replayed_examples_are_training_examples_of_earlier_tasks_at_the_share(selection):
    strategy, model = replay(share=0.25, memory_size=40, selection=selection)
    batches = mixed(strategy, model, 2)
    n_own = len(STREAM[2].x_train)
    replayed = torch.cat([x[len(own[0]):] for (x, _), own in zip(batches, own_batches(STREAM[2]))])
    assert len(replayed) == pytest.approx(n_own * 0.25 / 0.75, abs=1)  # the share, exact over the epoch
    ids = replayed[:, 0].long()
    train_ids = {int(i) for t in STREAM[:2] for i in t.x_train[:, 0]}
    assert set(ids.tolist()) <= train_ids  # never a validation or test example, never the current task's
    assert {i // 100_000 for i in ids.tolist()} == {0, 1}  # both earlier tasks
    # labels are positions in the concatenated heads: an example of task j is scored by task j's head
    for (x, y), own in zip(batches, own_batches(STREAM[2])):
        ids = x[:, 0].long()
        task = ids // 100_000
        local = torch.stack([STREAM[j].y_train[i - 100_000 * j] for j, i in zip(task.tolist(), ids.tolist())])
        assert torch.equal(y, torch.tensor([0, 3, 5])[task] + local)
        assert torch.equal(x[: len(own[0])], own[0])  # the task's own batch comes first, unchanged


def test_reservoir_memory_is_a_uniform_sample_and_fills_in_order():
    strategy, model = replay(memory_size=50)
    data = data_for()
    strategy.admit(model, 1, data)  # the source only
    memory = model.extras[MEMORY]
    assert (memory.task == 0).all() and len(set(memory.index.tolist())) == 50 and int(memory.seen) == 120
    strategy.admit(model, 2, data)  # now target 1 too: 80 of the 200 examples seen are task 1's
    share_t1 = float((memory.task == 1).float().mean())
    assert 0.2 < share_t1 < 0.6 and int(memory.seen) == 200
    strategy.admit(model, 2, data)  # nothing new: unchanged
    assert int(memory.seen) == 200


def test_class_balanced_memory_holds_every_task_and_class_equally():
    strategy, model = replay(memory_size=35, selection="class_balanced")
    strategy.admit(model, 2, data_for())
    entries = model.extras[MEMORY].entries()
    counts = {}
    for j, i in entries.tolist():
        key = (j, int(STREAM[j].y_train[i]))
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)} and set(counts.values()) == {7}


def test_each_rank_replays_a_disjoint_slice_of_the_same_memory():
    strategy, model = replay(memory_size=41)
    strategy.admit(model, 2, data_for())
    slices = [strategy.rank_entries(model, 2, data_for(rank=r, world=2)) for r in range(2)]
    as_set = [{tuple(e) for e in s.tolist()} for s in slices]
    assert not as_set[0] & as_set[1]
    assert len(as_set[0]) == len(as_set[1]) == 20  # 41 entries: one left out so every rank replays as many
    assert as_set[0] | as_set[1] <= {tuple(e) for e in model.extras[MEMORY].entries().tolist()}


def test_without_a_size_the_whole_replayed_corpus_is_the_pool():
    strategy, model = replay(memory_size=None, replay_tasks=["src"])
    entries = strategy.rank_entries(model, 2, data_for())
    assert sorted(entries[:, 1].tolist()) == list(range(120)) and (entries[:, 0] == 0).all()
    assert MEMORY not in model.extras


def test_the_memory_is_in_the_state_dict_and_a_restored_run_mixes_the_same_batches():
    strategy, model = replay(memory_size=30)
    first = mixed(strategy, model, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert f"extras.{MEMORY}.index" in state
    again, fresh = replay(memory_size=30)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.extras[MEMORY].index, model.extras[MEMORY].index)
    for (xa, ya), (xb, yb) in zip(first, mixed(again, fresh, 1)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # stage 2 continues the reservoir from the restored count: the same memory as the uninterrupted run
    mixed(strategy, model, 2)
    mixed(again, fresh, 2)
    assert torch.equal(fresh.extras[MEMORY].index, model.extras[MEMORY].index)


def test_the_loss_of_an_example_is_over_its_own_head_only():
    logits = torch.randn(4, 7)
    y = torch.tensor([1, 3, 6, 0])  # heads of 3, 2, 2 classes: positions 0-2, 3-4, 5-6
    expected = torch.stack([F.cross_entropy(logits[0:1, 0:3], y[0:1]),
                            F.cross_entropy(logits[1:2, 3:5], y[1:2] - 3),
                            F.cross_entropy(logits[2:3, 5:7], y[2:3] - 5),
                            F.cross_entropy(logits[3:4, 0:3], y[3:4])]).mean()
    assert own_head_cross_entropy(logits, y, [3, 2, 2]) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("update,match", [
    ({"strategies": [{"name": "replay", "params": {"replay_tasks": ["nope"]}}]}, r"params.replay_tasks: \['nope'\] are not tasks of the stream"),
    ({"evaluation": "class_incremental"}, "set evaluation: task_incremental"),
])
def test_refused_with_one_line_where_it_cannot_apply(update, match):
    cfg = load_config({"name": "x", "source": {"dataset": "digits", "classes": [0, 1, 2]},
                       "targets": [{"dataset": "digits", "classes": [3, 4]}], "strategies": ["replay"], **update})
    tasks = build_stream(cfg.source, cfg.targets)
    s = cfg.strategies[0]
    with pytest.raises(ValueError, match=match):
        make_strategy(s.name, s.params, 1, 0.1).check(cfg, tasks, None)


def test_preflight_refuses_in_one_line_naming_the_strategy(workdir):
    from forgetless.errors import ConfigError
    from forgetless.platform.driver.preflight import preflight

    cfg = load_config({"name": "x", "source": {"dataset": "digits", "classes": [0, 1, 2]},
                       "targets": [{"dataset": "digits", "classes": [3, 4]}], "evaluation": "class_incremental",
                       "strategies": [{"name": "replay", "label": "er"}]})
    with pytest.raises(ConfigError) as caught:
        preflight(cfg)
    assert str(caught.value).startswith("strategies[er]: evaluation: replay trains each replayed example")
    assert "\n" not in str(caught.value)


def test_text_replay_refuses_class_balance_and_unequal_blocks():
    def text(name, length):
        x = torch.zeros(4, 1, length)
        return TaskData(name, [], (1, length), x, x[:, 0].long(), x, x[:, 0].long(), x, x[:, 0].long(),
                        kind="causal_lm", vocab_size=10)

    cfg = SimpleNamespace(evaluation="task_incremental")
    with pytest.raises(ValueError, match="class_balanced needs classes"):
        make_strategy("replay", {"selection": "class_balanced"}, 1, 0.1).check(cfg, [text("a", 8), text("b", 8)], None)
    with pytest.raises(ValueError, match="same block_size"):
        make_strategy("replay", {}, 1, 0.1).check(cfg, [text("a", 8), text("b", 16)], None)


# ---------------------------------------------------------------------------------------------------------------------
# the claim, on real data: a small memory keeps most of the source


def train_stream(name: str, params: dict, tasks: list[TaskData], epochs: int, lr: float = 0.01,
                 hidden: int = 64) -> list[float]:
    infos = task_infos(tasks)
    strategy = make_strategy(name, params, epochs, 0.01)
    torch.manual_seed(0)
    model = TransferModel(MLP(tuple(tasks[0].input_shape), hidden=[hidden]), [t.num_classes for t in tasks], seed=0)
    strategy.build(model, infos)
    for stage, task in enumerate(infos):
        phase = (make_strategy("finetune", {}, epochs, 0.01) if stage == 0 else strategy).phases(model, task)[0]
        set_trainable(model, phase)
        engine = TorchEngine(model, make_optimizer(phase, OptimConfig(optimizer="adam", lr=lr)))
        set_train_mode(model, phase)
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(epoch)
            order = torch.randperm(len(tasks[stage].x_train), generator=g)
            own = ((tasks[stage].x_train[order[i:i + 32]], tasks[stage].y_train[order[i:i + 32]])
                   for i in range(0, len(order), 32))
            data = TrainingData([t.split("train") for t in tasks], 0, 1, 0, epoch)
            mix = strategy.train_batches(model, task, own, data) if stage else own
            for x, y in mix:
                train_step(engine, model, strategy if stage else make_strategy("finetune", {}, 1, 0.01), phase, task,
                           x, y, g)
    res = evaluate(model, tasks, "test", len(tasks) - 1, False, 0, 1, torch.device("cpu"))
    return [res[j][0] for j in range(len(tasks))]


def test_replay_forgets_the_source_less_than_finetuning_on_split_digits():
    """Digits 0-4, then digits 5-9 under input noise (a target that moves the features): with these seeds fine-tuning
    drops the source from about 0.98 to 0.88, a 100-example memory replayed at half of every batch keeps 0.96."""
    noisy = TaskTransform(kind="noise", std=1.0, seed=1)
    tasks = build_stream(TaskConfig(dataset="digits", classes=[0, 1, 2, 3, 4]),
                         [TaskConfig(dataset="digits", classes=[5, 6, 7, 8, 9], transforms=[noisy])])
    plain = train_stream("finetune", {}, tasks, 8, lr=0.03, hidden=16)
    kept = train_stream("replay", {"share": 0.5, "memory_size": 100}, tasks, 8, lr=0.03, hidden=16)
    assert kept[0] > plain[0] + 0.04  # the source: replay keeps more of it
    assert kept[1] > plain[1] - 0.03  # at little cost to the target


def test_with_no_share_replay_trains_exactly_like_finetuning():
    tasks = build_stream(TaskConfig(dataset="digits", classes=[0, 1, 2]),
                         [TaskConfig(dataset="digits", classes=[3, 4])])
    assert train_stream("replay", {"share": 0.0}, tasks, 2) == pytest.approx(train_stream("finetune", {}, tasks, 2),
                                                                            abs=1e-6)



# ---------------------------------------------------------------------------------------------------------------------
# real DeepSpeed engines under every ZeRO stage (one process, gloo, CPU; a subprocess so no process group leaks)

_DS_SCRIPT = ONE_RANK_DEEPSPEED_PRELUDE + r"""
from forgetless.strategies.base import TrainingData, task_infos
infos = task_infos(tasks)
for zero in (0, 1, 2, 3):
    strategy = make_strategy("replay", {"share": 0.5, "memory_size": 40}, 1, cfg.train.lr)
    model = build_model(cfg, infos, strategy)
    phase = strategy.phases(model, infos[1])[0]
    set_trainable(model, phase)
    engine = make_engine(model, phase, cfg.train, cfg.deepspeed.model_copy(update={"zero_stage": zero}), 1, False)
    set_train_mode(model, phase)
    data = TrainingData([t.split("train") for t in tasks], 0, 1, 0, 7)
    own = ((tasks[1].x_train[i:i + 16], tasks[1].y_train[i:i + 16]) for i in range(0, 96, 16))
    access = weight_access(model, zero)
    losses = [train_step(engine, model, strategy, phase, infos[1], x, y, torch.Generator(), access)[0]
              for x, y in strategy.train_batches(model, infos[1], own, data)]
    full = full_state_dict(model, zero)
    model = build_model(cfg, infos, strategy)
    model.load_state_dict(full)
    res = evaluate(model, tasks, "val", 1, False, 0, 1, torch.device("cpu"))
    print("RESULT " + json.dumps({"zero": zero, "losses": losses, "memory": full["extras.replay_memory.index"].tolist(),
                                  "val": res}), flush=True)
"""


def test_replay_trains_the_same_under_every_zero_stage(tmp_path):
    import json

    cfg = {"name": "z", "source": {"dataset": "digits", "classes": [0, 1, 2]},
           "targets": [{"dataset": "digits", "classes": [3, 4]}],
           "backbone": {"name": "mlp", "params": {"hidden": [16]}},
           "train": {"lr": 0.01, "batch_size": 16}, "strategies": ["replay"]}
    res = run_one_rank_script(tmp_path, _DS_SCRIPT, json.dumps(cfg))
    assert [r["zero"] for r in res] == [0, 1, 2, 3]
    for r in res:
        assert r["memory"] == res[0]["memory"] and min(r["memory"]) >= 0  # the memory, full, in every state dict
        assert r["losses"] == pytest.approx(res[0]["losses"], abs=1e-4)  # same batches, same steps
        assert r["val"]["1"][1] == pytest.approx(res[0]["val"]["1"][1], abs=1e-4)
    assert res[0]["losses"][-1] < res[0]["losses"][0]  # it learns


def test_text_replay_mixes_training_blocks_of_the_general_corpus_at_the_token_share(tmp_path):
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_language_models import make_tiny_decoder

    folder = make_tiny_decoder(tmp_path / "tiny")
    for name, word in (("general", "river stone light"), ("second", "def f(x): return x"), ("third", "assert 1")):
        (tmp_path / f"{name}.txt").write_text("\n\n".join(f"{word} {i} " * 40 for i in range(30)))
    task = {"kind": "causal_lm", "block_size": 32, "max_train_blocks": 24, "max_eval_blocks": 8}
    cfg = load_config({"name": "lm", "source": {**task, "dataset": str(tmp_path / "general.txt")},
                       "targets": [{**task, "dataset": str(tmp_path / "second.txt")},
                                   {**task, "dataset": str(tmp_path / "third.txt")}],
                       "backbone": {"name": f"hf:{folder}"}, "strategies": ["replay"]})
    tasks = build_stream(cfg.source, cfg.targets)
    infos = task_infos(tasks)
    strategy = make_strategy("replay", {"share": 0.2, "replay_tasks": ["general"], "memory_size": None}, 1, 0.01)
    from forgetless.platform.worker.model_io import build_model

    model = build_model(cfg, infos, strategy)
    data = TrainingData([t.split("train") for t in tasks], 0, 1, 0, 3)
    own = [(tasks[2].x_train[i:i + 8], tasks[2].y_train[i:i + 8]) for i in range(0, 24, 8)]
    batches = list(strategy.train_batches(model, infos[2], iter(own), data))
    prose = {tuple(b.tolist()) for b in tasks[0].y_train}
    held_out = {tuple(b.tolist()) for t in (tasks[0].y_val, tasks[0].y_test) for b in t}
    extra = [tuple(b.tolist()) for (x, y), (ox, _) in zip(batches, own) for b in y[len(ox):]]
    assert len(extra) == 6  # 24 blocks of tests, 20 % of every batch's tokens replayed: 24 * 0.2 / 0.8
    assert set(extra) <= prose and not set(extra) & held_out
    for x, y in batches:  # the ids the model reads are the tokens it is scored on
        assert torch.equal(x[:, 0].long(), y)
    phase = strategy.phases(model, infos[2])[0]
    set_trainable(model, phase)
    engine = TorchEngine(model, make_optimizer(phase, OptimConfig(optimizer="adam", lr=0.01)))
    losses = [train_step(engine, model, strategy, phase, infos[2], x, y, torch.Generator())[0] for x, y in batches]
    assert all(torch.isfinite(torch.tensor(losses)))
