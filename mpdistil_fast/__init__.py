"""mpdistil_fast: fused distillation losses and a first-order bi-level engine for meta-learning KD.

Public API (imported lazily, so ``import mpdistil_fast`` stays cheap and never imports triton):

* fused ops: :func:`kd_kl_div`, :func:`hidden_mse`, :func:`meta_teacher_loss` (and :func:`meta_teacher_logits`,
  the meta-teacher's scores of one representation) and their modules :class:`KDLoss`, :class:`HiddenMSELoss`,
  :class:`MetaTeacher`;
* :func:`available_backends` -- which of :data:`BACKENDS` (torch / cpp / triton / cuda) can run here, and why not;
* :mod:`mpdistil_fast.bilevel` -- teacher hypergradients and MetaDistil's pilot update.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "kd_kl_div": "mpdistil_fast.functional.kd_kl_div",
    "hidden_mse": "mpdistil_fast.functional.hidden_mse",
    "meta_teacher_loss": "mpdistil_fast.functional.meta_teacher_loss",
    "meta_teacher_logits": "mpdistil_fast.functional.meta_teacher_loss",
    "KDLoss": "mpdistil_fast.modules.kd_loss",
    "HiddenMSELoss": "mpdistil_fast.modules.hidden_mse_loss",
    "MetaTeacher": "mpdistil_fast.modules.meta_teacher",
    "available_backends": "mpdistil_fast.backends",
    "BACKENDS": "mpdistil_fast.backends",
}
_SUBMODULES = ("bilevel", "backends", "data", "models", "methods", "pipeline", "distributed", "ops", "functional",
               "modules", "kernels")

__all__ = sorted(_LAZY) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"mpdistil_fast.{name}")
    raise AttributeError(f"module 'mpdistil_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
