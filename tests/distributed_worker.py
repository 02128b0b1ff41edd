"""Run by ``torchrun`` from tests/test_distributed.py: the DeepSpeed runtime's collectives on real ranks, the
student optimizer's state as ZeRO partitions it, assembled whole for the pilot step, task heads that a step does
not use left alone by every ZeRO stage, as torch's AdamW leaves them, a released model's optimizer freed, and
weight snapshots of a rank's own partitions."""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from mpdistil_fast.distributed import LocalRuntime
from mpdistil_fast.distributed.deepspeed_runtime import DeepSpeedRuntime, ZeroOptimizerState, load_deepspeed_config
from mpdistil_fast.distributed.runtime import OptimizerSpec
from mpdistil_fast.pipeline.trainer import BestSnapshot, RankShareSnapshot


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))


def is_fresh(state: dict) -> bool:
    return not state or (int(state["step"]) == 0 and not any(
        value.any() for key, value in state.items() if key != "step" and torch.is_tensor(value)))


def check_optimizer_state(runtime: DeepSpeedRuntime, config: dict, tolerance: float) -> None:
    """Each rank steps its half of the batch through a ZeRO engine; the state it assembles for every parameter is
    the one a torch AdamW reaches on the whole batch in one process (step, moments, the group's hyperparameters)."""
    runtime.configs["student"] = load_deepspeed_config(config, name="student")
    spec = OptimizerSpec(lr=1e-2, total_steps=10, weight_decay=0.1)
    model, reference = small_model(), small_model()
    trained = runtime.train(model, spec, role="student")
    expected = LocalRuntime("cpu").train(reference, spec, role="student")
    view, expected_view = trained.optimizer_state(), expected.optimizer_state()
    assert view.kind == "adamw"
    # the engine's gradient clipping (the spec's max_grad_norm, 1.0), which the pilot's experimental step applies
    assert view.max_grad_norm == expected_view.max_grad_norm == spec.max_grad_norm == 1.0
    # no state before the first step, as in torch, or AdamW's fresh one (zeros, step 0: ZeRO-0 bf16's wrapper takes
    # a step while it is built, which the runtime undoes)
    assert all(is_fresh(view.state(p)) for p in model.parameters())
    inputs = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        dtype = next(model.parameters()).dtype
        trained.backward(model(runtime.local_rows({"input_ids": inputs})["input_ids"].to(dtype)).float().pow(2)
                         .sum(1).mean())
        trained.step()
        expected.backward(reference(inputs).pow(2).sum(1).mean())
        expected.step()
    views = [view]
    if isinstance(view, ZeroOptimizerState):  # ZeRO 1/2: one all-reduce per bucket of parameters, any bucket size
        views.append(ZeroOptimizerState(trained.engine, bucket_elements=30))
    for view in views:
        with counted_all_reduces() as count:
            for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
                state, ref_state = view.state(param), expected_view.state(ref)
                assert int(state["step"]) == int(ref_state["step"]) == 2, name
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(state[key], ref_state[key], rtol=tolerance, atol=tolerance * 1e-3)
                for key in ("lr", "betas", "eps", "weight_decay"):
                    assert view.group(param)[key] == expected_view.group(ref)[key], (name, key)
        if isinstance(view, ZeroOptimizerState):
            # 35 + 7 + 7 + 7 + 21 + 3 elements: the default bucket holds them all; buckets of 30 split them as
            # [35], [7, 7, 7], [21, 3]
            assert count == [1 if view is views[0] else 3], count
    if len(views) > 1:  # a bucket read only in part is not served after the next step
        partial = ZeroOptimizerState(trained.engine)
        partial.state(next(model.parameters()))
        trained.backward(model(runtime.local_rows({"input_ids": inputs})["input_ids"].to(dtype)).float().pow(2)
                         .sum(1).mean())
        trained.step()
        expected.backward(reference(inputs).pow(2).sum(1).mean())
        expected.step()
        for (name, param), ref in list(zip(model.named_parameters(), reference.parameters()))[::-1]:
            state, ref_state = partial.state(param), expected_view.state(ref)
            assert int(state["step"]) == int(ref_state["step"]) == 3, name
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state[key], ref_state[key], rtol=tolerance, atol=tolerance * 1e-3)


