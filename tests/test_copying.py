"""The copy path, the null slot, the retrieval prior and low-rank query heads."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_kb, tiny_model, tiny_tokenizer

from kblam import KBLaM, copying
from kblam.kb import Triple

PAD = copying.PAD


def test_pointers_follow_each_value():
    ids = torch.tensor([[[5, 6, 7], [6, 9, PAD]]])  # two values: 5 6 7 and 6 9
    targets = torch.tensor([[1, 5, 6, 7, 6, 9, 6, 2]])
    pointers = copying.pointers_along(targets, ids)[0].tolist()
    # before each target token: [pointer of value 0, pointer of value 1]
    assert pointers == [[0, 0], [0, 0], [1, 0], [2, 1], [3, 0], [0, 1], [0, 2], [0, 1]]
    cands = copying.candidates(torch.tensor(pointers)[None], ids)[0].tolist()
    assert cands[2] == [6, 6] and cands[3] == [7, 9] and cands[4] == [PAD, 6] and cands[6] == [5, PAD]


def test_mix_is_the_lm_with_a_shut_gate_and_the_copy_with_an_open_one():
    logits = torch.randn(2, 11)
    weights = torch.tensor([[0.75, 0.25], [1.0, 0.0]])
    tokens = torch.tensor([[3, 4], [5, PAD]])
    shut = copying.mix(logits, torch.zeros(2, 1), weights, tokens)
    torch.testing.assert_close(shut, torch.log_softmax(logits, -1))
    open_ = copying.mix(logits, torch.ones(2, 1), weights, tokens).exp()
    assert open_[0, 3] == pytest.approx(0.75, abs=1e-4) and open_[0, 4] == pytest.approx(0.25, abs=1e-4)
    assert open_[1, 5] == pytest.approx(1.0, abs=1e-4)
    half = copying.mix(logits, torch.full((2, 1), 0.5), weights, tokens).exp()
    torch.testing.assert_close(half.sum(-1), torch.ones(2))
    # Nothing left to copy: the gate is ignored.
    empty = copying.mix(logits, torch.ones(2, 1), weights, torch.full((2, 2), PAD))
    torch.testing.assert_close(empty, torch.log_softmax(logits, -1))


def _copy_model(hash_encoder, **options):
    options = {"retrieval_prior": True, "null_slot": True, "copy_values": True, "prior_scale": 1000.0,
               "max_value_tokens": 64, **options}  # characters: the refusal is 53 tokens
    model = KBLaM.from_base(tiny_model("llama"), tiny_tokenizer(), encoder=hash_encoder, **options)
    with torch.no_grad():
        model.adapter.copy_gate.bias.fill_(30.0)  # always copy when there is something to copy
    return model


def _generate(model, kb, asked: int, n: int = 12, null_bias: float = -1e4):
    with torch.no_grad():
        model.adapter.null_bias.fill_(null_bias)
    prompt = model.tokenizer(["Question: x?\nAnswer:"], return_tensors="pt")
    ids = model.value_ids(kb.triples)
    with torch.no_grad(), model.attach_embeddings(kb.keys, kb.values, queries=kb.keys[asked:asked + 1], value_ids=ids):
        out = model._generate(**prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, prompt["input_ids"].shape[1]:].tolist()


def test_open_gate_copies_the_value_the_prior_points_at(hash_encoder):
    model = _copy_model(hash_encoder)
    kb = random_kb(6)
    for asked in (1, 4):
        value = model.tokenizer(" " + kb.triples[asked].value)["input_ids"]
        assert _generate(model, kb, asked)[: len(value)] == value


def test_updating_a_value_changes_what_is_copied(hash_encoder):
    model = _copy_model(hash_encoder)
    kb = random_kb(5)
    triples = list(kb.triples)
    triples[2] = Triple(triples[2].name, triples[2].property, "Zebra 42")
    updated = type(kb)(tuple(triples), kb.keys, kb.values)
    assert model.tokenizer.decode(_generate(model, updated, 2)).startswith(" Zebra 42")


def test_null_slot_copies_the_refusal(hash_encoder):
    model = _copy_model(hash_encoder, prior_scale=1.0)
    refusal = model.tokenizer(model.config.refusal)["input_ids"]
    out = _generate(model, random_kb(4), 0, n=len(refusal), null_bias=1e4)
    assert out == refusal


def test_copy_path_gets_gradients_and_no_kb_is_still_the_base(hash_encoder):
    model = _copy_model(hash_encoder, prior_scale=1.0)
    reference = tiny_model("llama")
    ids = torch.randint(3, 70, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    kb = random_kb(5)
    value_ids = model.value_ids(kb.triples)
    with model.attach_embeddings(kb.keys, kb.values, queries=kb.keys[:2], value_ids=value_ids):
        out = model.base(input_ids=ids)
        weights = model.kb_weights()
        hidden = model._lm_input
    assert weights.shape == (2, 9, 6)  # 5 triples + the null slot
    with torch.no_grad():
        model.adapter.copy_gate.bias.zero_()  # unsaturated, so that the gate learns
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 9))
    pointer = torch.zeros(2, 9, 6, dtype=torch.long)
    log_p = model.copy_log_probs(out.logits, hidden, weights, pointer, value_ids)
    log_p[..., 5].sum().backward()
    for name in ("copy_gate.weight", "null_bias", "null_key", "log_prior_scale"):
        grad = dict(model.adapter.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_null_slot_competes_with_each_triple_whatever_the_kb_size(hash_encoder):
    """The null slot gets the same size shift as the triples: null versus a matching triple does not move
    with M (so refusal is calibrated across KB sizes), while the triples' total mass stays size-invariant."""
    model = KBLaM.from_base(tiny_model("qwen2"), None, encoder=hash_encoder, null_slot=True)
    with torch.no_grad():
        model.adapter.null_bias.fill_(1.5)
    gaps = []
    for m in (4, 400):
        bias = model._kb_bias(m, torch.device("cpu"), None, None)[model.config.kb_layers[0]]
        assert bias.shape == (1, 1, 1, m + 1)
        gaps.append(float((bias[..., -1] - bias[..., 0]).detach()))
        assert float(bias[..., 0].detach()) == pytest.approx(math.log(100.0) - math.log(m), abs=1e-5)
    assert gaps == pytest.approx([1.5, 1.5], abs=1e-5)


