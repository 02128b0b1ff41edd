"""Hugging Face backbones (encoders and decoders), pooling, multi-task heads, truncated students, tiny test models."""
from mpdistil_fast.models.backbones import (default_teacher_path, load_backbone, load_tokenizer, resolve_model_path,
                                            tiny_backbone, truncated_copy)
from mpdistil_fast.models.task_model import POOLING_METHODS, TaskModel, TaskModelOutput, pool

__all__ = ["POOLING_METHODS", "TaskModel", "TaskModelOutput", "default_teacher_path", "load_backbone",
           "load_tokenizer", "pool", "resolve_model_path", "tiny_backbone", "truncated_copy"]
