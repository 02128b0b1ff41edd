"""Data-parallel training over DeepSpeed engines (``runtime.kind: deepspeed``), launched by ``torchrun`` or the
``deepspeed`` launcher.

Each model gets the ZeRO stage of its JSON (Rajbhandari et al., "ZeRO", SC 2020): stages 0-2 keep the whole model on
every rank (optimizer states, and from stage 2 gradients, are partitioned); stage 3, for the teacher, also
partitions the parameters: the teacher is built inside ``transformers``' ``HfDeepSpeedConfig`` (``from_pretrained``
loads straight into partitions), an inference engine installs the hooks that gather each layer's parameters for its
forward, and the training engine of the teacher's fine-tuning replaces it. Reading or writing a ZeRO-3 model's
weights (checkpoints, the best-so-far snapshot) goes through :meth:`DeepSpeedRuntime.read_weights` and
:meth:`DeepSpeedRuntime.write_weights`, which gather its parameters a chunk at a time. The training loop is
the one :class:`~mpdistil_fast.distributed.LocalRuntime` drives: every rank walks the same deterministic batch
stream and takes its contiguous slice of each global batch (:meth:`DeepSpeedRuntime.local_rows`), so with
``data.batch_size`` divisible by the world size (the pipeline refuses other sizes) an optimizer step sees the same
rows, and averages the same gradient, as a one-process run of that batch size (Li et al., "PyTorch Distributed",
VLDB 2020) -- except that each epoch of a training stream leaves out its last ``len % world_size`` shuffled rows
(as ``DistributedSampler(drop_last=True)``), so that its last, smaller batch divides too and no row is repeated to
fill a rank's share (it would count twice in that step's mean). Evaluation passes
(predictions, the in-memory teacher-output cache) are shared out: each rank computes its share of the rows and the
ranks all-gather them (:meth:`DeepSpeedRuntime.rank_rows`, :meth:`DeepSpeedRuntime.gather_rows`); rank 0 alone logs,
reports and writes checkpoints, except each engine's partitioned optimizer state, which every rank writes with
DeepSpeed's own ``save_checkpoint`` (a shared filesystem is assumed on several nodes).

The YAML stays the source of truth for the optimisation: the AdamW, its linear schedule and ``max_grad_norm`` come
from the config (a DeepSpeed JSON must not name an ``optimizer`` or ``scheduler``); the JSON gives the ZeRO stage,
precision (``bf16``/``fp16``) and communication settings.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from mpdistil_fast.bilevel.inner_update import OptimizerState, TorchOptimizerState
from mpdistil_fast.distributed.runtime import (OptimizerSpec, RanksFailedToStartError, TrainedModel,
                                               batch_to_device, build_optimizer, cpu_copy, is_partitioned,
                                               linear_schedule, place_model, resolve_device)
from mpdistil_fast.distributed.unused_groups import UnusedGroupGuard

#: Roles whose engines read the teacher's DeepSpeed JSON; every other role (the student's stages) reads the student's.
TEACHER_ROLES = ("teacher",)
#: Keys of a DeepSpeed JSON that the YAML owns; the runtime refuses a JSON that sets them.
YAML_OWNED_KEYS = ("optimizer", "scheduler")


def load_deepspeed_config(source: str | dict[str, Any], *, name: str) -> dict[str, Any]:
    """A DeepSpeed config from a JSON file path (or a dict), checked for what this runtime supports."""
    if isinstance(source, dict):
        config = copy.deepcopy(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"runtime.deepspeed_{name} names {str(path)!r}, which is not a file")
        config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"runtime.deepspeed_{name} must hold a JSON object, got {type(config).__name__}")
    owned = [key for key in YAML_OWNED_KEYS if key in config]
    if owned:
        raise ValueError(f"runtime.deepspeed_{name} sets {owned}: the optimizer and its schedule come from the YAML "
                         "(teacher_training / student_training); remove them from the JSON")
    stage = zero_stage(config)
    if stage not in ((0, 1, 2, 3) if name == "teacher" else (0, 1, 2)):
        raise ValueError(f"runtime.deepspeed_{name} asks for ZeRO stage {stage}; the {name} runs stages "
                         + ("0-3" if name == "teacher" else "0-2 (the student is built as a truncated copy of whole "
                            "teacher layers; ZeRO-3 is for the teacher)"))
    if (config.get("checkpoint") or {}).get("use_node_local_storage", False):
        # (DeepSpeed then lets the first rank of every node write the engine's module file, the same file of the
        # shared output_dir on every node, at once)
        raise ValueError(f"runtime.deepspeed_{name} sets checkpoint.use_node_local_storage: checkpoints go into "
                         "output_dir, which every node must share (global rank 0 writes each checkpoint's files); "
                         "remove it")
    if int(config.get("gradient_accumulation_steps", 1)) != 1:
        raise ValueError(f"runtime.deepspeed_{name} sets gradient_accumulation_steps="
                         f"{config['gradient_accumulation_steps']}; every loop step is one optimizer step here, "
                         "so it must be 1 (raise data.batch_size instead)")
    return config


def free_port() -> int:
    """A TCP port free on this host now (for a one-rank process group started without a launcher)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def engine_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype a DeepSpeed engine keeps the model's parameters in (``bf16`` / ``fp16`` sections, else fp32)."""
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if config.get(key, {}).get("enabled", False):
            return dtype
    return torch.float32


