"""Run configuration: a typed schema, YAML loading, ``--set key=value`` overrides and up-front validation.

Every key of a run lives in one nested dataclass below; :func:`load_config` reads a YAML file into it, applies
overrides, makes relative model folders and DeepSpeed JSONs absolute (:func:`absolute_model_folder`,
:func:`absolute_path`) and checks everything that can be checked without loading a model: unknown keys (with a
suggestion), wrong types, bad choices and ranges, that the data of every task can be found and that a model named
by a path is a folder here.  Each problem raises a :class:`ConfigError` whose message names the dotted key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

import mpdistil_fast.configs as packaged_configs
from mpdistil_fast.data.encoding import MIN_MAX_LENGTH
from mpdistil_fast.data.tasks import SUPERGLUE_TASKS, TASKS

METHODS = ("finetune", "kd", "pkd", "metadistil", "mpdistil")
#: methods whose student stage distils with patient KD (``stages.student_stage``: mpdistil's stage 2 is pkd), whose
#: ``distill.layer_map`` presets match every student layer but the last to a teacher layer (``layer_pairs``)
PATIENT_KD_METHODS = ("pkd", "mpdistil")
#: seeds are in [0, MAX_SEED]: torch generators take seeds below 2^63
MAX_SEED = 2 ** 63 - 1
#: the shipped configs (``configs/`` of the source tree, installed as ``mpdistil_fast.configs``)
PACKAGED_CONFIG_DIR = Path(packaged_configs.__file__).resolve().parent
#: the DeepSpeed JSONs that are the defaults of ``runtime.deepspeed_teacher`` / ``_student`` (absolute, so that a run
#: launched from any directory finds them)
DEEPSPEED_CONFIG_DIR = PACKAGED_CONFIG_DIR / "deepspeed"


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key."""


@dataclass
class DataConfig:
    """Which tasks, where their files are, how they are split, capped, tokenised and batched (``data.*``)."""

    #: distilled and reported tasks (names of ``mpdistil_fast.data.TASKS``, each once)
    tasks: list[str] = field(default_factory=lambda: ["cb", "rte"])
    data_dir: str | None = None  #: local folder of official files; None: $MPDISTIL_DATA_DIR, else the hub
    #: seeded, label-stratified share of train held out as quiz (model selection, rewards, hypergradients), in (0, 1)
    quiz_fraction: float = 0.1
    max_train: int | None = None  #: cap on train examples per task (after the quiz split, which sees all of train)
    max_eval: int | None = None  #: cap on quiz and validation examples per task (a seeded subset of validation)
    #: tokens per encoded example (longer inputs are truncated), >= 8 and at most a local model's model_max_length
    max_length: int = 128
    #: examples per optimizer step (the global batch: under DeepSpeed it is split over the ranks), > 0
    batch_size: int = 16
    eval_batch_size: int = 64  #: examples per forward when scoring quiz / validation splits, > 0


@dataclass
class TeacherConfig:
    """The teacher model (``teacher.*``)."""

    model: str = "default"  #: local folder or hub id; "default" = the packaged MiniLM-L6-H384
    #: the pooled representation the heads and the meta-teacher read: BERT's ``pooler``, the first token (``cls``;
    #: encoders only), the masked ``mean`` or the ``last`` attended token (decoders) (:mod:`mpdistil_fast.models`)
    pooling: Literal["pooler", "cls", "mean", "last"] = "cls"
    #: transformers' attention implementation ("eager", "sdpa", ...); the exact / forward-mode hypergradients need
    #: the student's to be "eager"
    attn_implementation: str = "eager"


@dataclass
class StudentConfig:
    """The student model (``student.*``)."""

    model: str | None = None  #: None: a truncated copy of the teacher (its first ``num_layers`` layers)
    #: layers kept by that copy, in [1, teacher layers] ([2, teacher layers] for pkd / mpdistil's patient KD)
    num_layers: int = 3
    pooling: Literal["pooler", "cls", "mean", "last"] = "cls"  #: as ``teacher.pooling``
    attn_implementation: str = "eager"  #: as ``teacher.attn_implementation``


