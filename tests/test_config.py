"""Config validation: every bad input is one clear message naming the field, before Ray starts."""
import subprocess
import sys

import pytest
import yaml

from forgetless.config import ConfigError, apply_overrides, load_config, select_strategy


def _err(cfg):
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    return str(e.value)


def test_valid_config_and_shorthands(tiny_config):
    cfg = load_config(tiny_config())
    assert cfg.strategies[0].name == "finetune"
    assert cfg.task_names() == ["digits_0-1-2-3-4", "digits_5-6-7-8-9"]
    one = tiny_config()
    one.pop("targets")
    one["target"] = {"dataset": "digits", "classes": [5, 6]}
    assert len(load_config(one).targets) == 1


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c["strategies"].__setitem__(0, "not_a_strategy"), "unknown strategy 'not_a_strategy'"),
    (lambda c: c.__setitem__("epochs", 3), "epochs"),  # unknown top-level field
    (lambda c: c["train"].__setitem__("epochs", -1), "train.epochs"),
    (lambda c: c["train"].__setitem__("lr", 0), "train.lr"),
    (lambda c: c["source"].__setitem__("dataset", "cifar-1000"), "unknown dataset"),
    (lambda c: c["source"].__setitem__("dataset", "/nope/data.npz"), "does not exist"),
    (lambda c: c["backbone"].__setitem__("name", "resnet9000"), "unknown backbone"),
    (lambda c: c["deepspeed"].__setitem__("zero_stage", 4), "deepspeed.zero_stage"),
    (lambda c: c["scaling"].__setitem__("num_workers", 0), "scaling.num_workers"),
    (lambda c: c["strategies"].__setitem__(0, {"name": "finetune", "params": {"alpha": 1}}), "alpha"),
    (lambda c: c["source"].__setitem__("classes", [1, 1]), "duplicates"),
    (lambda c: c["pretrain"].__setitem__("checkpoint_every", 50), "checkpoint_every"),
    (lambda c: c.__setitem__("name", "bad name!"), "name"),
    (lambda c: c.__setitem__("targets", [c["source"]]), "unique"),
    (lambda c: c.__setitem__("strategies", ["finetune", "finetune"]), "label"),
])
def test_bad_inputs_name_the_field(tiny_config, mutate, needle):
    cfg = tiny_config()
    mutate(cfg)
    assert needle in _err(cfg)


def test_disjoint_classes_required(tiny_config):
    cfg = tiny_config(require_disjoint_classes=True,
                      targets=[{"dataset": "digits", "classes": [4, 5]}])
    assert "class 4" in _err(cfg)


