"""Functional-call bi-level engine: teacher hypergradients and MetaDistil's pilot update.

* :func:`hypergradient` -- d quiz_loss(experimental student) / d teacher, by one of :data:`METHODS`;
* :class:`PilotUpdate` -- MetaDistil's Algorithm 1 (experimental step, teacher update, real student step), driving
  torch optimizers or any :class:`Stepper` (a DeepSpeed engine), data parallel with ``average``.
"""
from mpdistil_fast.bilevel.hypergradient import (METHODS, MetaGradient, hypergradient, hypergradient_surrogate,
                                                 meta_gradient)
from mpdistil_fast.bilevel.inner_update import (InnerUpdate, OptimizerState, TorchOptimizerState,
                                                make_inner_update)
from mpdistil_fast.bilevel.pilot import PilotUpdate
from mpdistil_fast.bilevel.stepper import OptimizerStepper, Stepper

__all__ = ["METHODS", "hypergradient", "hypergradient_surrogate", "PilotUpdate", "meta_gradient", "MetaGradient",
           "InnerUpdate", "make_inner_update", "OptimizerState", "TorchOptimizerState", "Stepper",
           "OptimizerStepper"]