@dataclass
class OptimConfig:
    """One training stage's optimisation: AdamW with linear warm-up and decay."""

    epochs: int = 1  #: passes over the stage's training data, > 0
    lr: float = 5e-5  #: peak learning rate (reached after the warm-up), > 0
    #: AdamW's decoupled weight decay, >= 0 (biases and LayerNorm weights are not decayed)
    weight_decay: float = 0.01
    #: share of the stage's steps with a linear warm-up from ~0 to ``lr``, in [0, 1); then linear decay to 0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  #: clip of the gradients' global L2 norm before each step, > 0
    max_steps: int | None = None  #: cap on optimizer steps (budgets for smoke runs)


@dataclass
class DistillConfig:
    """Student losses: (1 - alpha) CE + alpha KD(T) + beta hidden-MSE (PKD, Sun et al. 2019).  KD is the forward or
    reverse KL, or the generalized JSD with weight jsd_beta (GKD, Agarwal et al. 2024)."""

    alpha: float = 0.5  #: weight of the KD term (1 - alpha: of the label CE), in [0, 1]
    temperature: float = 2.0  #: softmax temperature T > 0 of the KD term (which is multiplied by T^2)
    direction: Literal["forward", "reverse", "jsd"] = "forward"  #: KL(p_t || p_s), KL(p_s || p_t) or the JSD
    jsd_beta: float = 0.5  #: beta of direction "jsd", in [0, 1] (0 / 1: forward / reverse KL)
    #: weight of the patient hidden-state loss (pkd and mpdistil's stage 2), >= 0; that loss is an elementwise mean
    beta: float = 10.0
    #: patient KD's teacher layers: "skip" (every (L_t // L_s)-th) or "last" (the top ones), student's last excepted
    layer_map: Literal["skip", "last"] = "skip"


@dataclass
class MetaTeacherConfig:
    """Stage 3 of MPDistil: the meta-teacher reads teacher and student pooled features."""

    #: collaborative 0.5 CE(z_T) + 0.5 CE(z_S), or competitive CE(z_T) - mean p(y | h_T) + mean p(y | h_S)
    loss: Literal["collaborative", "competitive"] = "collaborative"
    hidden: int | None = None  #: width of the meta-teacher's hidden layer (> 0); null: a linear meta-teacher
    lr: float = 1e-3  #: meta-teacher learning rate (AdamW, on ``training``'s schedule), > 0
    bilevel: bool = False  #: meta-teacher steps by the bi-level hypergradient of the student's quiz loss
    #: method of that hypergradient: one of ``mpdistil_fast.bilevel.METHODS`` (exact, finite_difference,
    #: forward_mode, first_order)
    hypergradient: str = "finite_difference"
    #: weight of that hypergradient beside the meta-teacher's own loss gradient; the hypergradient is proportional
    #: to the pilot step's size (training.lr), so at weight 1 it is a tiny fraction of the step (both norms logged)
    hypergradient_weight: float = 1.0
    training: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=1, lr=3e-5))  #: the student in stage 3


@dataclass
class CurriculumConfig:
    """Stage 4 of MPDistil: a REINFORCE policy picks the task of each student step."""

    enabled: bool = True  #: false is the ablation without stage 4
    #: the policy's action space (task names; actions outside ``data.tasks`` are trained, not reported)
    actions: list[str] = field(default_factory=lambda: list(SUPERGLUE_TASKS))
    episodes: int = 10  #: policy updates (one per episode), > 0
    steps_per_episode: int = 8  #: actions (and student steps) per episode, > 0
    gamma: float = 0.99  #: discount of later rewards in the return G_t = sum_k gamma^(k-t) r_k, in (0, 1]
    #: binary: 1 when the student's quiz accuracy beats the meta-teacher's, else 0; real: their difference
    reward: Literal["binary", "real"] = "binary"
    policy_lr: float = 0.01  #: Adam learning rate of the policy, > 0
    policy_hidden: int = 32  #: width of the policy's hidden (tanh) layer, > 0
    #: decay d of the per-step baseline b_t <- d b_t + (1 - d) G_t (an exponential moving average), in [0, 1)
    baseline_decay: float = 0.9
    student_lr: float = 2e-5  #: the student's peak learning rate in stage 4 (``student_training``'s other settings)
    quiz_batches: int = 1  #: quiz batches per reported task and reward, > 0


