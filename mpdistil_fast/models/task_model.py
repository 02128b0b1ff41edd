"""A backbone with a pooled representation and one classification head per task.

Pooling (the representation MPDistil's meta-teacher reads, Sengupta et al., ICLR 2024, section 3.2):

``pooler``  BERT's pooler, tanh(W h_[CLS] + b) (Devlin et al., 2019);
``cls``     the first token's last hidden state h_0 (encoders only: in a causal decoder the first token attends to
            itself only, so h_0 does not depend on the text; :class:`TaskModel` refuses it there);
``mean``    the mask-weighted mean sum_t m_t h_t / sum_t m_t;
``last``    the hidden state of the last attended token, max{t : m_t = 1} -- correct for right *and* left padding,
            the usual choice for decoders (OPT, Llama).

Heads are ``Dropout -> Linear(H_out, num_labels)`` on the pooled width ``H_out`` (:attr:`TaskModel.pooled_size`: the
layer width ``H``, or the narrower projected width of an OPT model such as OPT-350m); a multiple-choice task (COPA)
scores every (context, choice) pair with ``Linear(H_out, 1)`` and its logits are the ``[B, C]`` choice scores
(Devlin et al., 2019, section 4.4, SWAG).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from mpdistil_fast._validation import check_choice, check_tensor
from mpdistil_fast.data.tasks import TaskSpec, task_spec

POOLING_METHODS = ("pooler", "cls", "mean", "last")


@dataclass
class TaskModelOutput(ModelOutput):
    """``logits`` ``[B, num_labels]`` (multiple choice ``[B, C]``); ``pooled`` ``[B, H_out]`` (multiple choice
    ``[B, C, H_out]``); ``hidden_states`` (embeddings, layer 1, ..., layer L), each ``[B, S, H]`` (multiple choice
    ``[B*C, S, H]``), or None unless asked for.  ``H_out`` is ``H`` except in OPT models that project their final
    state out to a narrower embedding width (OPT-350m: H = 1024, H_out = 512).  ``layer_states`` ``[L, B, 1, H]``
    (multiple choice ``[L, B*C, 1, H]``): every layer's state at the pooling position (:meth:`TaskModel.
    pooled_layer_states`), or None unless asked for.  A ``transformers`` ``ModelOutput`` (a dict as well), so that
    DeepSpeed's ZeRO-3 hooks find the tensors in it."""

    logits: torch.Tensor
    pooled: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    layer_states: torch.Tensor | None = None


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str, pooler: nn.Module | None = None
         ) -> torch.Tensor:
    """Pool token states ``hidden`` ``[B, S, H]`` into ``[B, H]`` with ``method`` (see the module docstring);
    ``attention_mask`` ``[B, S]`` marks real tokens with 1.  ``pooler`` is the backbone's pooler (``"pooler"`` only)."""
    check_choice("method", method, POOLING_METHODS)
    check_tensor("hidden", hidden)
    check_tensor("attention_mask", attention_mask, floating=False)
    if hidden.dim() != 3 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden must be [B, S, H] and attention_mask [B, S], got {tuple(hidden.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if method == "pooler":
        if pooler is None:
            raise ValueError("method 'pooler' needs the backbone's pooler module; this backbone has none "
                             "(use 'cls', 'mean' or 'last')")
        return pooler(hidden)
    if method == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if method == "mean":
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.ne(0) * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _head_dropout(config) -> float:
    for key in ("hidden_dropout_prob", "dropout"):
        value = getattr(config, key, None)
        if isinstance(value, float):
            return value
    return 0.1


def is_causal(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a causal decoder (OPT, Llama, GPT-2): its attention modules say ``is_causal``."""
    return any(getattr(module, "is_causal", False) is True for module in backbone.modules())


def final_projection(backbone: nn.Module) -> nn.Module | None:
    """The projection an OPT decoder applies to its final state (``project_out``, present when
    ``word_embed_proj_dim != hidden_size``, as in OPT-350m), or None: then ``last_hidden_state`` is ``H`` wide."""
    return getattr(getattr(backbone, "decoder", None), "project_out", None)


def _ignore_dropped_pooler(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: drop the weights of the backbone pooler that :class:`TaskModel` removed."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}backbone.pooler.")]:
        del state_dict[key]


class TaskModel(nn.Module):
    """``backbone`` (a Hugging Face ``AutoModel``) + pooling + one head per task.

    Unless ``pooling`` is ``"pooler"``, the backbone's own pooler (BERT's, RoBERTa's) is removed from it: no loss
    reaches its parameters, and dead weights would still cost its forward, and be decayed by an optimizer that hands
    every parameter a gradient (DeepSpeed's, see :mod:`mpdistil_fast.distributed.unused_groups`)."""

    def __init__(self, backbone: nn.Module, tasks: dict[str, TaskSpec] | list[str] | tuple[str, ...],
                 pooling: str = "cls") -> None:
        super().__init__()
        self.pooling = check_choice("pooling", pooling, POOLING_METHODS)
        specs = dict(tasks) if isinstance(tasks, dict) else {name: task_spec(name) for name in tasks}
        if not specs:
            raise ValueError("tasks must name at least one task")
        if pooling == "pooler" and getattr(backbone, "pooler", None) is None:
            raise ValueError(f"pooling 'pooler' needs a backbone with a pooler; {type(backbone).__name__} has none "
                             "(use 'cls', 'mean' or 'last')")
        if pooling == "cls" and is_causal(backbone):
            raise ValueError(f"pooling 'cls' of the causal decoder {type(backbone).__name__} pools its first token, "
                             "which attends to itself only: the same state for every text; use 'last' (or "
                             "'mean')")
        if pooling != "pooler" and getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None
            # checkpoints written while TaskModel kept the pooler still load (its weights are dropped)
            self.register_load_state_dict_pre_hook(_ignore_dropped_pooler)
        self.backbone = backbone
        self.specs = specs
        #: width of the layer states (``hidden_states``, ``layer_states``; patient KD's projection is sized by it)
        self.hidden_size = int(backbone.config.hidden_size)
        projection = final_projection(backbone)
        #: width of the pooled representation (heads, meta-teachers): ``hidden_size`` unless the final state is
        #: projected out (:func:`final_projection`)
        self.pooled_size = self.hidden_size if projection is None else int(projection.out_features)
        dropout = _head_dropout(backbone.config)
        self.heads = nn.ModuleDict({
            name: nn.Sequential(nn.Dropout(dropout), nn.Linear(self.pooled_size, 1 if spec.multiple_choice
                                                               else spec.num_labels))
            for name, spec in specs.items()})
        accepted = inspect.signature(backbone.forward).parameters
        self._accepts_token_types = "token_type_ids" in accepted
        self._accepts_use_cache = "use_cache" in accepted

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, *, task: str,
                output_hidden_states: bool = False, output_layer_states: bool = False) -> TaskModelOutput:
        """Logits of ``task``'s head, the pooled representation and (optionally) all hidden states and every
        layer's state at the pooling position.  Inputs are ``[B, S]``, or ``[B, C, S]`` for a multiple-choice
        task."""
        if task not in self.heads:
            raise ValueError(f"task must be one of {tuple(self.heads)}, got {task!r}")
        multiple_choice = self.specs[task].multiple_choice
        expected_dim = 3 if multiple_choice else 2
        if input_ids.dim() != expected_dim or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask of task {task!r} must both be "
                             f"{'[B, C, S]' if multiple_choice else '[B, S]'}, got {tuple(input_ids.shape)} and "
                             f"{tuple(attention_mask.shape)}")
        leading = input_ids.shape[:-1]
        flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
        need_states = output_hidden_states or output_layer_states
        kwargs = {"input_ids": flat(input_ids), "attention_mask": flat(attention_mask),
                  "output_hidden_states": need_states, "return_dict": True}
        if self._accepts_token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = flat(token_type_ids)
        if self._accepts_use_cache:
            kwargs["use_cache"] = False
        outputs, hidden_states = self._backbone_forward(kwargs, need_states)
        pooled = pool(outputs.last_hidden_state, kwargs["attention_mask"], self.pooling,
                      getattr(self.backbone, "pooler", None))
        head = self.heads[task]
        logits = head(pooled.to(head[1].weight.dtype))
        logits = logits.reshape(leading) if multiple_choice else logits
        layer_states = self.pooled_layer_states(hidden_states, kwargs["attention_mask"]) if output_layer_states \
            else None
        return TaskModelOutput(logits=logits, pooled=pooled.reshape(*leading, -1),
                               hidden_states=hidden_states if output_hidden_states else None,
                               layer_states=layer_states)

    def pooled_layer_states(self, hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor
                            ) -> torch.Tensor:
        """Every layer's state (``hidden_states[1:]``, after the embeddings) at the pooling position, the layer
        stack ``[L, B, 1, H]`` that patient KD distils (Sun et al., 2019).  PKD takes BERT's [CLS] state, the one its
        pooler and classifier read; here each layer is pooled as the representation is (``pooler`` and ``cls``: the
        first token; ``last``: the last attended token, so that a causal decoder, whose first token does not see the
        text, distils states that do; ``mean``: the masked mean).  ``attention_mask`` ``[B, S]``."""
        method = "cls" if self.pooling == "pooler" else self.pooling
        return torch.stack([pool(h, attention_mask, method) for h in hidden_states[1:]]).unsqueeze(2)

    def _backbone_forward(self, kwargs: dict, output_hidden_states: bool) -> tuple[ModelOutput, tuple | None]:
        """The backbone's outputs and its hidden states, all ``H`` wide: where an OPT decoder projects its final
        state out (:func:`final_projection`), the last entry is that projection's input, the final layer's state,
        not the ``H_out``-wide ``last_hidden_state`` that Hugging Face puts there."""
        if not output_hidden_states:
            return self.backbone(**kwargs), None
        projection = final_projection(self.backbone)
        if projection is None:
            outputs = self.backbone(**kwargs)
            return outputs, tuple(outputs.hidden_states)
        final_states = []
        handle = projection.register_forward_pre_hook(lambda module, args: final_states.append(args[0]))
        try:
            outputs = self.backbone(**kwargs)
        finally:
            handle.remove()
        return outputs, (*outputs.hidden_states[:-1], final_states[-1])
