"""The training loop shared by every stage: data, models, checkpoints at step boundaries, exact resume, evaluation.

A run is a sequence of stages (:data:`STAGES`); each stage is a loop of optimizer steps driven by :meth:`Run.loop`.
The loop checkpoints every ``runtime.checkpoint_every`` steps and at every stage end: models, optimizers, schedulers,
the best-so-far snapshot, the curriculum policy and its episode in progress, the RNG state, and the position in
the data (a stage's step counter, from which :mod:`.streams` recomputes the exact batch).  ``--resume`` loads the
newest checkpoint, skips the finished stages and continues the current one from the next step, so a run killed at
any moment ends in the same state as an uninterrupted one (on CPU, for a fixed seed).

Model selection uses the quiz split (held out of train); the validation split is only reported.
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import math
import random
import secrets
import shutil
import tempfile
import time
from datetime import timedelta
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from mpdistil_fast.data import (EncodedSplit, TeacherCache, compute_metrics, encode_examples, iterate_batches,
                                load_task_splits, resolve_data_dir, trim_padding)
from mpdistil_fast.distributed.runtime import OptimizerSpec, Runtime, TrainedModel, is_partitioned, make_runtime
from mpdistil_fast.models import TaskModel, load_backbone, load_tokenizer, resolve_model_path, truncated_copy
from mpdistil_fast.models.backbones import same_tokenization
from mpdistil_fast.pipeline.checkpoint import (CHECKPOINTS_SUBDIR, capture_rng_state, checkpoint_dir,
                                               checkpoints_by_step, flatten_state_dict, load_checkpoint,
                                               prune_checkpoints, read_state, restore_rng_state, save_checkpoint,
                                               unflatten_state_dict)
from mpdistil_fast.pipeline.config import Config, ConfigError, OptimConfig, check_resumable, curriculum_tasks
from mpdistil_fast.pipeline.metrics_log import (METRICS_FILE, TENSORBOARD_SUBDIR, MetricsLogger, TrainingDivergedError,
                                                check_finite_losses, diverged)
from mpdistil_fast.pipeline.report import REPORT_FILES, write_report
from mpdistil_fast.pipeline.streams import Batch, MultiTaskSchedule

LOG = logging.getLogger("mpdistil_fast")
STATE_VERSION = 1
#: Where every rank writes its part of a checkpoint before the main process moves it in (``SHARDS_FOLDER``).
SHARD_STAGING = ".checkpoint-shards"
SHARDS_FOLDER = "shards"
#: What a run writes into its output_dir (a new run refuses to mix its own with an earlier run's).
RUN_OUTPUTS = (CHECKPOINTS_SUBDIR, SHARD_STAGING, METRICS_FILE, TENSORBOARD_SUBDIR, *REPORT_FILES)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: The predicted label of a row whose logits hold a NaN (:meth:`Run.predict_with`).
NO_PREDICTION = -1


def training_modes(model: nn.Module) -> str:
    """Each submodule's train (1) / eval (0) flag in ``model.modules()`` order: a checkpoint keeps them, because a
    resumed process builds its models fresh (``from_pretrained`` in eval mode, new heads in train mode) while the
    run may have left them otherwise (``reference_compat`` never turns dropout back on)."""
    return "".join("1" if module.training else "0" for module in model.modules())


def take_floating_dtype(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Cast ``model`` to the one floating dtype of its checkpointed ``weights`` when it differs: a DeepSpeed engine
    casts its module (bf16/fp16), and a model rebuilt on resume is fp32 until a new engine, if any, takes it (the
    meta-teachers of the curriculum get none)."""
    dtypes = {tensor.dtype for tensor in weights.values() if tensor.is_floating_point()}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) != next(model.parameters()).dtype:
        model.to(dtype)


def set_training_modes(model: nn.Module, modes: str) -> None:
    """Restore :func:`training_modes`."""
    modules = list(model.modules())
    if len(modules) != len(modes):
        raise ValueError(f"the checkpoint's train/eval modes are for {len(modes)} modules, "
                         f"{type(model).__name__} has {len(modules)}")
    for module, mode in zip(modules, modes):
        module.training = mode == "1"


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUTS}


