"""Functional-call bi-level engine: teacher hypergradients and MetaDistil's pilot update.

* :func:`hypergradient` -- d quiz_loss(experimental student) / d teacher, by one of :data:`METHODS`;
* :class:`PilotUpdate` -- MetaDistil's Algorithm 1 (experimental step, teacher update, real student step).
"""
from mpdistil_fast.bilevel.hypergradient import METHODS, MetaGradient, hypergradient, meta_gradient
from mpdistil_fast.bilevel.inner_update import InnerUpdate, make_inner_update
from mpdistil_fast.bilevel.pilot import PilotUpdate

__all__ = ["METHODS", "hypergradient", "PilotUpdate", "meta_gradient", "MetaGradient", "InnerUpdate", "make_inner_update"]