def test_missing_yaml_and_bad_yaml(tmp_path):
    assert "does not exist" in _err(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nseed: 1\n  bad: indent\n")
    msg = _err(p)
    assert "not valid YAML at line 3, column 6" in msg and "\n" not in msg
    p.write_bytes(b"name: x\n\x80\x81")
    assert "not a text file" in _err(p)
    assert "is a folder" in _err(tmp_path)


@pytest.mark.parametrize("override, needle", [
    ("strategies.9.name=x", "there is no item 9"),
    ("strategies.-1.name=x", "there is no item -1"),
    ("targets.first.classes=[1]", "must be an item number"),
    ("train.epochs.x=1", "train.epochs is the value 2"),
    ("train..lr=1", "empty part"),
])
def test_override_paths_that_do_not_exist(tiny_config, override, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(tiny_config(), [override])


def test_override_reaches_params_of_a_strategy_given_by_name(tiny_config):
    cfg = load_config(tiny_config(), ["strategies.0.params.backbone_lr_scale=0.5"])
    assert cfg.strategies[0].params == {"backbone_lr_scale": 0.5}


@pytest.mark.parametrize("backbone, needle", [
    ({"name": "mlp", "params": {"hidden": [32], "depth": 2}}, "params.depth: backbone 'mlp' has no such parameter"),
    ({"name": "mlp", "params": {"dropout": "0.1"}}, "params.dropout: Input should be a valid number"),
    ({"name": "cnn2d", "params": {"channels": [8, 8], "pool": [True]}}, "one flag per block"),
    ({"name": "resnet", "params": {"blocks_per_stage": 0}}, "params.blocks_per_stage"),
])
def test_builtin_backbone_params_are_typed(tiny_config, backbone, needle):
    assert needle in _err(tiny_config(backbone=backbone))


def test_overrides_parse_values(tiny_config):
    data = apply_overrides(tiny_config(), ["train.epochs=7", "strategies.0=linear_probe",
                                           "backbone.params.hidden=[8, 4]", "tracking.experiment=x"])
    cfg = load_config(data)
    assert cfg.train.epochs == 7 and cfg.strategies[0].name == "linear_probe"
    assert cfg.backbone.params["hidden"] == [8, 4]
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.epochs"])


def test_select_strategy(tiny_config):
    cfg = load_config(tiny_config(strategies=["finetune", "linear_probe"]))
    with pytest.raises(ConfigError, match="pick one"):
        select_strategy(cfg, None)
    assert select_strategy(cfg, "linear_probe").strategies[0].name == "linear_probe"
    assert select_strategy(cfg, "lp_ft").strategies[0].name == "lp_ft"  # any registered name
    with pytest.raises(ConfigError, match="unknown strategy"):
        select_strategy(cfg, "nope")


def test_run_key_changes_with_config(tiny_config):
    a = load_config(tiny_config())
    b = load_config(tiny_config(seed=1))
    assert a.transfer_key(a.strategies[0]) != b.transfer_key(b.strategies[0])
    assert a.pretrain_key() == load_config(tiny_config(train={"epochs": 9})).pretrain_key()  # pretraining unaffected


def test_unreachable_tracking_server_is_a_config_error(tiny_config):
    from forgetless.platform.driver.preflight import preflight

    cfg = load_config(tiny_config(tracking={"tracking_uri": "http://127.0.0.1:9"}))
    with pytest.raises(ConfigError, match="not reachable"):
        preflight(cfg)


def test_zero3_refused_for_strategy_that_cannot(tiny_config, monkeypatch):
    from forgetless.platform.driver.preflight import preflight
    from forgetless.strategies import get_strategy_class

    monkeypatch.setattr(get_strategy_class("finetune"), "max_zero_stage", 2)
    cfg = load_config(tiny_config(deepspeed={"zero_stage": 3}))
    with pytest.raises(ConfigError, match="zero_stage"):
        preflight(cfg)


def test_partitions_only_refuses_strategies_that_need_whole_weights_before_start(tiny_config, tmp_path):
    from forgetless.platform.driver.preflight import preflight

    cfg = tiny_config(deepspeed={"zero_stage": 3, "partitions_only": True}, strategies=["finetune", "fast"])
    with pytest.raises(ConfigError, match=r"strategies\[fast\]: fast reads or rewrites whole weights.*'finetune'"):
        preflight(load_config(cfg))
    preflight(load_config({**cfg, "strategies": ["finetune", "lp_ft"]}))  # both stay partitioned
    with pytest.raises(ConfigError, match="deepspeed: partitions_only.*zero_stage: 3"):
        load_config(tiny_config(deepspeed={"zero_stage": 2, "partitions_only": True}))
    p = tmp_path / "c.yaml"  # the CLI: exit 2, nothing started
    p.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "forgetless.cli", "run", str(p), "--strategy", "fast"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "partitions_only" in out.stderr and "starting Ray" not in out.stderr


def test_cli_bad_config_exits_nonzero_before_ray(tmp_path, tiny_config):
    cfg = tiny_config()
    cfg["train"]["epochs"] = 0
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "forgetless.cli", "run", str(p)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    assert "train.epochs" in out.stderr
    assert "starting Ray" not in out.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing started, nothing written


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "forgetless.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for cmd in ("run", "compare"):
        assert cmd in out.stdout
