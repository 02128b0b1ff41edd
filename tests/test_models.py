"""Backbones (BERT, DeBERTa-v2, OPT, Llama, the packaged MiniLM), pooling, multi-task heads and truncated students."""
from __future__ import annotations

import copy

import pytest
import torch

from mpdistil_fast.models import (TaskModel, default_teacher_path, load_backbone, pool,
                                  tiny_backbone, truncated_copy)
from mpdistil_fast.models.backbones import TINY_KINDS, transformer_layers

VOCAB = 97


def _inputs(batch: int, length: int, lengths: list[int], *, left: bool = False, shape_prefix=()):
    ids = torch.randint(3, VOCAB, (*shape_prefix, batch, length))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if left:
            mask[..., row, length - n:] = 1
        else:
            mask[..., row, :n] = 1
    return ids, mask


def _reference_pool(hidden: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """Row-by-row float64 reference."""
    rows = []
    for h, m in zip(hidden.double(), mask):
        real = [t for t in range(len(m)) if m[t] == 1]
        rows.append({"cls": h[0], "mean": h[real].mean(dim=0), "last": h[real[-1]]}[method])
    return torch.stack(rows)


@pytest.mark.parametrize("left", [False, True], ids=["right_padding", "left_padding"])
@pytest.mark.parametrize("method", ["cls", "mean", "last"])
def test_pool_matches_reference(method, left):
    hidden = torch.randn(5, 9, 7, dtype=torch.float64)
    _, mask = _inputs(5, 9, [9, 1, 4, 6, 2], left=left)
    torch.testing.assert_close(pool(hidden, mask, method), _reference_pool(hidden, mask, method), rtol=0, atol=1e-12)
    hidden32 = hidden.float().requires_grad_()
    pool(hidden32, mask, method).square().sum().backward()
    expected = hidden.clone().requires_grad_()
    _reference_pool(expected, mask, method).square().sum().backward()
    torch.testing.assert_close(hidden32.grad.double(), expected.grad, rtol=1e-5, atol=1e-6)


def test_pool_errors_name_the_argument():
    hidden, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="method"):
        pool(hidden, mask, "max")
    with pytest.raises(ValueError, match="attention_mask"):
        pool(hidden, mask[:, :2], "mean")
    with pytest.raises(TypeError, match="hidden"):
        pool(hidden.long(), mask, "mean")
    with pytest.raises(ValueError, match="pooler"):
        pool(hidden, mask, "pooler")


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_task_model_heads_and_shapes(kind):
    backbone = tiny_backbone(kind, hidden_size=16, num_layers=2, vocab_size=VOCAB)
    model = TaskModel(backbone, ["cb", "copa"], pooling="last" if kind in ("opt", "llama") else "cls").eval()
    ids, mask = _inputs(3, 8, [8, 5, 2])
    out = model(ids, mask, torch.zeros_like(ids), task="cb", output_hidden_states=True)
    assert out.logits.shape == (3, 3) and out.pooled.shape == (3, 16)
    assert len(out.hidden_states) == 3 and all(h.shape == (3, 8, 16) for h in out.hidden_states)
    choice_ids, choice_mask = _inputs(3, 6, [6, 3, 4], shape_prefix=())
    mc_ids = torch.stack([choice_ids, choice_ids.flip(0)], 1)
    mc_mask = torch.stack([choice_mask, choice_mask.flip(0)], 1)
    mc = model(mc_ids, mc_mask, task="copa", output_hidden_states=True)
    assert mc.logits.shape == (3, 2) and mc.pooled.shape == (3, 2, 16) and mc.hidden_states[0].shape == (6, 6, 16)
    # a choice's score depends only on its own (context, choice) pair
    torch.testing.assert_close(mc.logits[0, 1], mc.logits[2, 0])
    assert model(ids, mask, task="cb").hidden_states is None
    with pytest.raises(ValueError, match="task"):
        model(ids, mask, task="rte")
    with pytest.raises(ValueError, match="input_ids"):
        model(ids, mask, task="copa")


