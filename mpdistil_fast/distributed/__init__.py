"""The runtime interface between the training loop and its execution backend (one process, or DeepSpeed)."""
from mpdistil_fast.distributed.runtime import (LocalRuntime, OptimizerSpec, Runtime, TrainedModel, make_runtime,
                                               resolve_device)

__all__ = ["LocalRuntime", "OptimizerSpec", "Runtime", "TrainedModel", "make_runtime", "resolve_device"]