def retire(engine: Any) -> None:
    """Remove ``engine``'s hooks from its module and what its module's parameters hold of its optimizer, so that the
    optimizer state is freed with the engine (DeepSpeed's ``destroy`` releases the ZeRO gradient and parameter
    hooks; the engine's own forward hooks, and the ZeRO-3 optimizer that every parameter names for DeepSpeed's
    ``safe_get_full_*`` helpers, are removed here)."""
    engine.destroy()
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        hook = getattr(engine, name, None)
        if hook is not None:
            hook.remove()
            setattr(engine, name, None)
    for param in engine.module.parameters():
        param.__dict__.pop("_z3_optimizer", None)


def clear_zero3_gradients(params: list[nn.Parameter]) -> None:
    """Zero the local gradient partitions of ZeRO-3 parameters (which keep their last gradient through a step whose
    backward pass did not reach them; every rank skips the same parameters, since a ZeRO-3 backward is collective)."""
    from deepspeed.utils import safe_set_local_grad

    for param in params:
        safe_set_local_grad(param, torch.zeros(param.ds_tensor.numel(), dtype=torch.float32,
                                               device=param.ds_tensor.device))


class MasterCopyOptimizerState:
    """:class:`~mpdistil_fast.bilevel.inner_update.OptimizerState` of DeepSpeed's ZeRO-0 bf16/fp16 wrapper
    (``FP16_UnfusedOptimizer``): the torch optimizer steps an fp32 master copy of each parameter, whole on every
    rank, so a parameter's state is its copy's."""

    def __init__(self, wrapper: Any, max_grad_norm: float | None = None) -> None:
        self._view = TorchOptimizerState(wrapper.optimizer, max_grad_norm)
        self.kind, self.max_grad_norm = self._view.kind, self._view.max_grad_norm
        self._copies = {id(p): copy for low, high in zip(wrapper.fp16_groups, wrapper.fp32_groups)
                        for p, copy in zip(low, high)}

    def _copy(self, parameter: torch.Tensor) -> torch.Tensor:
        copy = self._copies.get(id(parameter))
        if copy is None:
            raise ValueError("inner_optimizer does not hold every trainable student parameter")
        return copy

    def group(self, parameter: torch.Tensor) -> dict[str, Any]:
        return self._view.group(self._copy(parameter))

    def state(self, parameter: torch.Tensor) -> dict[str, Any]:
        return self._view.state(self._copy(parameter))


