"""nn.Module wrappers of the fused ops (they hold configuration and parameters)."""
from __future__ import annotations

from typing import NoReturn


class NotScriptable:
    """Mixin of the loss modules: ``torch.jit.script`` cannot compile their forward (keyword-only arguments, the
    Python argument checks and backend choice), so scripting a model that holds one raises an error that says so
    and names what works, instead of TorchScript's complaint about a line deep inside the functional op."""

    def __prepare_scriptable__(self) -> NoReturn:  # called by torch.jit.script on every module before compiling it
        raise RuntimeError(f"torch.jit.script cannot compile {type(self).__name__} (its forward runs Python argument "
                           "checks and picks a backend at call time); use torch.jit.trace, torch.export or "
                           "torch.compile, which record the fused op as one custom-op call")