class TwoHeads(nn.Module):
    """A trunk and one head per task (like :class:`~mpdistil_fast.models.TaskModel`)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7))
        self.heads = nn.ModuleDict({"a": nn.Linear(7, 3), "b": nn.Linear(7, 2)})

    def forward(self, inputs: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.trunk(inputs))


def group_steps(trained) -> list[int]:
    """The step count of each parameter group of the torch AdamW inside a DeepSpeed engine."""
    inner = trained.guard.optimizer
    flats = (getattr(trained.engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 swaps them in
             or [group["params"][0] for group in inner.param_groups])
    return [int(inner.state[flat]["step"]) if flat in inner.state else 0 for flat in flats]


def check_unused_heads(runtime: DeepSpeedRuntime, config: dict, role: str, tolerance: tuple[float, float]) -> None:
    """Steps on task a, a, b, a: head b stays exactly as built through the first two (no momentum, no weight decay),
    each group counts only the steps that used it, and every weight follows a torch AdamW in one process, whose
    state is per parameter (ZeRO-3 would also clip with a norm that counts head a's stale gradient in step 3, and
    head b's in step 4)."""
    runtime.configs[role] = load_deepspeed_config(config, name=role)
    spec = OptimizerSpec(lr=1e-2, total_steps=10, weight_decay=0.1)
    model, reference = TwoHeads(), TwoHeads()
    trained = runtime.train(model, spec, role=role)
    expected = LocalRuntime("cpu").train(reference, spec, role=role)
    inputs = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    # groups: trunk (decayed, not decayed), head a (weight, bias), head b (weight, bias)
    steps = [[1, 1, 1, 1, 0, 0], [2, 2, 2, 2, 0, 0], [3, 3, 2, 2, 1, 1], [4, 4, 3, 3, 1, 1]]
    for step, task in enumerate("aaba"):
        dtype = next(model.parameters()).dtype
        trained.backward(model(runtime.local_rows({"input_ids": inputs})["input_ids"].to(dtype), task).float()
                         .pow(2).sum(1).mean())
        trained.step()
        expected.backward(reference(inputs, task).pow(2).sum(1).mean())
        expected.step()
        assert group_steps(trained) == steps[step], (config, step, group_steps(trained))
        for (name, param), ref in zip(runtime.read_weights(model), reference.parameters()):
            if step < 2 and name.startswith("heads.b."):
                assert torch.equal(param, TwoHeads().get_parameter(name).to(param.dtype)), (config, name)
            torch.testing.assert_close(param.float(), ref, rtol=tolerance[0], atol=tolerance[1],
                                       msg=lambda text, name=name: f"{config} step {step} {name}: {text}")
    if role == "student":  # the pilot step's view of the state: each head's own step count and moments
        view, expected_view = trained.optimizer_state(), expected.optimizer_state()
        for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
            state, ref_state = view.state(param), expected_view.state(ref)
            assert int(state["step"]) == int(ref_state["step"]), (config, name)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state[key], ref_state[key], rtol=tolerance[0] * 10, atol=tolerance[1])


def check_release(runtime: DeepSpeedRuntime, config: dict, role: str) -> None:
    """After ``release`` the training engine's optimizer (torch's AdamW and DeepSpeed's wrapper with the fp32
    master weights) is freed, the model computes what it computed before (ZeRO-3: through an inference engine),
    and it can be trained again."""
    runtime.configs[role] = load_deepspeed_config(config, name=role)
    spec = OptimizerSpec(lr=1e-2, total_steps=10)
    model = small_model()
    inputs = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    trained = runtime.train(model, spec, role=role)
    trained.backward(model(runtime.local_rows({"input_ids": inputs})["input_ids"]).pow(2).sum(1).mean())
    trained.step()
    with torch.no_grad():
        before = model(inputs)
    optimizers = [weakref.ref(trained.guard.optimizer), weakref.ref(trained.engine.optimizer)]
    del trained
    runtime.release(model)
    gc.collect()
    assert [ref() is None for ref in optimizers] == [True, True], (config, [type(ref()) for ref in optimizers])
    with torch.no_grad():
        assert torch.equal(model(inputs), before), config
    runtime.release(model)  # nothing left to release: a no-op
    trained = runtime.train(model, spec, role=role)
    trained.backward(model(runtime.local_rows({"input_ids": inputs})["input_ids"]).pow(2).sum(1).mean())
    trained.step()
    with torch.no_grad():
        assert not torch.equal(model(inputs), before), config