def test_retrieval_prior_adds_scaled_cosine(hash_encoder):
    model = KBLaM.from_base(tiny_model("llama"), None, encoder=hash_encoder, retrieval_prior=True, prior_scale=7.0)
    keys = torch.randn(3, 24)
    q = keys[1:2] * 3.0
    from kblam.model import question_key_cosine

    bias = model._kb_bias(keys.shape[-2], keys.device, None, question_key_cosine(q, keys))[model.config.kb_layers[0]]
    cos = torch.nn.functional.cosine_similarity(q, keys)
    expected = math.log(100.0) - math.log(3) + 7.0 * cos
    torch.testing.assert_close(bias.reshape(-1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_low_rank_query_heads_start_as_q_proj_and_stay_small(family, hash_encoder):
    full = KBLaM.from_base(tiny_model(family), None, encoder=hash_encoder)
    low = KBLaM.from_base(tiny_model(family), None, encoder=hash_encoder, query_rank=2)
    layer = str(low.config.kb_layers[0])
    h = torch.randn(1, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(low.adapter.query_heads[layer](h), full.adapter.query_heads[layer](h))
    n_low = sum(p.numel() for n, p in low.adapter.named_parameters() if n.startswith("query_heads"))
    n_full = sum(p.numel() for n, p in full.adapter.named_parameters() if n.startswith("query_heads"))
    assert n_low < n_full / 3
    assert not any("q_proj" in k or "qkv" in k for k in low.adapter.state_dict())


def test_a_copy_two_tokens_along_is_finished():
    gate = torch.tensor([[0.05], [0.05]])
    weights = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    ids = torch.tensor([[[7, 8, 9], [5, 6, PAD]]])
    pointer = torch.tensor([[2, 0], [1, 0]])  # row 0: value 0 copied for two tokens; row 1: only one
    tokens = copying.candidates(pointer, ids)
    committed = copying.commit(gate, weights, pointer, tokens, after=2)
    assert committed[0].item() == pytest.approx(0.9) and committed[1].item() == pytest.approx(0.05)
    done = copying.commit(gate, weights, torch.tensor([[3, 0]]), copying.candidates(torch.tensor([[3, 0]]), ids), 2)
    assert done[0].item() == pytest.approx(0.05)  # a finished value holds nothing open
