"""Config schema, YAML loading, --set overrides and the up-front checks (each error names its key)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from mpdistil_fast.models import tiny_backbone
from mpdistil_fast.pipeline.config import (Config, ConfigError, absolute_model_folder, check_resumable, config_from_dict,
                                            load_config, parse_override)
from pipeline_helpers import make_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_validate(path, data_dir):
    config = load_config(path, [f"data.data_dir={data_dir}"])
    assert config.method in ("finetune", "kd", "pkd", "metadistil", "mpdistil")


def test_readme_names_every_config_key():
    """The README's pipeline section lists the keys a config takes: a key added to the schema must be named there
    (as a backticked key), so that a user reading the README knows it exists."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("<!-- section: pipeline -->"):text.index("<!-- /section: pipeline -->")]
    section = re.sub(r"```.*?```", "", section, flags=re.S)  # the code blocks: only the inline `...` name keys
    named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", " ".join(re.findall(r"`([^`]+)`", section))))

    def keys(cls) -> set[str]:
        out = set()
        for f in dataclasses.fields(cls):
            out.add(f.name)
            default = getattr(cls(), f.name)
            if dataclasses.is_dataclass(default):
                out |= keys(type(default))
        return out

    assert sorted(keys(Config) - named) == []


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
    config = config_from_dict(yaml.safe_load("student_training: {lr: 3e-5}"), ["metadistil.inner_lr=1e-3"])
    assert config.student_training.lr == 3e-5 and config.metadistil.inner_lr == 1e-3


def test_yaml11_off_is_the_teacher_cache_choice_off():
    """PyYAML (YAML 1.1) reads an unquoted ``off`` as false: ``runtime.teacher_cache: off``, as the README writes it,
    must still choose "off" (it was refused as "got False"), in the YAML file and in ``--set``; a bool stays refused
    where no choice spells it."""
    config = config_from_dict(yaml.safe_load("runtime: {teacher_cache: off}"))
    assert config.runtime.teacher_cache == "off"
    assert config_from_dict({}, ["runtime.teacher_cache=off"]).runtime.teacher_cache == "off"
    with pytest.raises(ConfigError, match="runtime.teacher_cache must be one of .* got True"):
        config_from_dict({}, ["runtime.teacher_cache=on"])
    with pytest.raises(ConfigError, match="curriculum.reward must be one of"):
        config_from_dict(yaml.safe_load("curriculum: {reward: no}"))


def test_numeric_looking_strings_stay_strings_in_string_keys():
    """Only keys declared float turn a YAML 1.1 string like 1e-5 into a number: a quoted "1.5" output_dir stays."""
    config = config_from_dict(yaml.safe_load('output_dir: "1.5"\nteacher: {model: "2e3"}'),
                              ["student.model='1e-5'", 'runtime.deepspeed_student="0.5"'])
    assert (config.output_dir, config.teacher.model, config.student.model) == ("1.5", "2e3", "1e-5")
    assert config.runtime.deepspeed_student == str(Path("0.5").resolve())  # a file read from here
    with pytest.raises(ConfigError, match="seed must be an integer, got str '1e3'"):
        config_from_dict({"seed": "1e3"})


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
    ({"runtime": {"collective_timeout_minutes": 0}}, [], "runtime.collective_timeout_minutes must be finite and > 0"),
    ({}, ["runtime.collective_timeout_minutes=.inf"], "runtime.collective_timeout_minutes must be finite and > 0"),
    ({"metadistil": {"hypergradient": "magic"}, "method": "metadistil"}, [], "metadistil.hypergradient"),
    ({"metadistil": {"hypergradient": "exact"}, "method": "metadistil", "student": {"attn_implementation": "sdpa"}},
     [], "metadistil.hypergradient 'exact' differentiates through the student's attention"),
    ({"meta_teacher": {"bilevel": True, "hypergradient": "forward_mode"}, "student": {"attn_implementation": "sdpa"}},
     [], "meta_teacher.hypergradient 'forward_mode' differentiates through the student's attention"),
    ({}, ["seed"], "--set expects key=value"),
    ({}, ["=3"], "--set expects key=value"),
    ({}, ["seed.x=3"], "seed must be an integer"),
    ({"seed": -1}, [], "seed must be in [0, 2**63 - 1], got -1"),
    ({"seed": 2 ** 63}, [], "seed must be in [0, 2**63 - 1]"),
    ({"data": {"max_length": 7}}, [], "data.max_length must be >= 8, got 7"),
    ({"data": {"max_length": 0}}, [], "data.max_length must be >= 8"),
    ({"meta_teacher": {"hidden": 0}}, [], "meta_teacher.hidden must be > 0 or null, got 0"),
    ({"meta_teacher": {"hidden": -4}}, [], "meta_teacher.hidden must be > 0 or null"),
    ({"metadistil": {"inner_lr": 0}}, [], "metadistil.inner_lr must be > 0, got 0.0"),
    ({"meta_teacher": {"hypergradient_weight": 0}}, [], "meta_teacher.hypergradient_weight must be finite and > 0"),
    ({}, ["meta_teacher.hypergradient_weight=.inf"], "meta_teacher.hypergradient_weight must be finite and > 0"),
    ({"metadistil": {"teacher_lr": -1e-5}}, [], "metadistil.teacher_lr must be > 0"),
    ({}, ["metadistil.teacher_lr=-1e-5"], "metadistil.teacher_lr must be > 0"),
    ({"method": "pkd", "student": {"num_layers": 1}}, [], "student.num_layers must be >= 2 for method 'pkd', got 1: "
     "its patient KD (distill.layer_map 'skip') matches every student layer but the last"),
    ({"method": "mpdistil", "student": {"num_layers": 1}, "distill": {"layer_map": "last"}}, [],
     "student.num_layers must be >= 2 for method 'mpdistil'"),
    ({"seed": 3}, ["seed.x=3"], "'seed' is not a section"),
])
def test_bad_configs_name_the_key(raw, overrides, names):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, overrides)
    assert names in str(info.value)


def test_override_parsing():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=1e-4") == ("a", "1e-4")  # YAML 1.1; a float key's coercion makes it 1e-4
    assert parse_override("a=0.5") == ("a", 0.5)
    assert parse_override("a=[x, y]") == ("a", ["x", "y"])
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=runs/x=y") == ("a", "runs/x=y")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml \(the shipped configs, .*"
                                          r"quickstart.yaml.*, are in .*configs\)"):
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


def test_one_layer_students_outside_patient_kd():
    for method in ("finetune", "kd", "metadistil"):
        assert config_from_dict({"method": method, "student": {"num_layers": 1}}).student.num_layers == 1
    assert config_from_dict({"method": "pkd", "student": {"num_layers": 2}}).student.num_layers == 2


def test_student_depth_against_a_local_teacher(tmp_path):
    """A local teacher folder's config.json bounds student.num_layers (the student is its first layers); hub ids and
    missing folders are not read (the run may be offline)."""
    teacher = tmp_path / "teacher"
    tiny_backbone("bert", hidden_size=32, num_layers=4, seed=0).save_pretrained(teacher)
    for method in ("finetune", "kd", "pkd", "metadistil", "mpdistil"):
        with pytest.raises(ConfigError, match=r"student.num_layers must be in \[\d, 4\] \(teacher.model .* has 4 "
                                              r"layers\), got 5: the student is a copy of the teacher's first layers"):
            config_from_dict({"method": method, "teacher": {"model": str(teacher)}, "student": {"num_layers": 5}})
        assert config_from_dict({"method": method, "teacher": {"model": str(teacher)},
                                 "student": {"num_layers": 4}}).student.num_layers == 4
    with pytest.raises(ConfigError, match=r"student.num_layers must be in \[1, 6\] \(teacher.model 'default'"):
        config_from_dict({"student": {"num_layers": 7}, "method": "kd"})  # the packaged 6-layer MiniLM
    for model in (str(tmp_path / "absent"), "someone/hub-model"):
        assert config_from_dict({"teacher": {"model": model}, "student": {"num_layers": 40}}).student.num_layers == 40
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="teacher.model: the folder .*empty holds no readable model config"):
        config_from_dict({"teacher": {"model": str(tmp_path / "empty")}})


def test_relative_model_folders_are_made_absolute(tmp_path, monkeypatch):
    """A relative model folder is read from the current directory (as data.data_dir and output_dir are) and the
    config names it absolute, so a run's saved config finds it from any directory: a name only a folder can have
    (also when missing: the error names the folder looked for), and a one- or two-part name that is a folder here;
    hub ids, the packaged model's names and absolute paths stay as they are."""
    base = tmp_path.resolve()
    teacher = make_tiny_teacher(base / "models" / "teacher")
    (base / "home" / "student").mkdir(parents=True)
    monkeypatch.chdir(base / "models")
    monkeypatch.setenv("HOME", str(base / "home"))
    for given, expected in (("teacher", teacher), ("./teacher", teacher), ("../models/teacher", teacher),
                            ("~/student", base / "home" / "student"), ("../absent/a/b", base / "absent" / "a" / "b")):
        assert absolute_model_folder(given) == str(expected), given
    for given in ("someone/hub-model", "bert-base-uncased", "default", str(teacher), "", None):
        assert absolute_model_folder(given) == given, given
    config = config_from_dict({"method": "kd", "teacher": {"model": "teacher"}},
                              ["student.model=./teacher"])
    assert (config.teacher.model, config.student.model) == (str(teacher), str(teacher))
    monkeypatch.chdir(base)  # the same config read in another directory: not a folder there, so a hub id
    assert config_from_dict({"method": "kd", "teacher": {"model": "teacher"}}).teacher.model == "teacher"


def test_max_length_within_what_the_models_take(tmp_path):
    """data.max_length above a local model's tokenizer limit (model_max_length: its position embeddings) passed the
    check, and the run died in the first forward pass over a longer row (BoolQ's validation rows reach 632 tokens)
    with a shape error; the limit is read from a local folder like the depth, hub ids are not read."""
    teacher = make_tiny_teacher(tmp_path / "teacher")  # the packaged MiniLM tokenizer: 512
    for model in (str(teacher), "default"):
        with pytest.raises(ConfigError, match=r"data.max_length must be <= 512 \(the most tokens teacher.model "
                                              r".* takes: its tokenizer's model_max_length\), got 1024"):
            config_from_dict({"method": "kd", "teacher": {"model": model}, "data": {"max_length": 1024}})
        assert config_from_dict({"teacher": {"model": model}, "data": {"max_length": 512}}).data.max_length == 512
    student = make_tiny_teacher(tmp_path / "student")
    with pytest.raises(ConfigError, match="the most tokens student.model"):
        config_from_dict({"method": "finetune", "student": {"model": str(student)}, "data": {"max_length": 600}})
    assert config_from_dict({"teacher": {"model": "someone/hub-model"}, "data": {"max_length": 4096}})


def test_student_model_depth_under_patient_kd(tmp_path):
    """With student.model set, patient KD bounds that model's own depth (num_layers is unused); other methods do
    not compare it with the teacher's."""
    teacher, deep, shallow = tmp_path / "teacher", tmp_path / "deep", tmp_path / "shallow"
    tiny_backbone("bert", hidden_size=32, num_layers=2, seed=0).save_pretrained(teacher)
    tiny_backbone("bert", hidden_size=16, num_layers=3, seed=0).save_pretrained(deep)
    tiny_backbone("bert", hidden_size=16, num_layers=1, seed=0).save_pretrained(shallow)
    base = {"teacher": {"model": str(teacher)}, "student": {"num_layers": 1}}
    with pytest.raises(ConfigError, match=r"the depth of student.model .*deep' must be in \[2, 2\] .* got 3: "
                                          "patient KD matches each student layer to a teacher layer"):
        config_from_dict({**base, "method": "pkd", "student": {"model": str(deep)}})
    with pytest.raises(ConfigError, match=r"the depth of student.model .*shallow' must be >= 2 for method 'mpdistil'"):
        config_from_dict({**base, "method": "mpdistil", "student": {"model": str(shallow)}})
    for model in (deep, shallow):
        assert config_from_dict({**base, "method": "kd", "student": {"model": str(model)}}).student.model == str(model)


def test_cuda_device_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="runtime.device is 'cuda' but no CUDA device is available: set "
                                          "runtime.device to 'auto' or 'cpu'"):
        config_from_dict({"runtime": {"device": "cuda"}})
    assert config_from_dict({"runtime": {"device": "auto"}}).runtime.device == "auto"


def test_load_config_reports_quoted_numbers_and_bounds(tmp_path):
    """Through the YAML file as the CLI reads it."""
    path = tmp_path / "c.yaml"
    path.write_text('output_dir: "1.5"\nstudent_training: {lr: 1e-4}\n')
    config = load_config(path, check_data=False)
    assert config.output_dir == "1.5" and config.student_training.lr == 1e-4
    path.write_text("data: {max_length: 4}\n")
    with pytest.raises(ConfigError, match="data.max_length must be >= 8"):
        load_config(path, check_data=False)


def test_a_key_given_twice_in_the_yaml_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: a section pasted twice silently dropped the first one's settings
    (here teacher_training.lr), so the run trained with the default."""
    path = tmp_path / "c.yaml"
    path.write_text("teacher_training:\n  lr: 1e-4\nseed: 3\nteacher_training:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'teacher_training' given twice \(lines 1 and 4\)"):
        load_config(path, check_data=False)
    path.write_text("data:\n  max_train: 10\n  max_train: 20\n")
    with pytest.raises(ConfigError, match=r"key 'data.max_train' given twice \(lines 2 and 3\)"):
        load_config(path, check_data=False)
    path.write_text("data: {max_train: 10}\nteacher_training: {lr: 1e-4}\n")
    assert load_config(path, check_data=False).data.max_train == 10


def test_deepspeed_jsons_are_found_from_any_directory(tmp_path, monkeypatch):
    """The default DeepSpeed JSONs are the source tree's, named absolute (they were read from the current directory,
    so a run launched elsewhere did not find them); a relative JSON is read from the current directory and named
    absolute; a checkpoint that saved the relative default still resumes from the repository root."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    config = config_from_dict({"runtime": {"deepspeed_student": "ds/z2.json"}})
    assert Path(config.runtime.deepspeed_teacher) == root / "configs" / "deepspeed" / "zero3.json"
    assert Path(config.runtime.deepspeed_teacher).is_file()
    assert config.runtime.deepspeed_student == str(tmp_path / "ds" / "z2.json")
    monkeypatch.chdir(root)
    saved = Config().to_dict()
    saved["runtime"]["deepspeed_teacher"] = "configs/deepspeed/zero3.json"  # as checkpoints before this change
    check_resumable(saved, config_from_dict({}))
    saved["runtime"]["deepspeed_teacher"] = "configs/deepspeed/zero2.json"
    with pytest.raises(ConfigError, match="runtime.deepspeed_teacher"):
        check_resumable(saved, config_from_dict({}))


def test_an_empty_output_dir_is_refused(capsys):
    """output_dir '' (``--set output_dir=``, ``--output-dir "$UNSET"``) wrote the run into the current directory, and
    an empty --output-dir was taken for none given (the config's output_dir)."""
    from mpdistil_fast.cli import main

    for value in ("", "  "):
        with pytest.raises(ConfigError, match="output_dir must name a folder, got an empty string"):
            config_from_dict({"output_dir": value})
    kd = Path(__file__).resolve().parents[1] / "configs" / "kd.yaml"
    assert main(["distill", "--config", str(kd), "--output-dir", ""]) == 2
    assert "output_dir must name a folder" in capsys.readouterr().err
