"""The rectangular attention on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, random_kb, tiny_model, wrap

from kblam import attention

ATOL = 1e-5


def _ids(batch=2, n=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, n), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_kb_is_the_base_model_bit_for_bit(family, hash_encoder):
    model = wrap(family, hash_encoder)
    reference = tiny_model(family)  # same seed, untouched
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = reference(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", FAMILIES)
def test_kb_changes_the_output(family, hash_encoder):
    """Guards the other tests: the KB layers really are reached."""
    model = wrap(family, hash_encoder)
    ids = _ids()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with_kb = model(input_ids=ids, kb=random_kb(5)).logits
    assert (plain - with_kb).abs().max() > 1e-3


def _naive_rectangular(mask_2d: torch.Tensor):
    """Reference: repeat the KV heads, concatenate [KB keys | text keys] and build the mask by hand."""

    def naive(module, query, key, value, attention_mask, scaling, dropout=0.0, *, kb):
        b, h, n, d = query.shape
        groups = h // key.shape[1]
        q_kb = attention.kb_query(module, kb, d)
        k_kb = kb.keys.expand(b, -1, -1, -1).repeat_interleave(groups, dim=1)
        v_kb = kb.values.expand(b, -1, -1, -1).repeat_interleave(groups, dim=1)
        k_txt, v_txt = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        m, length = k_kb.shape[2], k_txt.shape[2]
        kb_logits = q_kb @ k_kb.transpose(-1, -2) * scaling + kb.bias
        logits = torch.cat([kb_logits, query @ k_txt.transpose(-1, -2) * scaling], -1)
        cap = getattr(module, "attn_logit_softcapping", None)
        assert cap is None
        allowed = torch.zeros(b, 1, n, m + length, dtype=torch.bool)
        allowed[..., :m] = True  # every prompt token sees every knowledge token
        positions = torch.arange(length)
        causal = positions[None, :] <= positions[-n:, None]
        window = getattr(module, "sliding_window", None)
        if window is not None:
            causal &= positions[None, :] > positions[-n:, None] - window
        allowed[..., m:] = causal & mask_2d[:, None, None, :length].bool()
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, -1)
        out = probs[..., :m] @ v_kb + probs[..., m:] @ v_txt
        return out.transpose(1, 2), None

    return naive


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_naive_reference(family, hash_encoder, monkeypatch):
    model = wrap(family, hash_encoder)
    kb = random_kb(6)
    ids = _ids(n=9)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, kb=kb).logits
        monkeypatch.setattr(attention, "rectangular_attention", _naive_rectangular(mask))
        naive = model(input_ids=ids, attention_mask=mask, kb=kb).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], naive[keep], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_permuting_the_kb_leaves_the_output_unchanged(family, hash_encoder):
    from kblam.encoder import KBEmbeddings

    model = wrap(family, hash_encoder)
    kb = random_kb(12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    shuffled = KBEmbeddings(tuple(kb.triples[i] for i in perm), kb.keys[perm], kb.values[perm])
    ids = _ids()
    with torch.no_grad():
        a = model(input_ids=ids, kb=kb).logits
        b = model(input_ids=ids, kb=shuffled).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_scale_factor_makes_kb_mass_independent_of_size(hash_encoder):
    """Each triple twice doubles M; the -log(M) shift must cancel it exactly."""
    from kblam.encoder import KBEmbeddings

    model = wrap("llama", hash_encoder, kb_scale_factor=50.0)
    kb = random_kb(5)
    doubled = KBEmbeddings(kb.triples * 2, kb.keys.repeat(2, 1), kb.values.repeat(2, 1))
    ids = _ids()
    with torch.no_grad():
        a = model(input_ids=ids, kb=kb).logits
        b = model(input_ids=ids, kb=doubled).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_cache_equals_without(family, hash_encoder):
    model = wrap(family, hash_encoder)
    kb = random_kb(8)
    ids = _ids(batch=1, n=5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(input_ids=ids, kb=kb, use_cache=True, **kwargs)
    uncached = model.generate(input_ids=ids, kb=kb, use_cache=False, **kwargs)
    assert cached.shape[1] == ids.shape[1] + 8
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_examples_one_by_one(family, hash_encoder):
    model = wrap(family, hash_encoder)
    kb = random_kb(7)
    long, short = _ids(batch=1, n=8, seed=5)[0], _ids(batch=1, n=5, seed=6)[0]
    # Right padding for the forward pass: positions need no adjusting.
    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[0], ids[1, :5] = long, short
    mask = (torch.arange(8) < torch.tensor([[8], [5]])).long()
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, kb=kb).logits
        alone_long = model(input_ids=long[None], kb=kb).logits[0]
        alone_short = model(input_ids=short[None], kb=kb).logits[0]
    torch.testing.assert_close(batch[0], alone_long, atol=ATOL, rtol=0)
    torch.testing.assert_close(batch[1, :5], alone_short, atol=ATOL, rtol=0)
    # Left padding for generation, as ask() does it.
    left = torch.zeros(2, 8, dtype=torch.long)
    left[0], left[1, 3:] = long, short
    left_mask = (torch.arange(8) >= torch.tensor([[0], [3]])).long()
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    together = model.generate(input_ids=left, attention_mask=left_mask, kb=kb, **kwargs)
    assert torch.equal(together[0, 8:], model.generate(input_ids=long[None], kb=kb, **kwargs)[0, 8:])
    assert torch.equal(together[1, 8:], model.generate(input_ids=short[None], kb=kb, **kwargs)[0, 5:])


def test_batch_of_kbs_with_mask_equals_each_kb_alone(hash_encoder):
    model = wrap("qwen2", hash_encoder)
    small, large = random_kb(3, seed=1), random_kb(6, seed=2)
    keys = torch.zeros(2, 6, small.keys.shape[1])
    values = torch.zeros_like(keys)
    keys[0, :3], values[0, :3] = small.keys, small.values
    keys[1], values[1] = large.keys, large.values
    kb_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6]).bool()
    ids = _ids()
    with torch.no_grad(), model.attach_embeddings(keys, values, kb_mask=kb_mask):
        batch = model(input_ids=ids).logits
    with torch.no_grad():
        first = model(input_ids=ids[:1], kb=small).logits
        second = model(input_ids=ids[1:], kb=large).logits
    torch.testing.assert_close(batch[0], first[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batch[1], second[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("m", [1, 10_000])
def test_kb_sizes_run(m, hash_encoder):
    model = wrap("llama", hash_encoder)
    ids = _ids(batch=2, n=6)
    with torch.no_grad(), model.attach(random_kb(m), record=True) as recorder:
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 6, 128)
    assert torch.isfinite(logits).all()
    scores = recorder.scores()
    assert scores.shape == (2, m)
    torch.testing.assert_close(scores.sum(-1), torch.ones(2))


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen3"])
def test_gradients_reach_only_the_adapter(family, hash_encoder):
    model = wrap(family, hash_encoder)
    ids = _ids()
    model.train()
    out = model(input_ids=ids, labels=ids, kb=random_kb(4))
    out.loss.backward()
    for name, p in model.base.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    grads = {name: p.grad for name, p in model.adapter.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    # Every kind of adapter parameter learns from the answer loss.
    for kind in ("key_proj", "key_norm", "value_proj", "query_heads"):
        assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith(kind)), kind


def test_kb_layers_by_list_and_frequency(hash_encoder):
    by_freq = wrap("llama", hash_encoder, kb_layer_frequency=2)
    assert by_freq.config.kb_layers == [0, 2]
    by_list = wrap("llama", hash_encoder, kb_layers=[3, 1])
    assert by_list.config.kb_layers == [1, 3]
    assert sorted(by_list.adapter.query_heads.keys()) == ["1", "3"]
    with pytest.raises(ValueError, match="kb_layers"):
        wrap("llama", hash_encoder, kb_layers=[4])


def test_query_heads_start_as_the_layer_query_projection(hash_encoder):
    for family in ("llama", "phi3"):
        model = wrap(family, hash_encoder)
        fresh = tiny_model(family)
        from kblam.adapter import KBAdapter
        from kblam.model import attention_modules

        adapter = KBAdapter(model.config)
        adapter.init_query_heads(attention_modules(fresh))
        attn = attention_modules(fresh)[0]
        q_out = model.config.num_attention_heads * model.config.head_dim
        weight = attn.q_proj.weight if family == "llama" else attn.qkv_proj.weight[:q_out]
        assert torch.equal(adapter.query_heads["0"].weight, weight)


def test_eager_base_is_also_wrapped_bit_for_bit(hash_encoder):
    from kblam import KBLaM

    model = KBLaM.from_base(tiny_model("llama", attn="eager"), None, encoder=hash_encoder)
    assert model.base.config._attn_implementation == "kblam_eager"
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_model("llama", attn="eager")(input_ids=ids).logits)
        assert torch.isfinite(model(input_ids=ids, kb=random_kb(3)).logits).all()


def test_bfloat16_base_with_float32_adapter(hash_encoder):
    from kblam import KBLaM

    model = KBLaM.from_base(tiny_model("llama").to(torch.bfloat16), None, encoder=hash_encoder)
    assert next(model.adapter.parameters()).dtype == torch.float32
    with torch.no_grad():
        logits = model(input_ids=_ids(), kb=random_kb(5)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_low_rank_kb_queries_reuse_the_base_q_proj_output(family, hash_encoder, monkeypatch):
    """A low-rank KB query head adds its delta to the q_proj output the base computed anyway (caught by
    a forward hook): the same logits, bit for bit, as multiplying by q_proj again."""
    from kblam.adapter import LowRankQuery

    model = wrap(family, hash_encoder, query_rank=2)
    kb, ids = random_kb(6), _ids(batch=2, n=5)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True)
    original, given = LowRankQuery.forward, []

    def spy(self, hidden, base=None):
        given.append(base is not None)
        return original(self, hidden, base)

    monkeypatch.setattr(LowRankQuery, "forward", spy)
    with torch.no_grad():
        caught = model.generate(input_ids=ids, kb=kb, **kwargs)
    assert given and all(given)  # prefill and every decoding step, on every KB layer
    monkeypatch.setattr(LowRankQuery, "forward", lambda self, hidden, base=None: original(self, hidden))
    with torch.no_grad():
        recomputed = model.generate(input_ids=ids, kb=kb, **kwargs)
    assert torch.equal(caught.sequences, recomputed.sequences)
    for a, b in zip(caught.scores, recomputed.scores, strict=True):
        assert torch.equal(a, b)


def test_low_rank_kb_queries_train_through_the_caught_q_proj_output(hash_encoder):
    model = wrap("llama", hash_encoder, query_rank=2)
    ids = _ids()
    model.train()
    model(input_ids=ids, labels=ids, kb=random_kb(4)).loss.backward()
    grads = [p.grad for n, p in model.adapter.named_parameters() if n.startswith("query_heads")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