def runtime_for(config: Config) -> Runtime:
    """The runtime ``config.runtime`` asks for (``kind``, device, threads, DeepSpeed JSONs, collective timeout)."""
    return make_runtime(config.runtime.kind, device=config.runtime.device, num_threads=config.runtime.num_threads,
                        deepspeed_configs={"teacher": config.runtime.deepspeed_teacher,
                                           "student": config.runtime.deepspeed_student},
                        batch_size=config.data.batch_size,
                        collective_timeout=timedelta(minutes=config.runtime.collective_timeout_minutes))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class BestSnapshot:
    """The best weights of the model a stage trains, by the quiz score (higher is better).  Every rank offers and
    restores; each keeps what ``runtime.snapshot_weights`` gives it (whole weights in one process)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.score: float | None = None
        self.step = -1
        self.weights: dict[str, torch.Tensor] = {}

    @staticmethod
    def for_model(runtime: Runtime, model: nn.Module) -> "BestSnapshot":
        """The snapshot kind ``model`` needs: of a ZeRO-3 model each rank keeps only its own partitions."""
        return RankShareSnapshot(runtime) if is_partitioned(model) else BestSnapshot(runtime)

    def offer(self, score: float, step: int, model: nn.Module) -> bool:
        """Keep ``model``'s weights if ``score`` beats the kept one (a tie keeps the earlier; a NaN score ranks
        below every number, so it never replaces one and any number replaces it)."""
        if self.score is not None and not (score > self.score or math.isnan(self.score) and not math.isnan(score)):
            return False
        self.score, self.step = score, step
        self.weights = self.runtime.snapshot_weights(model)
        return True

    def restore_into(self, model: nn.Module) -> None:
        if self.weights:
            self.runtime.restore_snapshot(model, self.weights)

    def state_dict(self) -> dict[str, Any]:
        return {"score": self.score, "step": self.step, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.score, self.step, self.weights = state["score"], state["step"], dict(state["weights"])


class RankShareSnapshot(BestSnapshot):
    """A :class:`BestSnapshot` of a ZeRO-3 model: each rank holds its own partitions (``1/W`` of the weights, taken
    without a gather), so a checkpoint stores one file per rank under ``shards/`` (same world size to resume).  A
    checkpoint written before snapshots were sharded holds whole weights (:meth:`load_state_dict`): those are kept
    whole, and restored through ``runtime.write_weights``, until the next offer."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.whole = False  #: ``weights`` are whole weights (from an older checkpoint), not this rank's partitions

    def _file(self, directory: Path) -> Path:
        return directory / f"rank{self.runtime.rank:05d}.safetensors"

    def offer(self, score: float, step: int, model: nn.Module) -> bool:
        taken = super().offer(score, step, model)
        self.whole = self.whole and not taken
        return taken

    def restore_into(self, model: nn.Module) -> None:
        if self.weights and self.whole:
            self.runtime.write_weights(model, self.weights)
        else:
            super().restore_into(model)

    def state_dict(self) -> dict[str, Any]:
        raise TypeError("a ZeRO-3 snapshot is partitioned over the ranks: save it with save_sharded(directory)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Whole weights, as a checkpoint written before snapshots were sharded holds them."""
        super().load_state_dict(state)
        self.whole = True

    def save_sharded(self, directory: Path) -> None:
        """Every rank: its partitions (or whole weights still kept from an older checkpoint), with the score and
        step, into its own file of ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.contiguous() for name, tensor in self.weights.items()}, self._file(directory),
                  metadata={"score": json.dumps(self.score), "step": str(self.step), "whole": str(int(self.whole))})

    def load_sharded(self, directory: Path) -> None:
        """Every rank: what :meth:`save_sharded` wrote for this rank."""
        path = self._file(directory)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint has no snapshot for rank {self.runtime.rank} at {str(path)!r} "
                                    "(resume with the world size that saved it)")
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata()
            self.weights = {name: file.get_tensor(name) for name in file.keys()}
        self.score, self.step = json.loads(metadata["score"]), int(metadata["step"])
        self.whole = metadata.get("whole") == "1"


class Run:
    """One distillation run: builds everything from a :class:`Config`, runs its stages, writes its outputs."""

    def __init__(self, config: Config, *, resume: bool = False, checkpoint: Path | None = None,
                 overwrite: bool = False, runtime: Runtime | None = None,
                 check_data: Callable[["Run"], None] | None = None):
        """``resume``: continue from the newest checkpoint in ``output_dir`` (a config that differs from its run's
        outside :data:`~.config.RESUMABLE_CHANGES` is a :class:`ConfigError`); ``checkpoint``: load that one;
        ``check_data(run)``: called once the data has loaded (``data_source``, ``data_fingerprint``) and before the
        models are built, to refuse data early (``evaluate`` refuses other validation rows there).  A new
        run (neither) refuses an ``output_dir`` that holds an earlier run's outputs (their checkpoints and metrics
        would mix with its own), unless ``overwrite``, which deletes them first (a disk teacher cache stays: its
        entries are keyed by the teacher's weights)."""
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.runtime = runtime or runtime_for(config)
        self.is_main = self.runtime.is_main
        if config.data.batch_size % self.runtime.world_size:
            raise ConfigError(f"data.batch_size {config.data.batch_size} is not a multiple of the "
                              f"{self.runtime.world_size} ranks: every rank steps on an equal share of each batch")
        writes_outputs = checkpoint is None  # a run (evaluate only reads a checkpoint)
        saved: dict[str, Any] = {}  # --resume: the state of the checkpoint it continues from
        if writes_outputs:  # (before --resume looks for its checkpoint there: every rank must see the same folder)
            self._check_output_dir_writable()
        if checkpoint is None and not resume:
            self._claim_output_dir(overwrite)
        elif checkpoint is None:  # --resume: its checkpoint's config must describe this run (before anything loads)
            checkpoint = self._newest_checkpoint()
            saved = read_state(checkpoint, skip=(SHARDS_FOLDER,)) if checkpoint is not None else {}
            if saved.get("world_size", self.runtime.world_size) != self.runtime.world_size:
                raise ConfigError(f"--resume: the checkpoint {checkpoint} was written by {saved['world_size']} ranks, "
                                  f"this run has {self.runtime.world_size}: it continues exactly only with as many "
                                  "(its batches' rows, the per-rank optimizer and snapshot files)")
            if saved and (changed := check_resumable(saved["config"], config)) and self.is_main:
                LOG.warning("--resume: continuing with %s changed", ", ".join(changed))
        self.tasks = curriculum_tasks(config)
        self.targets = list(config.data.tasks)
        self.compat = config.reference_compat
        self.state: dict[str, Any] = {
            "version": STATE_VERSION, "config": config.to_dict(), "completed": [], "stage": None, "step": 0,
            "global_step": 0, "results": {}, "curves": {"quiz": [], "reward": [], "actions": []}, "timings": {},
            "dropout_off": False, "stage_state": {}, "meta": {}, "world_size": self.runtime.world_size}
        self._pending: tuple[dict, dict, Path] | None = None  # (tensors, state, folder) of a mid-stage checkpoint
        #: model name -> (its file in the newest checkpoint, its state skeleton) while the model is frozen (no
        #: parameter requires grad: nothing in the pipeline changes a frozen model's weights), so later checkpoints
        #: link that file instead of gathering and writing the same weights again
        self._frozen_files: dict[str, tuple[Path, Any]] = {}
        self._trained_in_stage: list[nn.Module] = []  # released by end_stage (their optimizer state is freed)
        self._clock = time.perf_counter()
        seed_everything(config.seed)

        started = time.perf_counter()
        self.splits = self._load_data()
        #: task -> split -> SHA-256 of its rows (:meth:`EncodedSplit.fingerprint`): the data a checkpoint's run read
        self.data_fingerprint = {task: {name: split.fingerprint() for name, split in splits.items()}
                                 for task, splits in self.splits.items()}
        if changed := [f"{task} {name}" for task, digests in (saved.get("data_fingerprint") or {}).items()
                       for name, digest in digests.items()
                       if self.data_fingerprint.get(task, {}).get(name, digest) != digest]:
            raise ConfigError(f"--resume: the data differs from what the run read ({', '.join(changed)}: other files, "
                              "or another tokenizer): a run continues only on the same rows; resume with that data, "
                              "or start a new run")
        if check_data is not None:
            check_data(self)
        self.state["timings"]["data"] = time.perf_counter() - started
        started = time.perf_counter()
        self.teacher, self.student = self._build_models()
        self.state["timings"]["models"] = time.perf_counter() - started
        self.meta_teachers: nn.ModuleDict | None = None
        self.cache: TeacherCache | None = None
        self.resumed = False
        #: the timings of the checkpoint resumed from: what the run's earlier processes measured up to it (each
        #: timing in ``state["timings"]`` adds this process's own to it)
        self.earlier_timings: dict[str, float] = {}
        if checkpoint is not None or resume:
            self.load(checkpoint)
        # the data this run read (resolved folder, None: the hub), so that `evaluate` reads the same or refuses
        self.state["data_dir"], self.state["data_source"] = self.data_dir, dict(self.data_source)
        self.state["data_fingerprint"] = self.data_fingerprint
        self._metrics: MetricsLogger | None = None

    # ------------------------------------------------------------------------------------------- setup

    def _newest_checkpoint(self) -> Path | None:
        """The checkpoint ``--resume`` continues from: rank 0's newest, the same on every rank (a rank that looked
        on its own could see another list, e.g. through a network filesystem's attribute cache)."""
        found = checkpoints_by_step(self.output_dir)
        step = self.runtime.from_main(max(found, default=-1))
        if step >= 0 and step not in found:
            raise RuntimeError(f"rank {self.runtime.rank} does not see the checkpoint of step {step} that rank 0 "
                               f"resumes from in {self.output_dir}: output_dir must be on a filesystem every rank "
                               "shares")
        return found.get(step)

    def _claim_output_dir(self, overwrite: bool) -> None:
        """Refuse (or with ``overwrite`` delete, on rank 0) an earlier run's outputs in ``output_dir``.  Rank 0's look
        decides for every rank: another rank could look after rank 0 deleted them, and skip the barrier."""
        earlier = [self.output_dir / name for name in RUN_OUTPUTS if (self.output_dir / name).exists()]
        if not self.runtime.from_main(int(bool(earlier))):
            return
        if not overwrite:
            raise ConfigError(f"output_dir {self.output_dir} holds an earlier run "
                              f"({', '.join(path.name for path in earlier)}): pass --resume to continue it, "
                              "--overwrite to replace it, or choose another output_dir")
        if self.is_main:
            LOG.warning("--overwrite: deleting the earlier run's %s in %s", ", ".join(p.name for p in earlier),
                        self.output_dir)
            for path in earlier:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.runtime.barrier()

    def _check_output_dir_writable(self) -> None:
        """``output_dir`` is a folder rank 0 can write in (made if missing), checked before the data and models load:
        a path under a file, a read-only filesystem or a folder without write permission was a traceback when the run
        first wrote (its metrics, after loading the models).  Rank 0's answer decides for every rank."""
        reason = None
        if self.is_main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=self.output_dir):
                    pass
            except OSError as error:
                reason = "a file, not a folder" if self.output_dir.is_file() else error.strerror or str(error)
        if self.runtime.from_main(int(reason is not None)):
            raise ConfigError(f"output_dir {self.output_dir}: cannot write there ({reason or 'on rank 0'}); choose "
                              "another output_dir (--output-dir)")
        if self.runtime.world_size > 1:
            self._check_output_dir_shared()

    def _check_output_dir_shared(self) -> None:
        """Every rank sees the ``output_dir`` rank 0 writes in: each rank writes its optimizer partitions and
        snapshot shards there (moved into rank 0's checkpoints) and reads the disk teacher cache and ``--resume``'s
        checkpoint from it, so on several nodes it must be on a filesystem they share.  On a folder of each node's
        own, a run went through with checkpoints that lacked the other nodes' partitions (found at ``--resume``).
        Rank 0 writes a file of a random name there; the ranks that do not see it are named, on every rank."""
        token = self.runtime.from_main(secrets.randbelow(2 ** 62) if self.is_main else 0)  # (not the seeded RNGs)
        marker = self.output_dir / f".shared-check-{token}"
        if self.is_main:
            marker.touch()
        self.runtime.barrier()
        rank, ranks = self.runtime.rank, range(self.runtime.world_size)
        unseen = self.runtime.average({str(r): float(r == rank and not marker.is_file()) for r in ranks})
        if self.is_main:  # (every rank looked: the average waited for all of them)
            marker.unlink(missing_ok=True)
        blind = sorted(int(r) for r, share in unseen.items() if share > 0)
        if blind:
            several = len(blind) > 1
            raise ConfigError(f"output_dir {self.output_dir}: rank{'s' if several else ''} "
                              f"{', '.join(map(str, blind))} {'do' if several else 'does'} not see the file rank 0 "
                              "wrote there; on several nodes output_dir must be on a filesystem every node shares "
                              "(each rank writes its optimizer partitions into the checkpoints there, and reads "
                              "--resume's checkpoint and the disk teacher cache from it)")

    def _load_data(self) -> dict[str, dict[str, EncodedSplit]]:
        c = self.config
        own_student = c.student.model is not None
        self.tokenizer = load_tokenizer(c.student.model if own_student and c.method == "finetune"
                                        else self.teacher_path)
        if own_student and c.method != "finetune" and \
                not same_tokenization(load_tokenizer(c.student.model), self.tokenizer):
            raise ValueError(f"student.model {c.student.model!r} must share the teacher's tokenizer (both models "
                             "read the same token ids: the same vocabulary, case and accent handling); distil "
                             "between models of one tokenizer family")
        splits: dict[str, dict[str, EncodedSplit]] = {}
        self.data_source: dict[str, str] = {}
        self.data_dir = str(directory) if (directory := resolve_data_dir(c.data.data_dir)) is not None else None
        for task in self.tasks:
            loaded = load_task_splits(task, c.data.data_dir, seed=c.seed, quiz_fraction=c.data.quiz_fraction,
                                      max_train=c.data.max_train, max_eval=c.data.max_eval)
            splits[task] = {name: encode_examples(getattr(loaded, name), self.tokenizer, c.data.max_length)
                            for name in ("train", "quiz", "validation")}
            self.data_source[task] = loaded.source
            for name in ("train", "quiz"):  # their streams give every rank a share of each batch
                if len(splits[task][name]) < self.runtime.world_size:
                    raise ConfigError(f"task {task!r}: its {name} split has {len(splits[task][name])} rows, fewer "
                                      f"than the {self.runtime.world_size} ranks (each steps on a share of every "
                                      "batch); raise data.max_train / data.max_eval or quiz_fraction, or use fewer "
                                      "ranks")
            LOG.info("data %s: %d train / %d quiz / %d validation (%s)", task, len(splits[task]["train"]),
                     len(splits[task]["quiz"]), len(splits[task]["validation"]), loaded.source)
        return splits

    @property
    def teacher_path(self) -> str:
        return resolve_model_path(self.config.teacher.model)

    def _build_models(self) -> tuple[TaskModel | None, TaskModel]:
        c = self.config
        needs_teacher = c.method != "finetune"
        teacher = None
        if needs_teacher:
            teacher = self.runtime.build_model(
                lambda: TaskModel(load_backbone(self.teacher_path, attn_implementation=c.teacher.attn_implementation),
                                  self.tasks, c.teacher.pooling), role="teacher", trainable=True)

        def build_student() -> TaskModel:
            if c.student.model is not None:
                backbone = load_backbone(c.student.model, attn_implementation=c.student.attn_implementation)
            elif teacher is not None and not is_partitioned(teacher) and (
                    c.student.pooling != "pooler" or getattr(teacher.backbone, "pooler", None) is not None):
                backbone = truncated_copy(teacher.backbone, c.student.num_layers,
                                          attn_implementation=c.student.attn_implementation)
            else:  # no teacher, a ZeRO-3 teacher whose parameters are partitioned, or a student that pools with the
                # pooler the teacher dropped (it pools otherwise): load the layers afresh
                with torch.random.fork_rng(devices=[]) if teacher is not None else nullcontext():
                    backbone = truncated_copy(load_backbone(self.teacher_path,
                                                            attn_implementation=c.student.attn_implementation),
                                              c.student.num_layers)
            return TaskModel(backbone, self.tasks, c.student.pooling)

        student = self.runtime.build_model(build_student, role="student", trainable=True)
        return teacher, student

    @property
    def metrics(self) -> MetricsLogger:
        """metrics.jsonl (+ TensorBoard) under ``output_dir``, opened on first use."""
        if self._metrics is None:
            # On resume keep only the records logged up to the checkpoint: the steps redone after it log again.
            self._metrics = MetricsLogger(self.output_dir, is_main=self.is_main,
                                          tensorboard=self.config.runtime.tensorboard,
                                          keep_records=self.state.get("metrics_records") if self.resumed else None)
        return self._metrics

    @metrics.setter
    def metrics(self, logger: MetricsLogger) -> None:
        self._metrics = logger

    # ------------------------------------------------------------------------------------------- checkpoints

    def _models(self) -> dict[str, nn.Module]:
        models = {"student": self.student}
        if self.teacher is not None:
            models["teacher"] = self.teacher
        if self.meta_teachers is not None:
            models["meta_teachers"] = self.meta_teachers
        return models

    def save(self, stateful: dict[str, Any] | None = None) -> None:
        """Checkpoint everything at the current step boundary (main process writes; all wait).

        Objects with ``save_sharded`` (a DeepSpeed engine's partitioned optimizer) are written by every rank into a
        staging folder first, which the main process moves into the checkpoint under ``shards/`` before the
        checkpoint's atomic rename.  A frozen model (the teacher after its stage) is written once and hard-linked
        into later checkpoints."""
        self._account_time()
        self.state["timings"].update(self._cache_timings())
        stateful = stateful or {}
        sharded = {name: obj for name, obj in stateful.items() if hasattr(obj, "save_sharded")}
        staging = self.output_dir / SHARD_STAGING
        if sharded:
            if self.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            self.runtime.barrier()
            for name, obj in sharded.items():
                obj.save_sharded(staging / name)
            self.runtime.barrier()
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        meta: dict[str, Any] = {}
        linked: dict[str, Path] = {}
        target = checkpoint_dir(self.output_dir, self.state["global_step"])
        for name, model in self._models().items():
            frozen = not any(param.requires_grad for param in model.parameters())
            earlier = self._frozen_files.get(name) if frozen else None
            # rank 0 decides (it writes the files), so every rank takes the same branch around the gather
            if earlier is not None and self.runtime.from_main(int(self.is_main and earlier[0].is_file())):
                linked[name], meta[name] = earlier  # unchanged since that file was written: link it
            else:
                # every rank reads (a ZeRO-3 model's weights are gathered a chunk at a time), rank 0 keeps copies
                weights = {k: v.to("cpu", copy=True) for k, v in self.runtime.read_weights(model) if self.is_main}
                if self.is_main:
                    tensors[name], meta[name] = flatten_state_dict(weights, copy=False)
            if frozen:
                self._frozen_files[name] = (target / f"{name}.safetensors", meta.get(name))
            else:
                self._frozen_files.pop(name, None)
        if self.is_main:
            for name, obj in stateful.items():
                if name not in sharded:
                    tensors[name], meta[name] = flatten_state_dict(obj.state_dict())
            self.state["meta"] = meta
            self.state["modes"] = {name: training_modes(model) for name, model in self._models().items()}
            self.state["rng"] = capture_rng_state(self.runtime.device)
            self.state["metrics_records"] = self.metrics.records_written
            save_checkpoint(target, tensors, self.state, folders={SHARDS_FOLDER: staging} if sharded else None,
                            linked=linked)
            prune_checkpoints(self.output_dir, self.config.runtime.keep_checkpoints)
        self.runtime.barrier()

    def load(self, path: Path | None) -> None:
        """Restore the run from checkpoint ``path`` (None: nothing to resume, start from the beginning)."""
        if path is None:
            if self.is_main:  # (every rank finds none: rank 0 says so)
                LOG.warning("--resume: no checkpoint in %s, starting from the beginning", self.output_dir)
            # a run killed before its first checkpoint logged steps that this run redoes: keep none of its records
            self.resumed, self.state["metrics_records"] = True, 0
            return
        tensors, state = load_checkpoint(path, skip=(SHARDS_FOLDER,))  # each rank reads its own shards
        self.resumed = True
        if "meta_teachers" in tensors:
            self.build_meta_teachers()
        for name, model in self._models().items():
            weights = unflatten_state_dict(tensors[name], state["meta"][name])
            if not is_partitioned(model):
                take_floating_dtype(model, weights)
            self.runtime.write_weights(model, weights)
            if name in state.get("modes", {}):
                set_training_modes(model, state["modes"][name])
        timings = self.state["timings"]  # this process's loading of the data and models
        self.state = state
        self.earlier_timings = dict(state["timings"])
        for phase, seconds in timings.items():
            state["timings"][phase] = state["timings"].get(phase, 0.0) + seconds
        if self.teacher is not None and "teacher" in self.state["completed"]:
            self.teacher.eval().requires_grad_(False)
        if state["stage"] is None:
            restore_rng_state(state["rng"], self.runtime.device)
        else:
            self._pending = (tensors, state, path)
        LOG.info("loaded checkpoint %s (stage %s, step %d)", path, state["stage"] or "-", state["step"])

    def restore_stage(self, stateful: dict[str, Any]) -> None:
        """Load the current stage's objects from the checkpoint being resumed (if any), then its RNG state."""
        if self._pending is None:
            return
        tensors, state, path = self._pending
        self._pending = None
        for name, obj in stateful.items():
            sharded = path / SHARDS_FOLDER / name
            # (a checkpoint written before an object was sharded holds it whole, with the other tensors)
            if hasattr(obj, "load_sharded") and (sharded.exists() or name not in tensors):
                obj.load_sharded(sharded)
            else:
                obj.load_state_dict(unflatten_state_dict(tensors[name], state["meta"][name]))
        restore_rng_state(state["rng"], self.runtime.device)

    # ------------------------------------------------------------------------------------------- loop

    def train_mode(self, module: nn.Module) -> None:
        """``module.train()`` -- except after the first evaluation under ``reference_compat`` (the released code
        never switches dropout back on)."""
        if not (self.compat and self.state["dropout_off"]):
            module.train()

    def trainer(self, module: nn.Module, optim: OptimConfig, total_steps: int, role: str,
                lr: float | None = None) -> TrainedModel:
        spec = OptimizerSpec(lr=lr if lr is not None else optim.lr, total_steps=total_steps,
                             weight_decay=optim.weight_decay, warmup_ratio=optim.warmup_ratio,
                             max_grad_norm=optim.max_grad_norm)
        self._trained_in_stage.append(module)
        return self.runtime.train(module, spec, role=role)

    def begin_stage(self, stage: str) -> bool:
        """True when ``stage`` still has to run (False: finished before a resume)."""
        if stage in self.state["completed"]:
            return False
        if self.state["stage"] != stage:
            self.state["stage"], self.state["step"] = stage, 0
        self._clock = time.perf_counter()
        return True

    def end_stage(self, stage: str) -> None:
        """Mark ``stage`` done: the runtime frees what it held to train the stage's models (a DeepSpeed teacher's
        engine would otherwise keep its optimizer state through every later stage), then a checkpoint."""
        for module in self._trained_in_stage:
            self.runtime.release(module)
        self._trained_in_stage.clear()
        gc.collect()  # DeepSpeed's engines and ZeRO optimizers hold references to themselves (cycles)
        self._account_time()
        self.state["completed"].append(stage)
        self.state["stage"], self.state["step"], self.state["stage_state"] = None, 0, {}
        self.save()

    def _account_time(self) -> None:
        """Add the seconds since the last call to the current stage's timing (kept across resumes)."""
        now = time.perf_counter()
        if self.state["stage"] is not None:
            timings = self.state["timings"]
            timings[self.state["stage"]] = timings.get(self.state["stage"], 0.0) + now - self._clock
        self._clock = now

    def _cache_timings(self) -> dict[str, float]:
        """What the teacher cache cost and saved over the run's processes: the earlier ones' (up to the checkpoint
        resumed from; none in a checkpoint that predates this count) and this one's so far (nothing while this
        process has no cache: the checkpoint's counts stand)."""
        if self.cache is None:
            return {}
        earlier = self.earlier_timings
        return {"teacher_cache_spent": earlier.get("teacher_cache_spent", 0.0) + self.cache.seconds_spent,
                "teacher_cache_saved": earlier.get("teacher_cache_saved", 0.0) + self.cache.seconds_saved}

    def loop(self, stage: str, total_steps: int, step_fn: Callable[[int], dict[str, float]],
             stateful: dict[str, Any], *, can_checkpoint: Callable[[int], bool] = lambda step: True) -> None:
        """Run ``step_fn(step)`` for the stage's remaining steps, with a progress bar, logging and checkpoints.  At
        each step that logs or checkpoints, the metrics averaged over the ranks (so that every rank decides alike)
        must hold finite losses (``loss``, ``*_loss``), or the run stops with a :class:`TrainingDivergedError`
        before that checkpoint is written (the NaN step's metrics are logged).  A step that raises
        ``FloatingPointError`` (the bi-level engine's non-finite loss or hypergradient, a DeepSpeed engine's
        non-finite gradient: each decided alike on every rank) stops the run the same way, at that step."""
        start = self.state["step"]
        runtime_config = self.config.runtime
        position = len(self.state["completed"]) + 1
        bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0,
                   desc=f"[{position}] {stage}", disable=not (self.is_main and runtime_config.progress))
        try:
            for step in range(start, total_steps):
                try:
                    metrics = step_fn(step)
                except FloatingPointError as error:
                    raise diverged(stage, step + 1, "loss or gradient", str(error)) from error
                self.state["step"] = step + 1
                self.state["global_step"] += 1
                bar.update(1)
                if "loss" in metrics:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                logs = (step + 1) % runtime_config.log_every == 0 or step + 1 == total_steps or "quiz" in metrics
                saves = (step + 1) % runtime_config.checkpoint_every == 0 and step + 1 < total_steps \
                    and can_checkpoint(step + 1)
                if not (logs or saves):
                    continue
                averaged = self.runtime.average(metrics)
                if logs:
                    self.metrics.log(stage, self.state["global_step"], averaged)
                check_finite_losses(stage, step + 1, averaged)
                if saves:
                    self.save(stateful)
        finally:
            bar.close()

    def supervised_stage(self, stage: str, selected: nn.Module, trainable: nn.Module, optim: OptimConfig,
                         step_fn: Callable[[TrainedModel, str, Batch, dict[str, Any]], dict[str, float]], *,
                         companions: Callable[[int], dict[str, Any]] | None = None, lr: float | None = None) -> None:
        """Epochs over every task's train split (tasks interleaved), model selection on quiz at each epoch end.

        ``step_fn(trained, task, batch, companions)`` takes one step; ``companions(total_steps)`` builds further
        checkpointed objects the step needs (another model's optimizer), handed to every step.
        """
        c = self.config
        schedule = MultiTaskSchedule({t: self.splits[t]["train"] for t in self.tasks}, c.data.batch_size,
                                     seed=c.seed, salt=sum(map(ord, stage)), row_multiple=self.runtime.world_size)
        per_epoch = schedule.batches_per_epoch
        total = per_epoch * optim.epochs
        if optim.max_steps is not None:
            total = min(total, optim.max_steps)
        trained = self.trainer(trainable, optim, total, role=stage, lr=lr)
        extra = companions(total) if companions is not None else {}
        best = BestSnapshot.for_model(self.runtime, selected)
        stateful = {"trained": trained, "best": best, **extra}
        self.restore_stage(stateful)
        self.train_mode(trainable)
        batches: Iterator[tuple[str, Batch]] | None = None

        def step(i: int) -> dict[str, float]:
            nonlocal batches
            epoch, position = divmod(i, per_epoch)
            if batches is None or position == 0:
                batches = schedule.batches(epoch, position)
            task, batch = next(batches)
            # trimmed before the split, so every rank's slice has the same shape
            batch = self.runtime.to_device(self.runtime.local_rows(trim_padding(batch)))
            metrics = step_fn(trained, task, batch, extra)
            if (i + 1) % per_epoch == 0 or i + 1 == total:
                metrics["quiz"] = self.select(selected, best, self.tasks)
                self.train_mode(trainable)
            return metrics

        self.loop(stage, total, step, stateful)
        best.restore_into(selected)

    # ------------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def predict_with(self, logits: Callable[[Batch], torch.Tensor], task: str, split: str) -> torch.Tensor:
        """Predicted labels, the argmax of ``logits(batch)``, on ``split`` of ``task``: data parallel, each rank
        predicts its share of the rows (its batches' ``example_index`` still names rows of the whole split, as the
        teacher cache needs) and the ranks gather them.  A row whose logits hold a NaN has no prediction (argmax
        would call it the NaN's class): any such row stops the run with a :class:`TrainingDivergedError`, on every
        rank alike (decided on the gathered predictions)."""
        data = self.splits[task][split]
        rows = self.runtime.rank_rows(len(data))
        predictions = []
        for batch in iterate_batches(data.select(rows), self.config.data.eval_batch_size, shuffle=False, seed=0):
            batch["example_index"] = rows[batch["example_index"]]
            batch_logits = logits(self.runtime.to_device(trim_padding(batch)))
            predictions.append(torch.where(batch_logits.isnan().any(-1), NO_PREDICTION, batch_logits.argmax(-1)).cpu())
        predictions = self.runtime.gather_rows(torch.cat(predictions), len(data))
        if (missing := int((predictions == NO_PREDICTION).sum())):
            raise TrainingDivergedError(
                f"the model's logits are NaN on {missing} of {len(data)} rows of {task}'s {split} split: its weights "
                "hold NaN (it diverged) or its forward pass overflows (fp16/bf16); its scores would be meaningless")
        return predictions

    def predict(self, model: TaskModel, task: str, split: str) -> torch.Tensor:
        """Predicted labels of ``model`` on ``split`` of ``task`` (eval mode)."""
        model.eval()
        predictions = self.predict_with(lambda batch: model(**model_inputs(batch), task=task).logits, task, split)
        if self.compat:
            self.state["dropout_off"] = True
        return predictions

    def evaluate(self, model: TaskModel, task: str, split: str) -> dict[str, float]:
        return compute_metrics(task, self.predict(model, task, split), self.splits[task][split].labels)

    @property
    def selection_split(self) -> str:
        """quiz; the released code selects on the reported validation split (``reference_compat``)."""
        return "validation" if self.compat else "quiz"

    def select(self, model: TaskModel, best: BestSnapshot, tasks: list[str]) -> float:
        """Score ``model`` on the selection split (mean main metric over ``tasks``); keep it when it is the best."""
        scores = {task: self.evaluate(model, task, self.selection_split)["main"] for task in tasks}
        for task, value in scores.items():
            self.state["curves"]["quiz"].append([self.state["global_step"] + 1, task, value])
        score = sum(scores.values()) / len(scores)
        best.offer(score, self.state["global_step"] + 1, model)
        return score

    def record(self, role: str, model: TaskModel) -> None:
        """Validation metrics of ``model`` under ``role`` ("teacher", "student_stage2", ...) in the report, for the
        reported tasks (``data.tasks``; curriculum actions outside them are trained, not reported)."""
        for task in self.targets:
            self.state["results"].setdefault(task, {})[role] = self.evaluate(model, task, "validation")

    # ------------------------------------------------------------------------------------------- teacher outputs

    def teacher_cache(self) -> TeacherCache:
        """The frozen teacher's outputs, computed once per (task, split)."""
        if self.cache is None:
            directory = self.output_dir / "teacher_cache" if self.config.runtime.teacher_cache == "disk" else None
            self.teacher.eval().requires_grad_(False)
            self.cache = TeacherCache(self.teacher, directory, batch_size=self.config.data.eval_batch_size,
                                      sharding=self.runtime)
        return self.cache

    @contextmanager
    def frozen_teacher_outputs(self) -> Iterator[Callable[[str, str, Batch, bool], Any]]:
        """``outputs(task, split, batch, layer_states)``: cached when possible (``runtime.teacher_cache``), live
        when the layer states (patient KD's) are needed or the cache is off."""
        use_cache = self.config.runtime.teacher_cache != "off"

        def outputs(task: str, split: str, batch: Batch, layer_states: bool = False):
            if use_cache and not layer_states:
                return self.teacher_cache().outputs(self.splits[task][split], split).gather(
                    batch["example_index"], self.runtime.device)
            with torch.no_grad():
                return self.teacher(**model_inputs(batch), task=task, output_layer_states=layer_states)

        yield outputs
        if self.cache is not None:
            LOG.info(self.cache.summary())

    def build_meta_teachers(self) -> nn.ModuleDict:
        """MPDistil's per-task meta-teachers (built once; their weights are checkpointed with the models)."""
        from mpdistil_fast.methods.mpdistil import build_meta_teachers

        if self.meta_teachers is None:
            self.meta_teachers = build_meta_teachers(self.config, self.tasks, self.teacher.pooled_size,
                                                     self.student.pooled_size).to(self.runtime.device)
        return self.meta_teachers

    # ------------------------------------------------------------------------------------------- driver

    def run(self) -> dict[str, Any]:
        """Every stage of the method (skipping finished ones), the final evaluation and the report.  The metrics
        logger is closed at the end, also when the run raises (flushing the events TensorBoard's writer thread
        has not written yet), and then without hiding the run's error."""
        from mpdistil_fast.pipeline.stages import STAGE_FUNCTIONS, stages_of

        stages = stages_of(self.config)
        LOG.info("method %s: stages %s; tasks %s (reported: %s)", self.config.method, " -> ".join(stages),
                 ", ".join(self.tasks), ", ".join(self.targets))
        try:
            for stage in stages:
                if self.begin_stage(stage):
                    STAGE_FUNCTIONS[stage](self)
                    self.end_stage(stage)
            started = time.perf_counter()
            self.record("student_final", self.student)
            self.state["timings"]["final_evaluation"] = time.perf_counter() - started
            report = self.report()
            if self.is_main:
                write_report(self.output_dir, report)
        except BaseException:
            if self._metrics is not None:  # (opened on first use: not opened now just to be closed)
                self._metrics.close(failed=True)
            raise
        self.metrics.close()
        return report

    def report(self) -> dict[str, Any]:
        """The report (:mod:`.report`'s layout); after a resume each timing sums every process of the run, and
        ``timings_earlier_processes`` says how much of it the earlier ones measured."""
        def rounded(timings: dict[str, float]) -> dict[str, float]:
            """To the millisecond: the phases in run order, then the teacher cache's counts (part of the stages')."""
            ordered = sorted(timings.items(), key=lambda item: item[0].startswith("teacher_cache_"))
            return {k: round(v, 3) for k, v in ordered if v}

        return {"tasks": copy.deepcopy(self.state["results"]),
                "timings": rounded({**self.state["timings"], **self._cache_timings()}),
                "timings_earlier_processes": rounded(self.earlier_timings),
                "curves": copy.deepcopy(self.state["curves"]), "config": self.config.to_dict(),
                "data_source": dict(self.data_source), "environment": self.environment()}

    def environment(self) -> dict[str, Any]:
        """What the run ran on: torch, the machine, the processes, and the fused kernels ``"auto"`` chose."""
        from mpdistil_fast.backends import auto_backends, machine_name

        device = self.runtime.device
        return {"torch": torch.__version__, "machine": machine_name(device), "device": str(device),
                "runtime": self.config.runtime.kind, "world_size": self.runtime.world_size,
                "fused_kernels": auto_backends(device)}
