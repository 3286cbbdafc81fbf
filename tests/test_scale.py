"""Issue 5, scale: the chunked KB attention equals the single pass; the FAISS pre-filter in ask()."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ENCODER_DIM, FAMILIES, ask_model, random_kb, tiny_model, tiny_tokenizer, wrap

from kblam import KBLaM
from kblam import model as model_module
from kblam.encoder import KBEmbeddings
from kblam.kb import Triple
from kblam.store import index as index_module
from kblam.store.index import IndexRebuildWarning

ATOL = 1e-5


def _ids(batch=2, n=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, n), generator=g)


def _padded_batch(m=10, seed=0):
    """Two KBs of m slots; the first has only 3 triples, padded so that whole chunks are -inf (the first too)."""
    kb = random_kb(m, seed=seed)
    keys = torch.stack([kb.keys, kb.keys.flip(0)])
    values = torch.stack([kb.values, kb.values.flip(0)])
    mask = torch.ones(2, m, dtype=torch.bool)
    mask[0] = False
    mask[0, [3, 4, m - 1]] = True
    return keys, values, mask


def _run(model, ids, attention_mask, chunk_size, *, batch, queries=None, tap=True):
    """(logits, recorder scores, tapped KB weights) of one forward pass."""
    if batch:
        keys, values, kb_mask = _padded_batch()
    else:
        kb = random_kb(10)
        keys, values, kb_mask = kb.keys, kb.values, None
    with model.attach_embeddings(
        keys, values, kb_mask, record=True, queries=queries, tap=tap, chunk_size=chunk_size
    ) as recorder:
        logits = model(input_ids=ids, attention_mask=attention_mask).logits
        weights = model.kb_weights() if tap else None
    return logits, recorder, weights


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [{}, {"null_slot": True, "retrieval_prior": True}], ids=["paper", "null+prior"])
def test_chunked_attention_equals_single_pass(family, options, hash_encoder):
    model = wrap(family, hash_encoder, **options)
    ids = _ids(n=9)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    queries = torch.randn(2, ENCODER_DIM, generator=torch.Generator().manual_seed(4))
    for batch in (False, True):
        with torch.no_grad():
            whole, rec_whole, w_whole = _run(model, ids, mask, 0, batch=batch, queries=queries)
            for chunk in (1, 3, 4):
                chunked, rec_chunked, w_chunked = _run(model, ids, mask, chunk, batch=batch, queries=queries)
                assert model._attached is None
                keep = mask.bool()
                torch.testing.assert_close(chunked[keep], whole[keep], atol=ATOL, rtol=0)
                torch.testing.assert_close(rec_chunked.scores(), rec_whole.scores(), atol=ATOL, rtol=0)
                # Chunked, the tap keeps the last position only.
                assert w_chunked.shape == (2, 1, w_whole.shape[-1])
                torch.testing.assert_close(w_chunked, w_whole[:, -1:], atol=ATOL, rtol=0)
        assert torch.isfinite(chunked).all()


def test_chunking_is_decided_by_size(hash_encoder):
    model = wrap("llama", hash_encoder, null_slot=True)
    kb = random_kb(10)
    model.kb_chunk_size = 11  # 10 triples + the null slot: one pass
    with model.attach(kb):
        assert model._attached.chunk_size is None
    model.kb_chunk_size = 4
    with model.attach(kb):
        assert model._attached.chunk_size == 4
    with model.attach(kb, chunk_size=0):
        assert model._attached.chunk_size is None
    model.kb_chunk_size = None
    with model.attach(kb, chunk_size=5):
        assert model._attached.chunk_size == 5


def test_eager_base_chunked_equals_single_pass(hash_encoder):
    model = KBLaM.from_base(tiny_model("gemma3", attn="eager"), None, encoder=hash_encoder, null_slot=True)
    ids = _ids()
    with torch.no_grad():
        whole, _, _ = _run(model, ids, None, 0, batch=True)
        chunked, _, _ = _run(model, ids, None, 3, batch=True)
    torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=0)


def test_chunked_gradients_equal_single_pass(hash_encoder):
    grads = []
    for chunk in (0, 3):
        model = wrap("qwen3", hash_encoder, null_slot=True, retrieval_prior=True)
        model.train()
        keys, values, kb_mask = _padded_batch()
        ids = _ids()
        with model.attach_embeddings(keys, values, kb_mask, queries=keys[:, 0], chunk_size=chunk):
            model.base(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.adapter.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=ATOL, rtol=1e-4, msg=name)


def _copy_model(hash_encoder, **options):
    options = {"retrieval_prior": True, "null_slot": True, "copy_values": True, "prior_scale": 1000.0,
               "max_value_tokens": 64, **options}
    model = KBLaM.from_base(tiny_model("llama"), tiny_tokenizer(), encoder=hash_encoder, **options)
    with torch.no_grad():
        model.adapter.copy_gate.bias.fill_(30.0)  # always copy when there is something to copy
        model.adapter.null_bias.fill_(-1e4)
    return model


def test_chunked_generation_copies_like_single_pass(hash_encoder):
    model = _copy_model(hash_encoder)
    kb = random_kb(9)
    prompt = model.tokenizer(["Question: x?", "Who?"], return_tensors="pt", padding=True, padding_side="left")
    outs = []
    for chunk in (0, 2):
        ids = model.value_ids(kb.triples)
        with torch.no_grad(), model.attach_embeddings(
            kb.keys, kb.values, queries=kb.keys[[4, 7]], value_ids=ids, chunk_size=chunk
        ):
            outs.append(model._generate(**prompt, max_new_tokens=10, do_sample=False, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])
    value = model.tokenizer(" " + kb.triples[4].value)["input_ids"]
    assert outs[1][0, prompt["input_ids"].shape[1]:].tolist()[: len(value)] == value


def test_recorder_keeps_one_row_per_question_and_triple(hash_encoder):
    model = wrap("llama", hash_encoder, null_slot=True)
    token_mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1] * 6]).bool()
    with torch.no_grad(), model.attach(random_kb(50), record=model_module.KBAttentionRecorder(token_mask),
                                       chunk_size=8) as recorder:
        model(input_ids=_ids(n=6))
        model(input_ids=_ids(n=1))  # a later call (a generation step) is not recorded
    assert sorted(recorder.per_layer) == model.config.kb_layers
    assert all(p.shape == (2, 51) for p in recorder.per_layer.values())  # 50 triples and the null slot
    assert recorder.scores().shape == (2, 50)
    torch.testing.assert_close(recorder.scores().sum(-1), torch.ones(2))
    null = recorder.null_share()
    assert null.shape == (2,) and bool(((null > 0) & (null < 1)).all())


def test_full_size_shift(hash_encoder):
    model = wrap("llama", hash_encoder, null_slot=True)
    keys, _, mask = _padded_batch()
    bias = model._kb_bias(keys.shape[-2], keys.device, mask, None, full_size=1000)[model.config.kb_layers[0]]
    assert bias.shape == (2, 1, 1, 11)
    valid = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], -1)[:, None, None]
    assert torch.isinf(bias[~valid]).all()
    expected = math.log(100.0) - math.log(1000)
    torch.testing.assert_close(bias[valid][:-1].min(), torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, 0, 0, :3].masked_select(mask[:, :3]), torch.full((3,), expected))


# ---------------------------------------------------------------------------------------- pre-filter

QUESTIONS = ["Who is entity 3?", "What is value 7?"]


def _ask_model(hash_encoder, **options):
    return ask_model("llama", hash_encoder, **options)


def _same_answers(a, b):
    assert [x.text for x in a] == [x.text for x in b]
    for x, y in zip(a, b, strict=True):
        assert [t for t, _ in x.sources] == [t for t, _ in y.sources]
        assert [s for _, s in x.sources] == pytest.approx([s for _, s in y.sources], abs=ATOL)


@pytest.mark.parametrize(
    "options", [{}, {"null_slot": True, "retrieval_prior": True, "copy_values": True}], ids=["paper", "copy"]
)
def test_prefilter_with_k_at_least_m_equals_no_prefilter(options, hash_encoder):
    model = _ask_model(hash_encoder, **options)
    if model.config.copy_values:
        with torch.no_grad():
            model.adapter.copy_gate.bias.fill_(30.0)  # the copy path decides every token
    kb = random_kb(12)
    off = model.ask(QUESTIONS, kb, max_new_tokens=6, prefilter=False)
    assert all(len(a.sources) == 5 for a in off)
    for k in (12, 40):
        _same_answers(model.ask(QUESTIONS, kb, max_new_tokens=6, prefilter=True, prefilter_k=k), off)
    model.prefilter_above, model.prefilter_k = 11, 12  # on by size
    _same_answers(model.ask(QUESTIONS, kb, max_new_tokens=6), off)
    assert model.kb_cache.builds == 1 and model.prefilter_index(kb) is model.prefilter_index(kb)


def test_prefilter_over_a_kb_store(hash_encoder, tmp_path):
    from kblam.store import KBStore

    model = _ask_model(hash_encoder, retrieval_prior=True)
    triples = [Triple(f"thing {j}", "colour", f"shade {j % 7}") for j in range(30)]
    store = KBStore.create(tmp_path / "kb", hash_encoder)
    store.add(triples, progress=False)
    emb = store.embeddings()
    off = model.ask(QUESTIONS, emb, max_new_tokens=5, prefilter=False)
    _same_answers(model.ask(QUESTIONS, store, max_new_tokens=5, prefilter=False), off)
    with pytest.warns(IndexRebuildWarning, match="none is saved"):  # its first use builds the saved index
        _same_answers(model.ask(QUESTIONS, store, max_new_tokens=5, prefilter=True, prefilter_k=30), off)
    small = model.ask("What colour is thing 12?", store, max_new_tokens=3, prefilter=True, prefilter_k=3)
    assert len(small.sources) == 3 and all(t in triples for t, _ in small.sources)


def _kb_with_asked_rows(model, m, asked):
    kb = random_kb(m, seed=5)
    keys = kb.keys.clone()
    keys[list(asked.values())] = model.encoder.encode(list(asked))  # the asked triple's key IS the question
    return KBEmbeddings(kb.triples, keys, kb.values)


def test_small_k_finds_the_asked_triple(hash_encoder):
    model = _ask_model(hash_encoder, retrieval_prior=True, prior_scale=1000.0)
    asked = {"What is the property of entity 37?": 37, "And of entity 150?": 150}
    kb = _kb_with_asked_rows(model, 200, asked)
    model.prefilter_above, model.prefilter_k = 100, 4
    biases = []
    kb_bias = model._kb_bias
    model._kb_bias = lambda *args: biases.append(kb_bias(*args)) or biases[-1]
    answers = model.ask(list(asked), kb, max_new_tokens=2)
    # The candidates keep the full KB's size shift (the prior's cosine comes on top of it).
    no_prior = model.adapter.prior_scale * torch.nn.functional.cosine_similarity(
        model.encoder.encode(list(asked))[:, None], kb.keys[None], dim=-1
    ).topk(4).values
    shift = biases[0][model.config.kb_layers[0]].reshape(2, 4) - no_prior
    torch.testing.assert_close(shift, torch.full((2, 4), math.log(100.0) - math.log(200)), atol=1e-3, rtol=0)
    for answer, row in zip(answers, asked.values(), strict=True):
        assert answer.sources[0][0] == kb.triples[row]
        assert len(answer.sources) == 4  # only the candidates can be sources


def test_prefilter_with_the_copy_path_copies_the_asked_value(hash_encoder):
    model = _ask_model(hash_encoder, retrieval_prior=True, prior_scale=1000.0, null_slot=True, copy_values=True,
                       max_value_tokens=64)
    with torch.no_grad():
        model.adapter.copy_gate.bias.fill_(30.0)
        model.adapter.null_bias.fill_(-1e4)
    asked = {"What is the property of entity 37?": 37, "And the property of entity 150?": 150}
    kb = _kb_with_asked_rows(model, 200, asked)
    values = [f"v{j}" + "x" * (j % 13) for j in range(200)]  # candidate sets differ in value length
    kb = KBEmbeddings(tuple(Triple(t.name, t.property, v) for t, v in zip(kb.triples, values, strict=True)),
                      kb.keys, kb.values)
    answers = model.ask(list(asked), kb, max_new_tokens=20, prefilter=True, prefilter_k=5)
    for answer, row in zip(answers, asked.values(), strict=True):
        assert answer.text.startswith(values[row]), (answer.text, values[row])


def test_prefilter_index_is_cached_per_kb(hash_encoder, monkeypatch, tmp_path):
    from kblam.store import KBStore

    built = []

    class Counting(model_module.KBPrefilter):
        def __init__(self, keys, **kw):
            built.append(len(keys))
            super().__init__(keys, **kw)

    monkeypatch.setattr(model_module, "KBPrefilter", Counting)
    monkeypatch.setattr(index_module, "KBPrefilter", Counting)
    model = _ask_model(hash_encoder)
    kb = random_kb(20)
    for _ in range(2):
        model.ask("Who is entity 1?", kb, max_new_tokens=1, prefilter=True, prefilter_k=5)
    assert built == [20]
    other = random_kb(20, seed=1)
    model.ask("Who is entity 1?", other, max_new_tokens=1, prefilter=True, prefilter_k=5)
    assert built == [20, 20]
    prebuilt = Counting(kb.keys)
    model.ask("Who is entity 1?", kb, max_new_tokens=1, prefilter=prebuilt, prefilter_k=5)
    assert built == [20, 20, 20]

    store = KBStore.create(tmp_path / "kb", hash_encoder)
    store.add(list(kb.triples), progress=False)
    with pytest.warns(IndexRebuildWarning, match="none is saved"):
        for _ in range(2):
            model.ask("Who is entity 1?", store, max_new_tokens=1, prefilter=True, prefilter_k=5)
    assert built[3:] == [20]
    store.add([Triple("new entity", "property", "new value")], progress=False)  # a new generation...
    answer = model.ask("Who is new entity?", store, max_new_tokens=1, prefilter=True, prefilter_k=21)
    assert built[3:] == [20] and len(answer.sources) == 5  # ...is added to the index, not rebuilt
    with KBStore.open(store.path, readonly=True) as reader:  # another process: the saved index, mapped
        again = model.ask("Who is new entity?", reader, max_new_tokens=1, prefilter=True, prefilter_k=21)
        assert "memory-mapped, 1 added since" in repr(reader.prefilter())
    assert built[3:] == [20] and again.sources == answer.sources


def test_ask_records_b_by_m_per_layer(hash_encoder, monkeypatch):
    made = []

    class Keeping(model_module.KBAttentionRecorder):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(model_module, "KBAttentionRecorder", Keeping)
    model = _ask_model(hash_encoder, null_slot=True)
    model.kb_chunk_size = 7
    model.ask(QUESTIONS, random_kb(30), max_new_tokens=3, prefilter=False)
    model.ask(QUESTIONS, random_kb(30), max_new_tokens=3, prefilter=True, prefilter_k=9)
    assert [{tuple(p.shape) for p in r.per_layer.values()} for r in made] == [{(2, 31)}, {(2, 10)}]  # + null


def test_store_from_another_encoder_is_refused(hash_encoder, tmp_path):
    from conftest import HashEncoder

    from kblam.encoder import KBEncoder
    from kblam.store import KBStore

    model = _ask_model(hash_encoder)
    store = KBStore.create(tmp_path / "kb", KBEncoder(HashEncoder(), name="another/encoder"))
    store.add([Triple("a", "b", "c")], progress=False)
    with pytest.raises(ValueError, match="another/encoder"):
        model.ask("Who is a?", store, max_new_tokens=1)


def test_an_approximate_index_that_finds_fewer_candidates(hash_encoder):
    model = _ask_model(hash_encoder)
    kb = random_kb(400)
    index = model_module.KBPrefilter(kb.keys, kind="ivf", nlist=8, nprobe=1)  # ~50 keys per probed list
    _, rows = index.search(model.encoder.encode(QUESTIONS).numpy(), 100)
    assert (rows < 0).any()  # the case under test: slots the index left empty (-1)
    answers = model.ask(QUESTIONS, kb, max_new_tokens=2, prefilter=index, prefilter_k=100, max_sources=100)
    for answer, found in zip(answers, rows, strict=True):
        assert {t for t, _ in answer.sources} <= {kb.triples[j] for j in found[found >= 0]}
        assert len(answer.sources) == (found >= 0).sum()


def _layer_call(states, kb_batch, bias_kind, seed=0):
    """Inputs of one KB layer's attention call: 3 questions of 6 tokens, 6 query heads over 2 KV heads."""
    from torch import nn

    from kblam import attention

    g = torch.Generator().manual_seed(seed)
    b, heads, kv_heads, dim, m, n = 3, 6, 2, 8, 23, attention.FUSED_BIASED_BATCH_TOKENS
    keys = torch.randn(kb_batch, kv_heads, m, dim, generator=g).to(states)
    values = torch.randn(kb_batch, kv_heads, m, dim, generator=g).to(states)
    bias = {"number": -1.25, "shared": torch.randn(1, 1, 1, m, generator=g),
            "per question": torch.randn(b, 1, 1, m, generator=g)}[bias_kind]
    if bias_kind == "per question":
        bias[1] = float("-inf")  # the second question's KB is all padding: it reads its text only
        bias[2, ..., 4:9] = float("-inf")  # read in chunks of 4, a whole chunk
    hidden = torch.randn(b, n, 16, generator=g)
    query, key, value = (torch.randn(b, h, n, dim, generator=g) for h in (heads, kv_heads, kv_heads))
    mask = torch.zeros(b, 1, n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    head = nn.Linear(16, heads * dim)
    with torch.no_grad():
        head.weight.copy_(torch.randn(heads * dim, 16, generator=g) / 4)
        head.bias.zero_()
    recorded = []
    inputs = attention.KBLayerInputs(hidden_states=hidden, query_head=head, keys=keys, values=values, bias=bias,
                                     record=lambda chunks: recorded.extend((s, p.clone()) for s, p in chunks),
                                     chunk_size=5, record_rows=torch.tensor([2, 3, n - 1]))
    return nn.Module().eval(), (query, key, value, mask), inputs, recorded


def _layer_out(states, kb_batch, bias_kind, fused: bool, monkeypatch, prepare=None):
    """One KB layer's call (_layer_call) through _fused_attention's path (fused) or the chunked loop: its output
    and recorded KB attention; `prepare(inputs)` changes the call's inputs first."""
    from kblam import attention

    monkeypatch.setattr(attention, "ENABLE_FUSED", fused)
    module, (query, key, value, mask), inputs, recorded = _layer_call(states, kb_batch, bias_kind)
    if prepare is not None:
        prepare(inputs)
    with torch.no_grad():
        out, _ = attention.rectangular_attention(module, query, key, value, mask, 0.35, kb=inputs)
    return out, torch.cat([p for _, p in recorded], dim=-1)


def _assert_the_same(results, bias_kind, **tol):
    """The two ways' (output, recorded KB attention) alike; the padding's recorded attention 0."""
    (out, probs), (ref_out, ref_probs) = results
    assert torch.isfinite(out).all() and probs.shape == ref_probs.shape == (3, 6, 3, 23)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(probs, ref_probs, **tol)
    if bias_kind == "per question":
        assert not probs[1].any() and not probs[2, ..., 4:9].any()


@pytest.mark.parametrize("states", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kb_batch", [1, 3], ids=["shared KB", "a KB per question"])
@pytest.mark.parametrize("bias_kind", ["number", "shared", "per question"])
@pytest.mark.parametrize("fused_chunk", [4096, 4])
@pytest.mark.parametrize("threads", [1, 2])  # one: the recorded rows' exponentials by kblam.few_rows' kernel
def test_the_fused_kernel_gives_the_chunked_loop(states, kb_batch, bias_kind, fused_chunk, threads, monkeypatch):
    """At inference a chunked call goes through torch's fused CPU kernel: the same output and the same recorded
    KB attention as the chunked loop, with the KB shared or one per question, its bias a number, shared, or
    one per question with padding (a question whose KB is all padding included; over a shared KB, asked
    question by question); the KB read at once or in chunks (a chunk all padding included)."""
    from kblam import attention

    monkeypatch.setattr(attention, "FUSED_CHUNK", fused_chunk)
    monkeypatch.setattr(attention, "FUSED_BFLOAT16", True)  # whatever this CPU has: the kernel is what is tested
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    if fused_chunk < 23:  # the recorded rows' second pass in chunks too (of the call's 5 knowledge tokens)
        monkeypatch.setattr(attention, "RECORD_CHUNK", 1)
    results, calls, inner = [], [], attention._fused_attention
    monkeypatch.setattr(attention, "_fused_attention", lambda *a: calls.append(1) or inner(*a))
    for fused in (True, False):
        calls.clear()
        results.append(_layer_out(states, kb_batch, bias_kind, fused, monkeypatch))
        assert len(calls) == int(fused)
    torch.set_num_threads(before)
    # bfloat16 states: both round the queries and the probabilities to bfloat16 before their products
    tol = {"atol": 1e-5, "rtol": 1e-5} if states == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    _assert_the_same(results, bias_kind, **tol)


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("flash", [True, False], ids=["flash kernel", "flash kernel failed"])
def test_bfloat16_states_take_the_fused_kernel_only_with_amx(amx, threads, flash, monkeypatch):
    """Without AMX torch's fused kernel multiplies bfloat16 slower than oneDNN's products (issue 10, an AMD
    EPYC): a prompt's bfloat16 states take _looped_kb there (oneDNN's products and kblam's softmax kernel, on
    one torch thread; the chunked loop on more), a decoding step's the chunked loop, float32 ones the kernel
    either way; the same result. A torch without the flash kernel (or whose kernel failed) keeps _looped_kb,
    which does not use it."""
    from kblam import attention, few_rows

    calls = []
    for name in ("_flash_kb", "_looped_kb", "_chunked_attention"):
        inner = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, name=name, inner=inner, **kw: calls.append(name) or inner(*a, **kw))
    monkeypatch.setattr(attention, "FUSED_BFLOAT16", amx)
    if not flash:
        monkeypatch.setattr(attention, "_FLASH", None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for states in (torch.bfloat16, torch.float32):
            for tokens in (attention.LOOPED_LEAST_TOKENS, 1):  # a prompt, a decoding step
                calls.clear()
                module, (query, key, value, mask), inputs, _ = _layer_call(states, 1, "shared")
                query, mask, inputs.hidden_states = query[:, :, -tokens:], mask[..., -tokens:, :], \
                    inputs.hidden_states[:, -tokens:]
                inputs.record_rows = None
                with torch.no_grad():
                    out, _ = attention.rectangular_attention(module, query, key, value, mask, 0.35, kb=inputs)
                if states == torch.float32 or amx:
                    expected = "_flash_kb" if flash else "_chunked_attention"
                elif tokens > 1 and threads == 1 and few_rows._load():
                    expected = "_looped_kb"
                else:
                    expected = "_chunked_attention"
                assert calls == [expected] and torch.isfinite(out).all()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kb_batch", [1, 3], ids=["shared KB", "a KB per question"])
@pytest.mark.parametrize("bias_kind", ["number", "shared", "per question"])
@pytest.mark.parametrize("loop_chunk", [4096, 4])
@pytest.mark.parametrize("halves", [False, True])
def test_the_looped_kb_part_gives_the_chunked_loop(kb_batch, bias_kind, loop_chunk, halves, monkeypatch):
    """A prompt over bfloat16 states on a CPU without AMX: oneDNN's products with kblam's softmax kernel between
    them (_looped_kb) give the chunked loop's output and recorded KB attention, the KB shared or one per
    question, its bias a number, shared, or one per question with padding (a question's KB all padding, a
    chunk all padding), read at once or in chunks, on one thread or in halves on two (a half all padding)."""
    pytest.importorskip("numba")
    from kblam import attention, second_thread

    monkeypatch.setattr(attention, "LOOP_CHUNK", loop_chunk)
    monkeypatch.setattr(attention, "LOOP_HALVES_TOKENS", 0 if halves else 10**9)
    started, start = [], second_thread.start
    monkeypatch.setattr(second_thread, "start", lambda job: started.append(1) or start(job))
    monkeypatch.setattr(attention, "FUSED_BFLOAT16", False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    calls, inner = [], attention._looped_kb
    monkeypatch.setattr(attention, "_looped_kb", lambda *a, **kw: calls.append(1) or inner(*a, **kw))
    def prepare(inputs):
        inputs.halves = True
        if bias_kind == "per question" and halves:
            inputs.bias[0, ..., :12] = float("-inf")  # the first question's first half all padding

    results = []
    try:
        for looped in (True, False):
            calls.clear()
            results.append(_layer_out(torch.bfloat16, kb_batch, bias_kind, looped, monkeypatch, prepare))
            assert len(calls) == int(looped)
            assert len(started) == int(looped and halves and loop_chunk < 23)  # in halves: more than one chunk
            started.clear()
    finally:
        torch.set_num_threads(before)
    # both round the queries and the probabilities to bfloat16 before their products: bfloat16's step apart
    _assert_the_same(results, bias_kind, atol=1e-2, rtol=1e-2)


def test_a_failing_fused_kernel_leaves_the_chunked_loop(monkeypatch):
    """A torch whose private fused kernel fails (another signature): one warning, the chunked loop's result,
    and the kernel left alone from then on."""
    from kblam import attention

    module, (query, key, value, mask), inputs, _ = _layer_call(torch.float32, 1, "shared")
    monkeypatch.setattr(attention, "ENABLE_FUSED", False)
    with torch.no_grad():
        expected, _ = attention.rectangular_attention(module, query, key, value, mask, 0.35, kb=inputs)

    def broken(*args, **kwargs):
        raise TypeError("unexpected keyword argument 'attn_mask'")

    monkeypatch.setattr(attention, "ENABLE_FUSED", True)
    monkeypatch.setattr(attention, "_FLASH", broken)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="chunked KB attention serves"):
        out, _ = attention.rectangular_attention(module, query, key, value, mask, 0.35, kb=inputs)
    torch.testing.assert_close(out, expected)
    assert attention._FLASH is None and attention.ENABLE_FUSED