class ZeroOptimizerState:
    """:class:`~mpdistil_fast.bilevel.inner_update.OptimizerState` of a DeepSpeed engine's optimizer: the torch
    optimizer the YAML asked for, whose state ZeRO 1/2 (or the bf16 optimizer) partitions over the ranks as flat
    fp32 fragments.  :meth:`state` assembles parameters' states whole from those fragments (DeepSpeed's
    tensor-fragment mapping) a bucket at a time: the parameter asked for and the ones after it in the module's
    order, up to ``bucket_elements`` elements, in one all-reduce for all their state tensors (DeepSpeed's
    ``safe_get_full_optimizer_state`` takes one per tensor and key: two per student tensor for AdamW).  So every rank
    must ask for the same parameters in the same order, as the pilot step does; a bucket is held until each of its
    parameters was asked for once, another bucket is needed, or the optimizer stepped."""

    #: The per-parameter state tensors of torch's SGD / Adam / AdamW.
    STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")

    def __init__(self, engine: Any, bucket_elements: int = 1 << 25) -> None:
        self.engine, self.optimizer = engine, engine.optimizer
        groups = getattr(self.optimizer, "bit16_groups", None) or getattr(self.optimizer, "bf16_groups", None)
        flat = (getattr(self.optimizer, "single_partition_of_fp32_groups", None)
                or getattr(self.optimizer, "fp32_groups_flat_partition", None))
        if groups is None or flat is None:
            raise TypeError(f"the student's DeepSpeed optimizer ({type(self.optimizer).__name__}) keeps no "
                            "flat fp32 partitions; use MasterCopyOptimizerState for ZeRO-0 bf16/fp16")
        if bucket_elements < 1:
            raise ValueError(f"bucket_elements must be at least 1, got {bucket_elements}")
        self.kind = TorchOptimizerState(self.optimizer.optimizer).kind
        self.max_grad_norm = engine.gradient_clipping() or None  # 0: no clipping
        self._flat = flat
        self._group_index = {id(p): i for i, group in enumerate(groups) for p in group}
        # the module's order, which the pilot step reads the student's parameters in
        self._order = [p for p in engine.module.parameters() if id(p) in self._group_index]
        self._position = {id(p): i for i, p in enumerate(self._order)}
        self._bucket_elements = bucket_elements
        self._assembled: dict[int, dict[str, torch.Tensor]] = {}
        self._assembled_at: int | None = None  # the engine's step count when the bucket was assembled

    def _index(self, parameter: torch.Tensor) -> int:
        index = self._group_index.get(id(parameter))
        if index is None:
            raise ValueError("inner_optimizer does not hold every trainable student parameter")
        return index

    def group(self, parameter: torch.Tensor) -> dict[str, Any]:
        return self.optimizer.param_groups[self._index(parameter)]

    def state(self, parameter: torch.Tensor) -> dict[str, Any]:
        states = self.optimizer.optimizer.state
        flat = self._flat[self._index(parameter)]
        if flat not in states:  # before the first step the state does not exist yet (as in torch)
            return {}
        # (the engine's count, not the group's: groups left alone by a step keep theirs, see UnusedGroupGuard)
        if id(parameter) not in self._assembled or self._assembled_at != self.engine.global_steps:
            self._assemble_bucket(parameter)  # not assembled yet, or before the optimizer's last step
            self._assembled_at = self.engine.global_steps
        return {"step": states[flat]["step"], **self._assembled.pop(id(parameter))}

    def _assemble_bucket(self, first: torch.Tensor) -> None:
        """The whole state of ``first`` and the parameters after it, in one all-reduce of their fragments."""
        from deepspeed import comm
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        states = self.optimizer.optimizer.state
        keys = [key for key in self.STATE_KEYS if key in states[self._flat[self._index(first)]]]
        bucket, elements = [], 0
        for parameter in self._order[self._position[id(first)]:]:
            if bucket and elements + parameter.numel() > self._bucket_elements:
                break
            flat = self._flat[self._index(parameter)]
            # (re)link the parameter's fragment to its group's state: DeepSpeed links them once, after the first
            # group's first step (later groups stay unlinked), and a checkpoint load replaces the state's tensors
            lazy_init_hp_params_optimizer_state([parameter], flat, states)
            bucket.append(parameter)
            elements += parameter.numel()
        buffer = torch.zeros(len(keys), elements, dtype=torch.float32, device=first.device)
        offset = 0
        for parameter in bucket:  # this rank's fragment of each, zeros elsewhere: the sum over ranks is the whole
            mapping = parameter._hp_mapping
            if mapping is not None:
                address = mapping.lp_fragment_address
                for row, key in enumerate(keys):
                    buffer[row].narrow(0, offset + address.start, address.numel).copy_(mapping.get_hp_fragment(key))
            offset += parameter.numel()
        comm.all_reduce(buffer, group=first._dp_group)
        self._assembled.clear()
        offset = 0
        for parameter in bucket:
            self._assembled[id(parameter)] = {key: buffer[row].narrow(0, offset, parameter.numel()).view(parameter.shape)
                                              for row, key in enumerate(keys)}
            offset += parameter.numel()