@dataclass
class MetaDistilConfig:
    """MetaDistil (Zhou et al., ACL 2022), Algorithm 1: pilot update, quiz hypergradient, teacher step."""

    #: method of the teacher's hypergradient: one of ``mpdistil_fast.bilevel.METHODS``
    hypergradient: str = "finite_difference"
    teacher_lr: float = 2e-5  #: the teacher's AdamW learning rate on its quiz hypergradient, > 0
    #: step size of the pilot (virtual) student update under pilot_rule "sgd" (the "student" rule takes the
    #: student optimizer's scheduled rate)
    inner_lr: float = 1e-4
    #: rule of the pilot update: "student" follows the student's AdamW with its current state (SAMA's
    #: preconditioned direction); "sgd" is plain SGD, as the released MetaDistil code (assume_s_step_size)
    pilot_rule: Literal["student", "sgd"] = "student"


@dataclass
class RuntimeConfig:
    """Where and how the run executes, checkpoints and logs (``runtime.*``)."""

    #: the execution backend behind :class:`mpdistil_fast.distributed.Runtime`: one process ("local"), or data
    #: parallel over DeepSpeed engines ("deepspeed", launched by torchrun or the deepspeed launcher)
    kind: Literal["local", "deepspeed"] = "local"
    #: DeepSpeed JSON of the teacher's / the student's engines (runtime.kind deepspeed; ZeRO 0-3 / 0-2)
    deepspeed_teacher: str = str(DEEPSPEED_CONFIG_DIR / "zero3.json")
    deepspeed_student: str = str(DEEPSPEED_CONFIG_DIR / "zero2.json")
    device: Literal["auto", "cpu", "cuda"] = "auto"  #: "auto": CUDA when available, else CPU
    num_threads: int | None = None  #: torch's intra-op CPU threads (> 0); null: torch's default
    checkpoint_every: int = 50  #: optimizer steps between checkpoints (and at every stage end)
    keep_checkpoints: int = 2  #: the newest checkpoints kept, > 0
    log_every: int = 10  #: optimizer steps between metric records (metrics.jsonl, TensorBoard), > 0
    tensorboard: bool = True  #: write TensorBoard events under output_dir/tensorboard
    progress: bool = True  #: progress bars (``--quiet`` turns them off)
    #: the frozen teacher's outputs, computed once per split and reused: held in memory, on disk under
    #: output_dir/teacher_cache, or recomputed at every use ("off")
    teacher_cache: Literal["memory", "disk", "off"] = "memory"
    #: runtime.kind deepspeed: minutes a rank waits in a collective for the others before it fails with a timeout
    #: (DeepSpeed's default, 10): the ranks that a hanging (not dead) rank leaves waiting end after this long
    collective_timeout_minutes: float = 10.0