def test_task_model_uses_token_types_and_pooler_for_bert():
    model = TaskModel(tiny_backbone("bert", hidden_size=16, vocab_size=VOCAB), ["rte"], pooling="pooler").eval()
    ids, mask = _inputs(2, 6, [6, 6])
    types = torch.zeros_like(ids)
    types[:, 3:] = 1
    with_types, without = model(ids, mask, types, task="rte"), model(ids, mask, task="rte")
    assert not torch.allclose(with_types.logits, without.logits)
    states = model.backbone(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(with_types.pooled, model.backbone.pooler(states))
    with pytest.raises(ValueError, match="pooler"):
        TaskModel(tiny_backbone("llama", hidden_size=16, vocab_size=VOCAB), ["rte"], pooling="pooler")
    with pytest.raises(ValueError, match="pooling"):
        TaskModel(tiny_backbone("bert", hidden_size=16, vocab_size=VOCAB), ["rte"], pooling="first")


def test_task_model_drops_the_pooler_it_does_not_pool_with():
    """With ``cls`` pooling BERT's pooler reaches no loss: it is removed (no dead parameters for an optimizer to
    decay), and the outputs are those of the backbone with its pooler."""
    backbone = tiny_backbone("bert", hidden_size=16, vocab_size=VOCAB)
    with_pooler = copy.deepcopy(backbone)
    model = TaskModel(backbone, ["rte"], pooling="cls").eval()
    assert model.backbone.pooler is None and not [n for n, _ in model.named_parameters() if "pooler" in n]
    ids, mask = _inputs(2, 6, [6, 4])
    states = with_pooler.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(model(ids, mask, task="rte").pooled, states[:, 0], rtol=0, atol=0)
    # a state dict written while the pooler was kept (older checkpoints) still loads, strictly otherwise
    pooler = {f"backbone.pooler.{k}": v for k, v in with_pooler.pooler.state_dict().items()}
    old_state = {**model.state_dict(), **pooler}
    model.load_state_dict(old_state)
    wrapped = torch.nn.ModuleDict({"student": model})
    wrapped.load_state_dict({f"student.{k}": v for k, v in old_state.items()})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict({**old_state, "backbone.extra": torch.zeros(1)})


def test_a_pooler_student_of_a_cls_teacher_loads_its_pooler(tmp_path, data_dir):
    """The teacher dropped its pooler (it pools the CLS state); a student that pools with the pooler gets the
    pretrained one, loaded afresh with the layers it keeps."""
    from mpdistil_fast.pipeline.config import load_config
    from mpdistil_fast.pipeline.trainer import Run
    from pipeline_helpers import make_tiny_teacher, write_config

    path = write_config(tmp_path / "c.yaml", make_tiny_teacher(tmp_path / "teacher"), data_dir, tmp_path / "run", "kd",
                        student={"pooling": "pooler"})
    run = Run(load_config(path))
    assert run.teacher.backbone.pooler is None and run.student.backbone.pooler is not None
    pretrained = tiny_backbone("bert", hidden_size=32, num_layers=4, seed=0).pooler.dense.weight
    assert torch.equal(run.student.backbone.pooler.dense.weight, pretrained)


@pytest.mark.parametrize("kind", ["bert", "deberta-v2", "opt", "llama"])
def test_padding_does_not_change_pooled_features(kind):
    """Right padding (and, for OPT whose positions follow the mask, left padding) leaves each row's pooled
    representation unchanged: the mask reaches attention and pooling."""
    model = TaskModel(tiny_backbone(kind, hidden_size=16, vocab_size=VOCAB), ["rte"], pooling="last").eval()
    ids = torch.randint(3, VOCAB, (1, 5))
    alone = model(ids, torch.ones_like(ids), task="rte").pooled
    padded_right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask_right = torch.tensor([[1] * 5 + [0] * 3])
    torch.testing.assert_close(model(padded_right, mask_right, task="rte").pooled, alone, rtol=1e-5, atol=1e-5)
    if kind == "opt":
        padded_left, mask_left = padded_right.roll(3, 1), mask_right.roll(3, 1)
        torch.testing.assert_close(model(padded_left, mask_left, task="rte").pooled, alone, rtol=1e-5, atol=1e-5)


def _word_tokenizer(texts: list[str]):
    """A word-level decoder-style tokenizer (no [SEP], an end-of-sequence token, left padding), built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for text in texts for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{word: i + 3 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   padding_side="left"), len(vocab)


def test_decoder_last_token_pooling_on_left_padded_real_data(data_dir):
    from mpdistil_fast.data import encode_examples, load_examples

    examples = load_examples("wic", "validation", data_dir)[:4]
    tokenizer, vocab_size = _word_tokenizer([text for e in examples for text in e.texts])
    split = encode_examples(examples, tokenizer, max_length=64)
    assert split.attention_mask[:, -1].all() and not split.attention_mask[:, 0].all()
    first = tokenizer.convert_ids_to_tokens(split.input_ids[0][split.attention_mask[0].bool()].tolist())
    assert first[:3] == ["class", "An", "emerging"] and first.count("</s>") == 1  # word, sentence1 </s> sentence2
    model = TaskModel(tiny_backbone("opt", hidden_size=16, vocab_size=vocab_size), ["wic"], pooling="last").eval()
    batched = model(split.input_ids, split.attention_mask, task="wic").pooled
    for row in range(4):
        real = split.input_ids[row][split.attention_mask[row].bool()][None]
        alone = model(real, torch.ones_like(real), task="wic").pooled[0]
        torch.testing.assert_close(batched[row], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_truncated_copy_keeps_the_first_layers(kind):
    full = tiny_backbone(kind, hidden_size=16, num_layers=4, vocab_size=VOCAB).eval()
    student = truncated_copy(full, 2).eval()
    assert student.config.num_hidden_layers == 2 and full.config.num_hidden_layers == 4
    assert len(transformer_layers(student)[2]) == 2
    ids, mask = _inputs(2, 7, [7, 4])
    kwargs = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": True}
    full_states, student_states = full(**kwargs).hidden_states, student(**kwargs).hidden_states
    assert len(student_states) == 3
    # decoders apply a final norm after the last kept layer, encoders do not: compare the un-normed states
    shared = 3 if kind in ("bert", "deberta-v2") else 2
    for a, b in zip(full_states[:shared], student_states[:shared]):
        torch.testing.assert_close(a, b)
    full_params = dict(full.named_parameters())
    for name, parameter in student.named_parameters():
        assert torch.equal(parameter, full_params[name]) and parameter.data_ptr() != full_params[name].data_ptr()
    with pytest.raises(ValueError, match="num_layers"):
        truncated_copy(full, 5)
    with pytest.raises(ValueError, match="num_layers"):
        truncated_copy(full, 0)


def test_tiny_backbone_is_seeded_and_checks_kind():
    a, b = tiny_backbone("bert", vocab_size=VOCAB, seed=1), tiny_backbone("bert", vocab_size=VOCAB, seed=1)
    c = tiny_backbone("bert", vocab_size=VOCAB, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    with pytest.raises(ValueError, match="kind"):
        tiny_backbone("gpt9")


def test_packaged_minilm_teacher_and_three_layer_student():
    path = default_teacher_path()
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    teacher = load_backbone("minilm")
    assert teacher.config.num_hidden_layers == 6 and teacher.config.hidden_size == 384
    student = TaskModel(truncated_copy(teacher, 3), ["cb", "rte"], pooling="pooler")
    assert student.hidden_size == 384 and student.backbone.config.num_hidden_layers == 3
    assert sum(p.numel() for p in student.backbone.encoder.parameters()) * 2 == sum(
        p.numel() for p in teacher.encoder.parameters())


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_cls_pooling_of_a_decoder_is_refused(kind):
    """In a causal decoder the first token attends to itself only: its state is the same for every text (OPT's
    first token is its BOS), so a ``cls`` head would train on a constant.  TaskModel refuses it, naming ``last``."""
    backbone = tiny_backbone(kind, hidden_size=16, vocab_size=VOCAB).eval()
    ids = torch.randint(3, VOCAB, (2, 6))
    ids[:, 0] = 2
    states = backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(states[0, 0], states[1, 0])  # why: position 0 does not see the text
    with pytest.raises(ValueError, match="'last'"):
        TaskModel(backbone, ["rte"], pooling="cls")
    TaskModel(tiny_backbone("bert", hidden_size=16, vocab_size=VOCAB), ["rte"], pooling="cls")
    TaskModel(tiny_backbone(kind, hidden_size=16, vocab_size=VOCAB), ["rte"], pooling="mean")


def test_truncated_copy_takes_the_students_attention_implementation():
    """A student copied from an ``sdpa`` teacher runs the attention it is asked for (``eager``: the ``exact`` and
    ``forward_mode`` hypergradients differentiate it twice, which CPU SDPA cannot), and the teacher keeps its own."""
    teacher = load_backbone("default", attn_implementation="sdpa")
    assert truncated_copy(teacher, 2).config._attn_implementation == "sdpa"  # unchanged unless asked
    student = truncated_copy(teacher, 2, attn_implementation="eager")
    assert student.config._attn_implementation == "eager" and teacher.config._attn_implementation == "sdpa"
    ids = torch.randint(1000, 2000, (2, 9))
    loss = student(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.pow(2).sum()
    query = student.encoder.layer[0].attention.self.query.weight
    (grad,) = torch.autograd.grad(loss, query, create_graph=True)
    torch.autograd.grad(grad.pow(2).sum(), query)  # double backward: eager attention
    with pytest.raises(ValueError, match="attn_implementation"):
        truncated_copy(teacher, 2, attn_implementation="fast")


def test_opt_with_a_projected_final_state():
    """OPT-350m projects its final state out to a narrower width (word_embed_proj_dim 512 < hidden_size 1024): the
    heads read that width (``pooled_size``), and the hidden states stay ``hidden_size`` wide, the last one being
    the final layer's state before the projection (Hugging Face puts the projected state there), for the student
    cut from it too."""
    backbone = tiny_backbone("opt", hidden_size=16, vocab_size=VOCAB, word_embed_proj_dim=8,
                             do_layer_norm_before=False)
    teacher = TaskModel(backbone, ["cb", "copa"], pooling="last").eval()
    assert (teacher.hidden_size, teacher.pooled_size) == (16, 8)
    ids, mask = _inputs(3, 6, [6, 2, 4])
    out = teacher(ids, mask, task="cb", output_hidden_states=True)
    assert out.logits.shape == (3, 3) and out.pooled.shape == (3, 8)
    assert [tuple(h.shape) for h in out.hidden_states] == [(3, 6, 16)] * 3
    projected = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(backbone.decoder.project_out(out.hidden_states[-1]), projected)
    torch.testing.assert_close(out.pooled, _reference_pool(projected, mask, "last").float())
    choice_ids, choice_mask = _inputs(2, 5, [5, 3], shape_prefix=(2,))
    assert teacher(choice_ids, choice_mask, task="copa").logits.shape == (2, 2)
    student = TaskModel(truncated_copy(backbone, 1), ["cb"], pooling="last")
    student_out = student(ids, mask, task="cb", output_hidden_states=True)
    assert [tuple(h.shape) for h in student_out.hidden_states] == [(3, 6, 16)] * 2
    (student_out.logits.sum() + student_out.hidden_states[-1].sum()).backward()
    assert student.backbone.decoder.project_out.weight.grad is not None


@pytest.mark.parametrize("kind,pooling", [("bert", "pooler"), ("bert", "cls"), ("deberta-v2", "mean"),
                                          ("opt", "last"), ("llama", "mean")])
def test_layer_states_are_taken_at_the_pooling_position(kind, pooling):
    """Patient KD's per-layer states: every layer after the embeddings pooled as the representation is (the first
    token for ``pooler``/``cls``, as PKD's [CLS]; a decoder's last attended token, which sees the text), for plain
    and multiple-choice inputs, with right or left padding."""
    model = TaskModel(tiny_backbone(kind, hidden_size=16, num_layers=3, vocab_size=VOCAB), ["cb", "copa"],
                      pooling=pooling).eval()
    method = "cls" if pooling == "pooler" else pooling
    for task, shape_prefix in (("cb", ()), ("copa", (2,))):
        ids, mask = _inputs(3, 7, [7, 2, 5], left=kind == "opt", shape_prefix=shape_prefix)
        out = model(ids, mask, task=task, output_layer_states=True)
        assert out.hidden_states is None
        hidden = model(ids, mask, task=task, output_hidden_states=True).hidden_states
        flat_mask = mask.reshape(-1, 7)
        expected = torch.stack([_reference_pool(h, flat_mask, method) for h in hidden[1:]]).unsqueeze(2)
        assert out.layer_states.shape == (3, flat_mask.shape[0], 1, 16)
        torch.testing.assert_close(out.layer_states.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind, overrides", [("bert", {"hidden_dropout_prob": 0.25}), ("opt", {"dropout": 0.35})])
def test_heads_drop_out_at_the_backbone_s_rate(kind, overrides):
    """A head's dropout is the backbone's hidden dropout (BERT's ``hidden_dropout_prob``, OPT's ``dropout``), not a
    fixed 0.1 (the tiny configs' default, which hid the difference)."""
    model = TaskModel(tiny_backbone(kind, hidden_size=16, num_layers=1, vocab_size=VOCAB, **overrides), ["cb", "copa"],
                      pooling="last" if kind == "opt" else "cls")
    assert {head[0].p for head in model.heads.values()} == set(overrides.values())