@dataclass
class DeepSpeedTrainedModel(TrainedModel):
    """A :class:`TrainedModel` whose ``backward``/``step`` go through a DeepSpeed engine (gradient all-reduce or
    reduce-scatter, clipping, the ZeRO optimizer step, the schedule); ``guard`` leaves the parameter groups that a
    step did not use as torch's optimizer would (the engine hands them zero gradients)."""

    engine: Any = None
    guard: UnusedGroupGuard | None = None

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float | None:
        """The engine's step (clips to gradient_clipping, steps the optimizer and the schedule, zeroes the
        gradients); returns the global gradient norm before clipping when the engine computed it.

        Raises ``FloatingPointError`` when the engine skipped the step because the gradient is not finite (its
        ZeRO and bf16 optimizers check every step, and all ranks skip alike): torch's AdamW in one process would
        have made every weight NaN, and the run stops at its next logged loss, where a skipped step would go
        unnoticed and the run go on, one step and one schedule step short.  An fp16 engine's skipped steps are its
        loss scaling at work, not a divergence."""
        with self.guard.step() if self.guard is not None else nullcontext():
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if not self.engine.was_step_applied() and not self.engine.fp16_enabled():
            raise FloatingPointError(f"the gradient is not finite (norm {norm}); DeepSpeed skipped the step")
        return None if norm is None else float(norm)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def optimizer_state(self) -> OptimizerState:
        wrapper, clipping = self.engine.optimizer, self.engine.gradient_clipping() or None  # 0: no clipping
        if isinstance(wrapper, torch.optim.Optimizer) and not hasattr(wrapper, "optimizer"):
            return TorchOptimizerState(wrapper, clipping)  # ZeRO stage 0 in fp32: torch's optimizer itself
        if hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):
            return MasterCopyOptimizerState(wrapper, clipping)  # ZeRO stage 0 in bf16/fp16
        return ZeroOptimizerState(self.engine)

    def state_dict(self) -> dict[str, Any]:
        raise TypeError("a DeepSpeed engine's optimizer state is partitioned over the ranks: save it with "
                        "save_sharded(directory) on every rank")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise TypeError("a DeepSpeed engine's optimizer state is partitioned over the ranks: load it with "
                        "load_sharded(directory) on every rank")

    def save_sharded(self, directory: Path) -> None:
        """Every rank: the engine's checkpoint (each rank's optimizer partition, rank 0 the module and schedule)."""
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)

    def load_sharded(self, directory: Path) -> None:
        """Every rank: restore what :meth:`save_sharded` wrote (same world size)."""
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint has no DeepSpeed engine state at {str(directory)!r}")
        loaded, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the engine state in {str(directory)!r}")


def _local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's partition of a ZeRO-3 parameter (flat), or the tensor itself (a buffer, which is whole)."""
    return tensor.ds_tensor if hasattr(tensor, "ds_id") else tensor


def load_state_dict_pre_hooks_applied(module: nn.Module, state: Mapping[str, torch.Tensor]
                                      ) -> dict[str, torch.Tensor]:
    """A copy of ``state`` after the load_state_dict pre-hooks of ``module`` and its submodules (parents first, each
    with its own key prefix, as ``load_state_dict`` runs them) have renamed or dropped keys in it, for example
    :class:`~mpdistil_fast.models.TaskModel`'s, which drops a removed pooler's weights.  A ZeRO-3 model's weights
    are written without ``load_state_dict`` (its parameters are empty partitions), so its hooks run here."""
    state, errors = dict(state), []
    for name, submodule in module.named_modules():
        for hook in submodule._load_state_dict_pre_hooks.values():
            hook(state, f"{name}." if name else "", {}, True, [], [], errors)
    if errors:
        raise RuntimeError(f"weights for {type(module).__name__} do not load: " + "; ".join(errors))
    return state


#: Set by MPI and Slurm launchers (DeepSpeed's OpenMPI, MPICH, Intel MPI and Slurm runners start processes this
#: way) to the number of processes they started.
MPI_WORLD_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")


def _refuse_mpi_launch() -> None:
    """Without torch.distributed's variables each process of an MPI/Slurm launch would run alone as rank 0 (all of
    them writing the same output_dir): refuse it, saying how to launch."""
    started = {name: os.environ[name] for name in MPI_WORLD_VARIABLES
               if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 1}
    if started:
        raise RuntimeError(f"this process is one of several started by MPI or Slurm ({started}) but RANK / WORLD_SIZE "
                           "are not set: launch with torchrun or the deepspeed launcher's default runner, or export "
                           "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process")


