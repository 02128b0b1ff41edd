"""Distillation methods: the KD-family student objectives, MPDistil's meta-teacher and reward, and the curriculum
policy (REINFORCE).  The stages that use them live in :mod:`mpdistil_fast.pipeline.stages`."""
from mpdistil_fast.methods.curriculum import CurriculumPolicy, Episode, Reinforce, discounted_returns
from mpdistil_fast.methods.objectives import LossParts, StudentObjective

__all__ = ["CurriculumPolicy", "Episode", "LossParts", "Reinforce", "StudentObjective", "discounted_returns"]