@dataclass
class Config:
    """A whole run: the method, its seed and output folder, and one section per part (README: the key list)."""

    #: which stages run (``mpdistil_fast.pipeline.stages``): finetune, kd, pkd, metadistil or mpdistil
    method: Literal["finetune", "kd", "pkd", "metadistil", "mpdistil"] = "mpdistil"
    #: seed of the run's random draws (quiz split, initialisation, dropout, batch order, the policy's sampling;
    #: validation subsets use fixed seeds), in [0, 2^63)
    seed: int = 0
    output_dir: str = "runs/mpdistil"  #: folder of the report, metrics and checkpoints (relative: to the cwd)
    #: reproduce the released MPDistil code's choices (selection on the reported split, dropout off after the
    #: first evaluation, one curriculum action, one student update per episode, gamma^k, undetached state)
    reference_compat: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher_training: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=2, lr=5e-5))
    student_training: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=2, lr=1e-4))
    distill: DistillConfig = field(default_factory=DistillConfig)
    meta_teacher: MetaTeacherConfig = field(default_factory=MetaTeacherConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    metadistil: MetaDistilConfig = field(default_factory=MetaDistilConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts (what checkpoints and report.json record)."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- building

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


#: The spellings PyYAML (YAML 1.1) reads as each bool: a choice spelled so (``teacher_cache: off``) is meant.
_YAML11_BOOLS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` converted to the annotated type ``tp``, or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} keys, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # PyYAML (YAML 1.1) reads an unquoted off / on (no, yes, ...) as a bool
            spelled = [choice for choice in typing.get_args(tp)
                       if isinstance(choice, str) and choice.lower() in _YAML11_BOOLS[value]]
            value = spelled[0] if len(spelled) == 1 else value
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be one of {typing.get_args(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _yaml11_float(value):  # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
    defaults = cls()
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(prefix + name, raw[name], hints[name])
        else:
            kwargs[name] = getattr(defaults, name)
    return cls(**kwargs)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)``, the value parsed as YAML (``3``, ``0.5``, ``[cb, rte]``, ``null``; a
    float key's ``1e-4``, a string in YAML 1.1, becomes a float when the config is built)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {value!r} ({exc})") from exc
    return key, parsed


def _yaml11_float(text: str) -> bool:
    """Whether ``text`` is a number with an exponent or a dot (``1e-4``), which PyYAML (YAML 1.1) leaves a string;
    only keys declared float convert it, so a string key keeps a quoted ``"1.5"``."""
    try:
        float(text)
    except ValueError:
        return False
    return any(c in text.lower() for c in "e.")


def verbatim_override(key: str, text: str) -> str:
    """An override ``key=text`` that sets ``text`` as it is (a folder name): quoted, since an override's value is
    parsed as YAML, where ' #' starts a comment and 2024 is a number."""
    return f"{key}={json.dumps(str(text), ensure_ascii=False)}"


def config_from_dict(raw: dict[str, Any], overrides: list[str] = ()) -> Config:
    """A validated :class:`Config` from a plain mapping plus ``key=value`` overrides (no data check)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)  # overrides write into nested sections: leave the caller's mapping as it was
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    config = _build(Config, raw)
    for key, absolute in PATH_KEYS.items():
        section, name = key.split(".")
        part = getattr(config, section)
        setattr(part, name, absolute(getattr(part, name)))
    check_values(config)
    return config


def _refuse_repeated_keys(path: Path, node: yaml.Node | None, prefix: str = "") -> None:
    """A key given twice in one mapping of the YAML file: PyYAML keeps the last, silently dropping the first (a
    section pasted twice loses the first one's settings)."""
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name in lines:
                raise ConfigError(f"{path}: key '{prefix}{name}' given twice (lines {lines[name]} and "
                                  f"{key.start_mark.line + 1})")
            if name is not None:
                lines[name] = key.start_mark.line + 1
            _refuse_repeated_keys(path, value, f"{prefix}{name}." if name is not None else prefix)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(path, item, prefix)


def load_config(path: str | os.PathLike, overrides: list[str] = (), *, check_data: bool = True) -> Config:
    """Read, override and validate a YAML config; with ``check_data`` also find every task's data files."""
    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in PACKAGED_CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file not found: {path} (the shipped configs, {shipped}, are in "
                          f"{PACKAGED_CONFIG_DIR})")
    try:
        text = path.read_text()
        _refuse_repeated_keys(path, yaml.compose(text, Loader=yaml.SafeLoader))
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    config = config_from_dict(raw, overrides)
    if check_data:
        check_data_available(config)
        check_models_available(config)
    return config


# ----------------------------------------------------------------------------------------------- checks

def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_values(config: Config) -> None:
    """Ranges and cross-key rules that types alone do not express."""
    _require(0 <= config.seed <= MAX_SEED, f"seed must be in [0, 2**63 - 1], got {config.seed}")
    _require(config.output_dir.strip() != "", "output_dir must name a folder, got an empty string (an unset shell "
             "variable?); write '.' for the current directory")
    _require(len(config.data.tasks) > 0, "data.tasks must name at least one task")
    for i, task in enumerate(config.data.tasks):
        _require(task in TASKS, f"data.tasks[{i}]: unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    _require(len(set(config.data.tasks)) == len(config.data.tasks), "data.tasks lists a task twice")
    _require(0.0 < config.data.quiz_fraction < 1.0,
             f"data.quiz_fraction must be in (0, 1), got {config.data.quiz_fraction}")
    _require(config.data.max_length >= MIN_MAX_LENGTH,
             f"data.max_length must be >= {MIN_MAX_LENGTH}, got {config.data.max_length}")
    for key in ("batch_size", "eval_batch_size"):
        _require(getattr(config.data, key) > 0, f"data.{key} must be > 0, got {getattr(config.data, key)}")
    for key in ("max_train", "max_eval"):
        value = getattr(config.data, key)
        _require(value is None or value > 0, f"data.{key} must be > 0 or null, got {value}")
    _require(config.student.num_layers > 0, f"student.num_layers must be > 0, got {config.student.num_layers}")
    for key, model in (("teacher.model", config.teacher.model), ("student.model", config.student.model)):
        _require(model != "", f"{key} must name a model folder or hub id (or 'default'), got ''")
    _check_depths(config)
    _check_max_length(config)
    for section in ("teacher_training", "student_training"):
        _check_optim(section, getattr(config, section))
    _check_optim("meta_teacher.training", config.meta_teacher.training)
    d = config.distill
    _require(0.0 <= d.alpha <= 1.0, f"distill.alpha must be in [0, 1], got {d.alpha}")
    _require(d.temperature > 0, f"distill.temperature must be > 0, got {d.temperature}")
    _require(0.0 <= d.jsd_beta <= 1.0, f"distill.jsd_beta must be in [0, 1], got {d.jsd_beta}")
    _require(d.beta >= 0, f"distill.beta must be >= 0, got {d.beta}")
    m = config.meta_teacher
    _require(m.hidden is None or m.hidden > 0, f"meta_teacher.hidden must be > 0 or null, got {m.hidden}")
    _require(m.lr > 0, f"meta_teacher.lr must be > 0, got {m.lr}")
    _require(math.isfinite(m.hypergradient_weight) and m.hypergradient_weight > 0,
             f"meta_teacher.hypergradient_weight must be finite and > 0, got {m.hypergradient_weight}")
    for key in ("teacher_lr", "inner_lr"):
        _require(getattr(config.metadistil, key) > 0, f"metadistil.{key} must be > 0, got "
                                                      f"{getattr(config.metadistil, key)}")
    c = config.curriculum
    for i, task in enumerate(c.actions):
        _require(task in TASKS, f"curriculum.actions[{i}]: unknown task {task!r}")
    _require(len(c.actions) > 0, "curriculum.actions must name at least one task")
    _require(0.0 < c.gamma <= 1.0, f"curriculum.gamma must be in (0, 1], got {c.gamma}")
    _require(0.0 <= c.baseline_decay < 1.0, f"curriculum.baseline_decay must be in [0, 1), got {c.baseline_decay}")
    for key in ("episodes", "steps_per_episode", "policy_hidden", "quiz_batches"):
        _require(getattr(c, key) > 0, f"curriculum.{key} must be > 0, got {getattr(c, key)}")
    for key in ("policy_lr", "student_lr"):
        _require(getattr(c, key) > 0, f"curriculum.{key} must be > 0, got {getattr(c, key)}")
    r = config.runtime
    for key in ("checkpoint_every", "keep_checkpoints", "log_every"):
        _require(getattr(r, key) > 0, f"runtime.{key} must be > 0, got {getattr(r, key)}")
    _require(r.num_threads is None or r.num_threads > 0, f"runtime.num_threads must be > 0, got {r.num_threads}")
    _require(0 < r.collective_timeout_minutes < math.inf,
             f"runtime.collective_timeout_minutes must be finite and > 0, got {r.collective_timeout_minutes}")
    from mpdistil_fast.distributed.runtime import resolve_device

    try:
        resolve_device(r.device)
    except ValueError as error:
        raise ConfigError(f"{error}: set runtime.device to 'auto' or 'cpu'") from None
    launched_ranks = int(os.environ.get("WORLD_SIZE", "1") or 1)
    _require(r.kind != "local" or launched_ranks == 1,
             f"this process is one of {launched_ranks} ranks (WORLD_SIZE, set by torchrun or the deepspeed launcher) "
             "but runtime.kind is 'local': every rank would train the whole run into the same output_dir; set "
             "runtime.kind=deepspeed, or start one process without a launcher")
    if r.kind == "deepspeed":
        key, method = bilevel_hypergradient(config) or ("", None)
        _require(method != "exact",
                 f"{key} 'exact' differentiates through the inner gradient (double backward), which DeepSpeed's "
                 "engines (ZeRO-3 above all) and a data-parallel average do not support: use 'finite_difference' "
                 "(first-order backward passes only)")
        _require(not (config.method == "mpdistil" and config.reference_compat),
                 "runtime.kind 'deepspeed' does not run reference_compat: it accumulates a whole episode's backward "
                 "passes into one step, which the engines (one step per backward) do not")
        import torch

        from mpdistil_fast.distributed.deepspeed_runtime import engine_dtype, load_deepspeed_config

        for name in ("teacher", "student"):
            try:
                json_config = load_deepspeed_config(getattr(r, f"deepspeed_{name}"), name=name)
            except (OSError, ValueError) as error:
                raise ConfigError(str(error)) from None
            _require(method is None or engine_dtype(json_config) != torch.float16,
                     f"runtime.deepspeed_{name} trains in fp16, which needs loss scaling (its gradients underflow); "
                     f"the bi-level passes of {key} take their gradients without it: use bf16")
    if config.method == "metadistil" or config.meta_teacher.bilevel:
        from mpdistil_fast.bilevel import METHODS as HYPERGRADIENT_METHODS

        for key, value in (("metadistil.hypergradient", config.metadistil.hypergradient),
                           ("meta_teacher.hypergradient", config.meta_teacher.hypergradient)):
            _require(value in HYPERGRADIENT_METHODS,
                     f"{key} must be one of {tuple(HYPERGRADIENT_METHODS)}, got {value!r}")
        key, method = bilevel_hypergradient(config) or ("", None)
        _require(method not in ("exact", "forward_mode") or config.student.attn_implementation == "eager",
                 f"{key} {method!r} differentiates through the student's attention (twice, or in forward mode), "
                 f"which student.attn_implementation {config.student.attn_implementation!r} does not support: set "
                 "it to 'eager' or use 'finite_difference'")


#: Keys a ``--resume`` may change: how the run logs, checkpoints and shows progress, where it finds its data and writes
#: (a moved output_dir or data folder), its device and threads, the evaluation batch size.  Any other change alters
#: what the checkpoint's run computes (its models, data, schedule or method), so it cannot continue that run.
RESUMABLE_CHANGES = ("output_dir", "data.data_dir", "data.eval_batch_size", "runtime.device", "runtime.num_threads",
                     "runtime.checkpoint_every", "runtime.keep_checkpoints", "runtime.log_every", "runtime.tensorboard",
                     "runtime.progress", "runtime.collective_timeout_minutes")


def _dotted(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_resumable(saved: dict[str, Any], config: Config) -> list[str]:
    """Refuse (:class:`ConfigError`) to continue a run whose checkpoint's config ``saved`` (``Config.to_dict()``)
    differs from ``config`` in a key outside :data:`RESUMABLE_CHANGES`; a key the checkpoint predates counts as its
    default, and a relative model folder or DeepSpeed JSON it names (saved before they were made absolute) the
    one it names here.  Returns the keys of :data:`RESUMABLE_CHANGES` that differ."""
    now, then, defaults = _dotted(config.to_dict()), _dotted(saved), _dotted(Config().to_dict())
    for key, absolute in PATH_KEYS.items():
        if key in then:
            then[key] = absolute(then[key])
    differing = sorted(key for key, value in now.items() if then.get(key, defaults.get(key)) != value)
    changed = [key for key in differing if key not in RESUMABLE_CHANGES]
    if changed:
        shown = "; ".join(f"{key}: {then.get(key, defaults.get(key))!r} -> {now[key]!r}" for key in changed)
        raise ConfigError(f"--resume: the config differs from the checkpoint's in {', '.join(changed)} ({shown}): the "
                          f"run cannot continue with another one; resume with its config (only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change), or start a new run (--overwrite, or another "
                          "output_dir)")
    return differing


def bilevel_hypergradient(config: Config) -> tuple[str, str] | None:
    """(config key, method) of the hypergradient the run computes: MetaDistil's, or the bi-level meta-teacher's."""
    if config.method == "metadistil":
        return "metadistil.hypergradient", config.metadistil.hypergradient
    if config.method == "mpdistil" and config.meta_teacher.bilevel:
        return "meta_teacher.hypergradient", config.meta_teacher.hypergradient
    return None


def _check_depths(config: Config) -> None:
    """The student's depth against patient KD's layer map (>= 2) and the teacher's depth (<=), where both are known
    before loading: ``student.num_layers`` (or a local student.model folder's), a local teacher folder's."""
    student = config.student
    if student.model is None:
        subject, depth = "student.num_layers", student.num_layers
    else:
        subject, depth = f"the depth of student.model {student.model!r}", _local_depth("student.model", student.model)
    if depth is None:
        return
    patient = config.method in PATIENT_KD_METHODS
    _require(not patient or depth >= 2,
             f"{subject} must be >= 2 for method {config.method!r}, got {depth}: its patient KD "
             f"(distill.layer_map {config.distill.layer_map!r}) matches every student layer but the last (distilled "
             "through the logits) to a teacher layer, so one layer leaves nothing to match")
    if student.model is not None and not patient:
        return  # the student neither comes from the teacher's layers nor is matched to them
    teacher = config.teacher.model
    teacher_depth = _local_depth("teacher.model", teacher)
    why = ("the student is a copy of the teacher's first layers" if student.model is None
           else "patient KD matches each student layer to a teacher layer")
    _require(teacher_depth is None or depth <= teacher_depth,
             f"{subject} must be in [{2 if patient else 1}, {teacher_depth}] (teacher.model {teacher!r} has "
             f"{teacher_depth} layers), got {depth}: {why}")


def _models_read(config: Config) -> list[tuple[str, str]]:
    """``(key, name)`` of every model folder or hub id the run reads: the student's own model, and the teacher
    unless a finetune run has a student model of its own (otherwise the teacher gives the tokenizer and layers)."""
    models = [("student.model", config.student.model)]
    if config.method != "finetune" or config.student.model is None:
        models.append(("teacher.model", config.teacher.model))
    return [(key, name) for key, name in models if name is not None]


def _check_max_length(config: Config) -> None:
    """``data.max_length`` within the tokens each model the run reads takes (a local folder's tokenizer
    ``model_max_length``, its position embeddings): a longer row fails in the model's forward pass, mid-run."""
    for key, model in _models_read(config):
        limit = _local_token_limit(model)
        _require(limit is None or config.data.max_length <= limit,
                 f"data.max_length must be <= {limit} (the most tokens {key} {model!r} takes: its tokenizer's "
                 f"model_max_length), got {config.data.max_length}")


def _local_token_limit(model: str) -> int | None:
    """``model_max_length`` of the local model folder's tokenizer_config.json; None for a hub id, a folder without
    one, or a tokenizer that sets no real limit (transformers' placeholder is 1e30)."""
    from mpdistil_fast.models.backbones import resolve_model_path

    try:
        path = Path(resolve_model_path(model)) / "tokenizer_config.json"
    except ImportError:
        return None
    try:
        limit = json.loads(path.read_text()).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < 10 ** 9 else None


def _local_depth(key: str, model: str) -> int | None:
    """``num_hidden_layers`` from the config.json of the local model folder ``model`` (or the packaged MiniLM's,
    ``resolve_model_path``); None for a hub id (or a MiniLM package not installed): the run resolves those, maybe
    offline."""
    from mpdistil_fast.models.backbones import resolve_model_path

    try:
        path = Path(resolve_model_path(model))
    except ImportError:
        return None
    if not path.is_dir():
        return None
    import transformers

    try:
        return getattr(transformers.AutoConfig.from_pretrained(str(path)), "num_hidden_layers", None)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: the folder {path} holds no readable model config ({error})") from None


def _check_optim(section: str, optim: OptimConfig) -> None:
    _require(optim.epochs > 0, f"{section}.epochs must be > 0, got {optim.epochs}")
    _require(optim.lr > 0, f"{section}.lr must be > 0, got {optim.lr}")
    _require(optim.weight_decay >= 0, f"{section}.weight_decay must be >= 0, got {optim.weight_decay}")
    _require(0.0 <= optim.warmup_ratio < 1.0, f"{section}.warmup_ratio must be in [0, 1), got {optim.warmup_ratio}")
    _require(optim.max_grad_norm > 0, f"{section}.max_grad_norm must be > 0, got {optim.max_grad_norm}")
    _require(optim.max_steps is None or optim.max_steps > 0,
             f"{section}.max_steps must be > 0 or null, got {optim.max_steps}")


def curriculum_tasks(config: Config) -> list[str]:
    """Every task whose data the run reads: the reported tasks, then the curriculum's extra actions."""
    tasks = list(config.data.tasks)
    if config.method == "mpdistil" and config.curriculum.enabled and not config.reference_compat:
        tasks += [t for t in config.curriculum.actions if t not in tasks]
    return tasks


def absolute_model_folder(name: str | None) -> str | None:
    """``name`` (a ``model`` key's value) as an absolute path when it is a relative local folder, read from the
    current directory as ``data.data_dir``, ``output_dir`` and the DeepSpeed JSONs are, so that the run's saved config
    names the folder from anywhere (``evaluate`` in another directory took it for a missing folder, or a hub id):
    a name only a folder can have (``./``, ``../``, ``~``, three or more parts), and a one- or two-part name that is
    a folder here (transformers loads that folder before a hub id of the same name).  Hub ids, absolute paths, the
    packaged model's names and None stay as they are."""
    from mpdistil_fast.models.backbones import PACKAGED_MODEL_NAMES

    if not name or name in PACKAGED_MODEL_NAMES or os.path.isabs(name):
        return name
    return absolute_path(name) if _cannot_be_a_hub_id(name) or Path(name).expanduser().is_dir() else name


def absolute_path(path: str) -> str:
    """A file path read from the current directory (``~`` expanded), as an absolute path."""
    return str(Path(path).expanduser().resolve())


#: the keys that name a model folder or a file, and how a relative one (read from the current directory) is named
#: absolute in a run's config
PATH_KEYS: dict[str, Callable[[Any], Any]] = {"teacher.model": absolute_model_folder,
                                              "student.model": absolute_model_folder,
                                              "runtime.deepspeed_teacher": absolute_path,
                                              "runtime.deepspeed_student": absolute_path}


def _cannot_be_a_hub_id(name: str) -> bool:
    """A model name only a local folder can have: absolute, starting with ``.`` or ``~``, or of more than two parts
    (hub ids are ``name`` or ``namespace/name`` and start with a letter, digit or ``_``)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def check_models_available(config: Config) -> None:
    """Every model the run loads whose name can only be a local folder is one (transformers would take a missing
    folder for a hub id and fail inside loading); hub ids are left to the run (it may be offline)."""
    from mpdistil_fast.models.backbones import resolve_model_path

    for key, name in _models_read(config):
        if _cannot_be_a_hub_id(name) and not Path(resolve_model_path(name)).is_dir():
            raise ConfigError(f"{key}: model folder not found: {name}")


def check_data_available(config: Config) -> None:
    """Every task the run needs has data: a local folder with its files, or (no folder) the hub via datasets."""
    from mpdistil_fast.data import resolve_data_dir

    try:
        data_dir = resolve_data_dir(config.data.data_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data.data_dir: {exc}") from exc
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ConfigError(f"data.data_dir: folder not found: {data_dir} (set data.data_dir or MPDISTIL_DATA_DIR)")
    if data_dir is None and os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise ConfigError("no data: data.data_dir and MPDISTIL_DATA_DIR are unset and HF_DATASETS_OFFLINE=1 rules "
                          "out the hub; point data.data_dir at a folder of the official SuperGLUE/GLUE files")
    if data_dir is not None:
        from mpdistil_fast.data import load_task_splits

        for task in curriculum_tasks(config):
            try:
                load_task_splits(task, data_dir, seed=config.seed, quiz_fraction=config.data.quiz_fraction)
            except (FileNotFoundError, ValueError, KeyError) as exc:
                raise ConfigError(f"data for task {task!r} not usable in {data_dir}: {exc}") from exc