def _node_device(accelerator: Any) -> torch.device:
    """This rank's device: its node's device number ``LOCAL_RANK`` (torchrun and the deepspeed launcher set it; on
    several nodes ``RANK`` counts over all of them), made the current CUDA device."""
    device = torch.device(accelerator.device_name(int(os.environ.get("LOCAL_RANK", 0))))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def agree_on_start(failed: bool, device: torch.device) -> list[int]:
    """Every rank of the process group, once it is up, before anything else: the ranks that could not start the run
    (``failed``: whether this one could not), the same list on every rank."""
    flags = torch.zeros(torch.distributed.get_world_size(), dtype=torch.int32, device=device)
    flags[torch.distributed.get_rank()] = int(failed)
    torch.distributed.all_reduce(flags)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def report_failed_start(timeout: timedelta | None = None) -> None:
    """For a rank of a launch (``WORLD_SIZE`` > 1) that failed before its :class:`DeepSpeedRuntime` came up (a config
    error, a data folder missing on its node only, a bad flag): join the process group the other ranks are starting,
    take part in their :func:`agree_on_start` as failed, and leave it.  The others then stop at once
    (:class:`RanksFailedToStartError`), where they waited for this rank until the process group's timeout: on
    several nodes no launcher stops the other nodes' ranks.  When every rank failed alike, all of them meet here and
    leave.  ``timeout``: how long to wait for the others (None: DeepSpeed's default).  Nothing to do in a process
    whose process group is up already (it is its caller's, not a launch's start)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), auto_mpi_discovery=False,
                               **({"timeout": timeout} if timeout else {}))
    try:
        agree_on_start(True, _node_device(get_accelerator()))
    finally:
        torch.distributed.destroy_process_group()


class DeepSpeedRuntime:
    """One process per device, data parallel over DeepSpeed engines (ZeRO-3 teacher, ZeRO 0-2 student).

    ``configs`` maps ``"teacher"``/``"student"`` to a DeepSpeed JSON path (or dict); ``batch_size`` is the global
    batch, split over the ranks by :meth:`local_rows`; ``collective_timeout`` how long a rank waits in a collective
    for the others before it fails (None: DeepSpeed's default, 10 minutes).  A constructor that raises once it
    started the process group (a ``device`` that is not DeepSpeed's accelerator's) ends that group before the error
    propagates.
    """

    def __init__(self, configs: dict[str, str | dict[str, Any]], *, device: str = "auto",
                 num_threads: int | None = None, batch_size: int = 1, collective_timeout: timedelta | None = None):
        try:
            import deepspeed
            from deepspeed.accelerator import get_accelerator
        except ImportError as error:
            raise ImportError("runtime.kind 'deepspeed' needs DeepSpeed: pip install 'mpdistil_fast[deepspeed]'"
                              ) from error
        missing = {"teacher", "student"} - set(configs)
        if missing:
            raise ValueError(f"DeepSpeedRuntime needs a DeepSpeed config for {sorted(missing)}")
        self.configs = {name: load_deepspeed_config(source, name=name) for name, source in configs.items()}
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        #: the launcher variables this runtime set (none under a launcher), with the values they had before (None:
        #: unset); :meth:`close` puts those back
        self._launcher_variables: dict[str, str | None] = {}
        if "WORLD_SIZE" not in os.environ:  # not started by a launcher: one rank, on a free local port
            _refuse_mpi_launch()
            # (no other process connects to a one-rank group: a MASTER_PORT left in the environment, maybe another
            # run's and in use, is not needed, nor a MASTER_ADDR naming another host)
            single = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
            self._launcher_variables = {name: os.environ.get(name) for name in single}
            os.environ.update(single)
        starts_group = not torch.distributed.is_initialized()
        try:
            deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                       auto_mpi_discovery=False,
                                       **({"timeout": collective_timeout} if collective_timeout else {}))
            self.rank = torch.distributed.get_rank()
            self.world_size = torch.distributed.get_world_size()
            accelerator = _node_device(get_accelerator())  # (LOCAL_RANK: this node's devices)
            problem: ValueError | None = None
            try:
                requested = resolve_device(device) if device != "auto" else accelerator
                if requested.type != accelerator.type:
                    raise ValueError(f"runtime.device is {device!r} but DeepSpeed's accelerator is "
                                     f"{accelerator.type!r} (set DS_ACCELERATOR=cpu to train on CPUs)")
            except ValueError as error:
                problem = error
            # every rank learns which ranks could not start: those that failed before the runtime (report_failed_start)
            # and this one; so none is left waiting for them in a collective until the timeout
            failed = agree_on_start(problem is not None, accelerator)
            if problem is not None:
                raise problem
            if failed:
                raise RanksFailedToStartError(failed)
            self.device = accelerator
        except BaseException:
            # no runtime comes back to be closed: end the process group started here, without a barrier (as
            # close(failed=True) does: the other ranks may never reach it); a group that was there before is the
            # caller's
            if starts_group and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            self._forget_launcher_variables()
            raise
        self._deepspeed = deepspeed
        self.batch_size = batch_size
        self._engines: dict[int, Any] = {}  # id(module) -> the engine that hooks its parameters now
        self._guards: dict[int, UnusedGroupGuard] = {}  # id(module) -> the guard of its training engine
        self._training_roles: dict[int, str] = {}  # id(module) -> the role its training engine was built for
        #: At most this many elements of a ZeRO-3 model's parameters are gathered at once to read or write them.
        self.gather_elements = 1 << 27

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _config_for(self, role: str) -> dict[str, Any]:
        return self.configs["teacher" if role in TEACHER_ROLES else "student"]

    def _engine_config(self, role: str, spec: OptimizerSpec | None) -> dict[str, Any]:
        """The role's JSON completed for one engine: one loop step = one optimizer step of the rank's slice."""
        config = copy.deepcopy(self._config_for(role))
        config["train_micro_batch_size_per_gpu"] = math.ceil(self.batch_size / self.world_size)
        config["gradient_accumulation_steps"] = 1
        config.pop("train_batch_size", None)
        if zero_stage(config) == 3:
            # ZeRO-3's memory-efficient linear replaces torch.nn.functional.linear for the whole process, and for
            # good: the student's layers too would then run DeepSpeed's autograd Function, which has no
            # forward-mode derivative (the forward_mode hypergradient).  Off unless the JSON asks for it.
            config["zero_optimization"].setdefault("memory_efficient_linear", False)
        if spec is not None:
            config["gradient_clipping"] = spec.max_grad_norm or 0.0
            config["zero_allow_untested_optimizer"] = True  # torch's AdamW, stepped by the ZeRO optimizer wrapper
        return config

    def build_model(self, build: Callable[[], nn.Module], *, role: str, trainable: bool) -> nn.Module:
        """``build()`` on this rank's device; under ZeRO-3, built partitioned and given an inference engine."""
        if zero_stage(self._config_for(role)) != 3:
            return place_model(build(), self.device, trainable)
        from transformers.integrations import HfDeepSpeedConfig

        zero3 = HfDeepSpeedConfig(self._engine_config(role, None))  # from_pretrained now loads into partitions
        try:
            module = build()
        finally:
            del zero3  # transformers holds it weakly: models built later (the student) are whole again
        dtype = engine_dtype(self._config_for(role))
        for param in module.parameters():  # what from_pretrained did not build (the task heads) joins its dtype
            if not hasattr(param, "ds_id"):
                param.data = param.data.to(self.device, dtype)
        if not trainable:
            module.eval().requires_grad_(False)
        self._attach_inference_engine(module, role)
        return module

    def _attach_inference_engine(self, module: nn.Module, role: str) -> None:
        """A ZeRO-3 engine without an optimizer over ``module``: its hooks gather the partitioned parameters around
        each submodule's forward (and backward), which is all a model that is not being trained needs."""
        engine, *_ = self._deepspeed.initialize(model=module, config=self._engine_config(role, None),
                                                dist_init_required=False)
        self._engines[id(module)] = engine

    def train(self, module: nn.Module, spec: OptimizerSpec, *, role: str,
              params: Iterable[nn.Parameter] | None = None) -> DeepSpeedTrainedModel:
        """A DeepSpeed engine over ``module`` with the YAML's AdamW, schedule and clipping.

        Each stage trains with a fresh optimizer (as in one process): an engine that hooks ``module`` already (a
        ZeRO-3 inference engine, or an earlier stage's) is retired first, so no parameter carries two engines'
        hooks."""
        previous = self._engines.pop(id(module), None)
        if previous is not None:
            retire(previous)
        previous_guard = self._guards.pop(id(module), None)
        if previous_guard is not None:
            previous_guard.remove()
        optimizer = build_optimizer(module, spec, params)
        guard = UnusedGroupGuard(optimizer, [list(group["params"]) for group in optimizer.param_groups],
                                 self._reduce_max if self.world_size > 1 else None,
                                 clear_zero3_gradients if zero_stage(self._config_for(role)) == 3 else None,
                                 names={id(p): name for name, p in module.named_parameters()})
        # the schedule is built by the engine on the optimizer as ZeRO regrouped it (ZeRO-3 changes its groups);
        # a step the engine's optimizer takes while it is built is undone
        with guard.untouched():
            engine, engine_optimizer, _, scheduler = self._deepspeed.initialize(
                model=module, optimizer=optimizer, lr_scheduler=lambda optimizer: linear_schedule(optimizer, spec),
                config=self._engine_config(role, spec), dist_init_required=False)
        self._engines[id(module)] = engine
        self._guards[id(module)] = guard
        self._training_roles[id(module)] = role
        return DeepSpeedTrainedModel(engine_optimizer, scheduler, spec.max_grad_norm, engine=engine, guard=guard)

    def release(self, module: nn.Module) -> None:
        """Training of ``module`` is over: its training engine is retired, and with the last reference to its
        :class:`DeepSpeedTrainedModel` gone the optimizer state is freed (fp32 master weights and AdamW moments, 12
        bytes per parameter over the ranks, which a teacher would otherwise carry through every later stage).  A
        ZeRO-3 ``module`` gets an inference engine back, so its forward still gathers its partitions.  A module
        without a training engine is left as it is."""
        guard = self._guards.pop(id(module), None)
        if guard is None:
            return
        guard.remove()
        retire(self._engines.pop(id(module)))
        role = self._training_roles.pop(id(module))
        if is_partitioned(module):
            self._attach_inference_engine(module, role)

    def close(self, *, failed: bool = False) -> None:
        """Every rank, once done: retire every engine and end the process group, so that the process exits without
        DeepSpeed's and the communication backend's objects being torn down in an arbitrary order at interpreter
        exit.  ``failed``: the run raised, maybe on this rank alone, so the other ranks may never reach a barrier
        (they wait in a collective this rank left, or run on): the same without it (retiring the engines is local,
        and ending the process group only flushes this rank's own queued operations), so the process exits and the
        launcher stops the others."""
        for guard in self._guards.values():
            guard.remove()
        for engine in self._engines.values():
            retire(engine)
        self._guards.clear()
        self._engines.clear()
        self._training_roles.clear()
        gc.collect()
        if not failed:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        self._forget_launcher_variables()

    def _forget_launcher_variables(self) -> None:
        """Put back the launcher variables this runtime set as they were (removed, or the caller's values): a later
        runtime in the same process (another run, a notebook's next cell) would take them for a launcher's and reuse
        their port, and the caller's MASTER_ADDR / MASTER_PORT are the caller's."""
        for name, value in self._launcher_variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._launcher_variables = {}

    def _reduce_max(self, tensor: torch.Tensor) -> None:
        """``tensor`` becomes its maximum over the ranks."""
        on_device = tensor.to(self.device)
        torch.distributed.all_reduce(on_device, op=torch.distributed.ReduceOp.MAX)
        tensor.copy_(on_device)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch_to_device(batch, self.device)

    def local_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's contiguous ``1/world_size`` of a global batch (the training streams make every batch
        divide: :func:`~mpdistil_fast.data.iterate_batches`' ``row_multiple``), so every rank steps on a slice of the
        same shape and no row is repeated."""
        if self.world_size == 1:
            return batch
        rows = len(batch["input_ids"])
        if rows % self.world_size:
            raise ValueError(f"a training batch of {rows} rows does not split over {self.world_size} ranks: "
                             "build its stream with row_multiple=world_size")
        share = rows // self.world_size
        return {k: v[self.rank * share:(self.rank + 1) * share] if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def average(self, metrics: dict[str, float]) -> dict[str, float]:
        """The mean of each metric over the ranks (every rank calls this with the same keys)."""
        if self.world_size == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values)
        return {k: v / self.world_size for k, v in zip(keys, values.tolist())}

    def _gathered_chunks(self, module: nn.Module, modify: bool
                         ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """A ZeRO-3 ``module``'s ``state_dict(keep_vars=True)`` entries in order, a chunk at a time: the parameters
        in a chunk (up to ``gather_elements`` elements, or one larger parameter) are whole while it is out, and with
        ``modify`` rank 0's writes to them are partitioned back after it.  Every rank walks every chunk."""
        def whole(chunk: list[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
            # (DeepSpeed gathers only the partitioned tensors among them, each once)
            with self._deepspeed.zero.GatheredParameters([t for _, t in chunk], modifier_rank=0 if modify else None):
                yield chunk

        chunk: list[tuple[str, torch.Tensor]] = []
        elements = 0
        for name, tensor in module.state_dict(keep_vars=True).items():
            size = getattr(tensor, "ds_numel", 0)  # buffers are not partitioned
            if chunk and elements + size > self.gather_elements:
                yield from whole(chunk)
                chunk, elements = [], 0
            chunk.append((name, tensor))
            elements += size
        if chunk:
            yield from whole(chunk)

    def read_weights(self, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Every rank: ``module.state_dict()``'s entries, whole (each valid until the next is yielded; copy what you
        keep).  A ZeRO-3 model's parameters are gathered ``gather_elements`` at a time, not all at once (as
        DeepSpeed gathers its 16-bit state dict a module at a time), so reading the weights of a model too large
        for one device whole still works."""
        if not is_partitioned(module):
            yield from module.state_dict().items()
            return
        for chunk in self._gathered_chunks(module, modify=False):
            for name, tensor in chunk:
                yield name, tensor.detach()

    def write_weights(self, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Every rank: ``module.load_state_dict(state)``, strict; into a ZeRO-3 model's partitions a chunk of
        parameters at a time (rank 0's ``state`` is the one partitioned back), after the module's load_state_dict
        pre-hooks have seen ``state`` as ``load_state_dict`` would show it to them."""
        if not is_partitioned(module):
            module.load_state_dict(state)
            return
        state = load_state_dict_pre_hooks_applied(module, state)
        names = set(module.state_dict(keep_vars=True))
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        if missing or unexpected:
            raise RuntimeError(f"weights for {type(module).__name__} do not match it: missing {missing}, "
                               f"unexpected {unexpected}")
        with torch.no_grad():
            for chunk in self._gathered_chunks(module, modify=True):
                for name, tensor in chunk:
                    tensor.copy_(state[name])

    def snapshot_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """A CPU copy of what this rank needs to put ``module``'s weights back later: the whole weights, or of a
        ZeRO-3 model only this rank's partition of each parameter (and the buffers), which takes no gather and
        ``1/W`` of the memory on each of the ``W`` ranks."""
        if not is_partitioned(module):
            return cpu_copy(self.read_weights(module))
        state = module.state_dict(keep_vars=True)
        return cpu_copy((name, _local_part(tensor).detach()) for name, tensor in state.items())

    def restore_snapshot(self, module: nn.Module, snapshot: Mapping[str, torch.Tensor]) -> None:
        """Every rank: put back the weights :meth:`snapshot_weights` copied on this rank."""
        if not is_partitioned(module):
            self.write_weights(module, snapshot)
            return
        state = module.state_dict(keep_vars=True)
        if set(state) != set(snapshot):
            raise RuntimeError(f"snapshot of {type(module).__name__} does not match it: missing "
                               f"{sorted(set(state) - set(snapshot))}, unexpected {sorted(set(snapshot) - set(state))}")
        with torch.no_grad():
            for name, tensor in state.items():
                _local_part(tensor).copy_(snapshot[name])
        # parameters DeepSpeed keeps gathered (the small "persistent" ones) hold a whole copy beside the partition:
        # free it and gather the restored partitions, as they were
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = [param for param in module.parameters()
                    if hasattr(param, "ds_id") and param.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(param_list=gathered)
            gathered[0].all_gather(param_list=gathered)

    def rank_rows(self, n: int) -> torch.Tensor:
        """This rank's contiguous share of ``n`` rows, padded by repeating the first rows (as
        ``torch.utils.data.DistributedSampler`` pads) so that every rank gets the same count: a ZeRO-3 model's
        forward is a collective, every rank must run the same number of batches."""
        share = math.ceil(n / self.world_size)
        return torch.arange(self.rank * share, (self.rank + 1) * share) % n

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The ``n`` rows in order from every rank's results on its :meth:`rank_rows` (an all-gather)."""
        local_on_device = local.to(self.device).contiguous()
        parts = [torch.empty_like(local_on_device) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, local_on_device)
        return torch.cat(parts)[:n].to(local.device)

    def average_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` over the ranks in place: one all-reduce per dtype of a flat fp32-or-wider copy."""
        if self.world_size == 1 or not tensors:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for dtype, group in by_dtype.items():
            flat = torch.cat([t.reshape(-1).to(self.device, torch.promote_types(dtype, torch.float32))
                              for t in group])
            torch.distributed.all_reduce(flat)
            flat.div_(self.world_size)
            offset = 0
            for tensor in group:
                tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def from_main(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a broadcast)."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(tensor, src=0)
        return int(tensor.item())

    def barrier(self) -> None:
        torch.distributed.barrier()