def check_snapshots(runtime: DeepSpeedRuntime) -> None:
    """A ZeRO-3 model's snapshot holds only this rank's partitions (1/W of the elements, no gather), and restoring
    it on every rank gives back the whole weights it was taken from."""
    runtime.configs["teacher"] = load_deepspeed_config({"zero_optimization": {"stage": 3}}, name="teacher")
    model = small_model()
    inputs = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))
    trained = runtime.train(model, OptimizerSpec(lr=1e-2, total_steps=10), role="teacher")

    def take_step() -> None:
        trained.backward(model(runtime.local_rows({"input_ids": inputs})["input_ids"]).pow(2).sum(1).mean())
        trained.step()

    take_step()
    snapshot = runtime.snapshot_weights(model)
    whole = {name: tensor.clone() for name, tensor in runtime.read_weights(model)}
    assert sum(t.numel() for t in snapshot.values()) == sum(p.ds_tensor.numel() for p in model.parameters())
    assert sum(t.numel() for t in snapshot.values()) < sum(t.numel() for t in whole.values())
    take_step()
    assert any(not torch.equal(whole[name], tensor) for name, tensor in runtime.read_weights(model))
    runtime.restore_snapshot(model, snapshot)
    for name, tensor in runtime.read_weights(model):
        assert torch.equal(whole[name], tensor), name
    # the pipeline's best-model snapshot of such a model, through a checkpoint's per-rank files
    best = BestSnapshot.for_model(runtime, model)
    assert isinstance(best, RankShareSnapshot)
    best.offer(0.75, 7, model)
    folder = Path(tempfile.gettempdir()) / f"snapshot-{os.environ['TORCHELASTIC_RUN_ID']}-{os.environ['MASTER_PORT']}"
    best.save_sharded(folder / "best")
    runtime.barrier()
    take_step()
    loaded = BestSnapshot.for_model(runtime, model)
    loaded.load_sharded(folder / "best")
    assert (loaded.score, loaded.step) == (0.75, 7)
    loaded.restore_into(model)
    for name, tensor in runtime.read_weights(model):
        assert torch.equal(whole[name], tensor), name
    # a checkpoint written before snapshots were sharded: whole weights, restored whole, also after a re-save
    take_step()
    older = BestSnapshot.for_model(runtime, model)
    older.load_state_dict({"score": 0.5, "step": 3, "weights": whole})
    older.save_sharded(folder / "older")
    runtime.barrier()
    resaved = BestSnapshot.for_model(runtime, model)
    resaved.load_sharded(folder / "older")
    assert resaved.whole and (resaved.score, resaved.step) == (0.5, 3)
    resaved.restore_into(model)
    for name, tensor in runtime.read_weights(model):
        assert torch.equal(whole[name], tensor), name
    runtime.barrier()
    if runtime.is_main:
        shutil.rmtree(folder)
    runtime.release(model)


