"""Config schema, YAML loading, --set overrides and the up-front checks (each error names its key)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mpdistil_fast.pipeline.config import Config, ConfigError, config_from_dict, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_validate(path, data_dir):
    config = load_config(path, [f"data.data_dir={data_dir}"])
    assert config.method in ("finetune", "kd", "pkd", "metadistil", "mpdistil")


def test_defaults_and_overrides_with_yaml_values():
    config = config_from_dict({"method": "kd"}, ["student_training.lr=1e-4", "data.tasks=[cb, copa]",
                                                 "curriculum.reward=real", "data.max_train=null"])
    assert config.student_training.lr == 1e-4 and isinstance(config.student_training.lr, float)
    assert config.data.tasks == ["cb", "copa"]
    assert config.curriculum.reward == "real" and config.data.max_train is None
    assert config.to_dict()["method"] == "kd"
    assert Config().curriculum.actions == ["boolq", "cb", "copa", "rte", "wic", "wsc"]


def test_int_accepted_for_float_and_yaml11_exponents():
    config = config_from_dict({"teacher_training": {"lr": 1, "weight_decay": "1e-2"}})
    assert config.teacher_training.lr == 1.0 and config.teacher_training.weight_decay == 0.01


@pytest.mark.parametrize("raw, overrides, names", [
    ({"sed": 1}, [], "'sed' (did you mean 'seed'?)"),
    ({"data": {"task": ["cb"]}}, [], "unknown key 'data.task' (did you mean 'data.tasks'?)"),
    ({}, ["curriculum.gama=0.9"], "curriculum.gama"),
    ({"student_training": {"lr": "fast"}}, [], "student_training.lr must be a number"),
    ({"seed": 1.5}, [], "seed must be an integer"),
    ({"seed": True}, [], "seed must be an integer"),
    ({"curriculum": {"enabled": "yes"}}, [], "curriculum.enabled must be true or false"),
    ({"method": "distil"}, [], "method must be one of"),
    ({"curriculum": {"reward": "dense"}}, [], "curriculum.reward must be one of"),
    ({"data": {"tasks": "cb"}}, [], "data.tasks must be a list"),
    ({"data": {"tasks": ["cb", "mnli"]}}, [], "data.tasks[1]: unknown task 'mnli'"),
    ({"data": {"tasks": []}}, [], "data.tasks must name at least one task"),
    ({"data": {"quiz_fraction": 1.5}}, [], "data.quiz_fraction"),
    ({"data": 3}, [], "data must be a mapping"),
    ({"curriculum": {"gamma": 0}}, [], "curriculum.gamma"),
    ({"distill": {"alpha": 2}}, [], "distill.alpha"),
    ({"distill": {"direction": "jsd", "jsd_beta": 1.5}}, [], "distill.jsd_beta"),
    ({"distill": {"direction": "symmetric"}}, [], "distill.direction"),
    ({"meta_teacher": {"training": {"epochs": 0}}}, [], "meta_teacher.training.epochs"),
    ({"curriculum": {"actions": ["cb", "qqp"]}}, [], "curriculum.actions[1]"),
    ({"runtime": {"kind": "mpi"}}, [], "runtime.kind must be one of ('local', 'deepspeed')"),
    ({"runtime": {"checkpoint_every": 0}}, [], "runtime.checkpoint_every must be > 0"),
    ({"metadistil": {"hypergradient": "magic"}, "method": "metadistil"}, [], "metadistil.hypergradient"),
    ({"metadistil": {"hypergradient": "exact"}, "method": "metadistil", "student": {"attn_implementation": "sdpa"}},
     [], "metadistil.hypergradient 'exact' differentiates through the student's attention"),
    ({"meta_teacher": {"bilevel": True, "hypergradient": "forward_mode"}, "student": {"attn_implementation": "sdpa"}},
     [], "meta_teacher.hypergradient 'forward_mode' differentiates through the student's attention"),
    ({}, ["seed"], "--set expects key=value"),
    ({}, ["=3"], "--set expects key=value"),
    ({}, ["seed.x=3"], "seed must be an integer"),
    ({"seed": 3}, ["seed.x=3"], "'seed' is not a section"),
])
def test_bad_configs_name_the_key(raw, overrides, names):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, overrides)
    assert names in str(info.value)


def test_override_parsing():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=1e-4") == ("a", 1e-4)
    assert parse_override("a=[x, y]") == ("a", ["x", "y"])
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=runs/x=y") == ("a", "runs/x=y")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_launched_rank_refuses_the_local_runtime(monkeypatch):
    """Under torchrun with runtime.kind local every rank would train the whole run into the same output_dir."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="one of 2 ranks .* runtime.kind is 'local'"):
        config_from_dict({})
    assert config_from_dict({"runtime": {"kind": "deepspeed"}}).runtime.kind == "deepspeed"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert config_from_dict({}).runtime.kind == "local"


def test_missing_data_is_reported_before_models(tmp_path, data_dir, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"tasks": ["cb"], "data_dir": str(tmp_path / "absent")}}))
    with pytest.raises(ConfigError, match="data.data_dir"):
        load_config(path)
    empty = tmp_path / "empty"
    (empty / "superglue").mkdir(parents=True)
    path.write_text(yaml.safe_dump({"data": {"tasks": ["cb"], "data_dir": str(empty)}}))
    with pytest.raises(ConfigError, match="data for task 'cb'"):
        load_config(path)
    monkeypatch.delenv("MPDISTIL_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path.write_text(yaml.safe_dump({"data": {"tasks": ["cb"]}}))
    with pytest.raises(ConfigError, match="no data"):
        load_config(path)
    path.write_text(yaml.safe_dump({"method": "mpdistil", "data": {"tasks": ["cb"], "data_dir": str(data_dir)}}))
    assert load_config(path).curriculum.actions[0] == "boolq"  # every action task's files were found