def check_weights_in_chunks(runtime: DeepSpeedRuntime) -> None:
    """A ZeRO-3 model's weights read and written a few parameters at a time: never more than gather_elements
    (or one larger parameter) gathered at once, the values and names of state_dict(), rank 0's writes kept, the
    module's load_state_dict pre-hooks applied."""
    import deepspeed

    runtime.configs["teacher"] = load_deepspeed_config({"zero_optimization": {"stage": 3}}, name="teacher")
    model, reference = TwoHeads(), TwoHeads()
    runtime.train(model, OptimizerSpec(lr=1e-2, total_steps=10), role="teacher")
    runtime.gather_elements = 40  # in order: 35, 7 | 7, 7 | 21, 3 | 14, 2 elements
    gathered, original = [], deepspeed.zero.GatheredParameters

    def recording(params, *args, **kwargs):
        gathered.append(sorted(p.ds_numel for p in params))
        return original(params, *args, **kwargs)

    deepspeed.zero.GatheredParameters = recording
    try:
        weights = {name: tensor.clone() for name, tensor in runtime.read_weights(model)}
        assert gathered == [[35], [7, 7, 7], [2, 3, 14, 21]], gathered
        assert list(weights) == list(reference.state_dict())
        for name, tensor in reference.state_dict().items():
            assert torch.equal(weights[name], tensor), name
        changed = {name: tensor + (runtime.rank + 1) for name, tensor in weights.items()}  # rank 0's count
        runtime.write_weights(model, changed)
        for name, tensor in runtime.read_weights(model):
            assert torch.equal(tensor, weights[name] + 1), name

        def drop_retired(module, state, prefix, *args):  # as TaskModel drops a removed pooler's weights
            state.pop(f"{prefix}retired.weight", None)

        model.heads.register_load_state_dict_pre_hook(drop_retired)
        runtime.write_weights(model, {**weights, "heads.retired.weight": torch.zeros(3)})
        for name, tensor in runtime.read_weights(model):
            assert torch.equal(tensor, weights[name]), name
        try:
            runtime.write_weights(model, {k: v for k, v in changed.items() if k != "heads.b.bias"})
        except RuntimeError as error:
            assert "missing ['heads.b.bias']" in str(error), error
        else:
            raise AssertionError("a state without heads.b.bias was written")
    finally:
        deepspeed.zero.GatheredParameters = original


@contextmanager
def counted_all_reduces():
    """[number of deepspeed.comm.all_reduce calls] made inside the block."""
    from deepspeed import comm

    count, original = [0], comm.all_reduce

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    comm.all_reduce = counting
    try:
        yield count
    finally:
        comm.all_reduce = original


def main() -> None:
    runtime = DeepSpeedRuntime({"teacher": {}, "student": {}}, device="cpu", batch_size=4)
    for n in (1, 2, 3, 5, 8):
        rows = runtime.rank_rows(n)
        local = torch.stack([rows * 10, rows * 10 + 1], dim=1).float()  # a result that names its row
        gathered = runtime.gather_rows(local, n)
        expected = torch.stack([torch.arange(n) * 10, torch.arange(n) * 10 + 1], dim=1).float()
        assert torch.equal(gathered, expected), (runtime.rank, n, gathered)
    assert runtime.from_main(runtime.rank + 5) == 5
    assert runtime.average({"loss": float(runtime.rank), "quiz": 1.0}) == {"loss": 0.5, "quiz": 1.0}
    tensors = [torch.full((2, 3), float(runtime.rank)), torch.full((4,), 2.0 * runtime.rank, dtype=torch.float64),
               torch.full((3,), 4.0 * runtime.rank, dtype=torch.bfloat16)]
    runtime.average_tensors(tensors)
    for tensor, mean in zip(tensors, (0.5, 1.0, 2.0)):
        assert torch.equal(tensor, torch.full_like(tensor, mean)), tensor
    for stage in (0, 1, 2):  # stage 0 in fp32: torch's AdamW itself, its state whole on every rank
        check_optimizer_state(runtime, {"zero_optimization": {"stage": stage}}, 1e-5)
    for stage in (0, 1, 2):  # stage 0 in bf16: torch's AdamW on fp32 master copies, whole on every rank
        check_optimizer_state(runtime, {"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}, 5e-2)
    for stage in (0, 1, 2, 3):
        role = "teacher" if stage == 3 else "student"
        check_unused_heads(runtime, {"zero_optimization": {"stage": stage}}, role, (1e-5, 1e-6))
        check_unused_heads(runtime, {"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}, role,
                           (5e-2, 2e-2))
    check_release(runtime, {"zero_optimization": {"stage": 2}}, "student")
    check_release(runtime, {"zero_optimization": {"stage": 3}}, "teacher")
    check_snapshots(runtime)
    check_weights_in_chunks(runtime)
    runtime.barrier()
    print(f"rank {runtime.rank} of {runtime.world_size}: collectives ok", flush=True)
    runtime.close()


if __name__ == "__main__":
    main()
