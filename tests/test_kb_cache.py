"""Issue 10: the KB state cache (kblam.kb_cache), the chunked and batch-folded attention paths, and
the answers they give: the same as projecting the KB afresh on every question."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import random_kb, tiny_tokenizer, wrap

from kblam import attention, kb_cache
from kblam.kb import KnowledgeBase, Triple
from kblam.kb_cache import KBStateCache

QUESTIONS = ["What is the symbol of entity 3?", "Who is entity 7?", "What is value 11?"]


def _kb(m: int = 24) -> KnowledgeBase:
    return KnowledgeBase([Triple(f"entity {j}", "symbol", f"value {j}") for j in range(m)])


def _model(hash_encoder, **options):
    """A tiny model whose span gate quotes whenever the KB attention points somewhere."""
    options = {"retrieval_prior": True, "null_slot": True, "span_kinds": ["value", "fact"], "query_rank": 4,
               **options}
    model = wrap("llama", hash_encoder, **options)
    model.tokenizer = tiny_tokenizer()
    with torch.no_grad():
        model.adapter.span_gate.weight.zero_()
        model.adapter.span_gate.bias.copy_(torch.tensor([0.0, 0.5, -1.0]))
    return model


def _answers(model, kb, questions=QUESTIONS, **kw):
    return model.ask(list(questions), kb, max_new_tokens=8, min_confidence=0.0, **kw)


def _same(got, expected, scores_atol=1e-6):
    for x, y in zip(got, expected, strict=True):
        assert (x.text, x.quoted, x.refused) == (y.text, y.quoted, y.refused)
        assert [t for t, _ in x.sources] == [t for t, _ in y.sources]
        assert [s for _, s in x.sources] == pytest.approx([s for _, s in y.sources], abs=scores_atol)


def _uncached(model, kb, **kw):
    cache, model.kb_cache = model.kb_cache, None
    try:
        return _answers(model, kb, **kw)
    finally:
        model.kb_cache = cache


class _Counting:
    """Counts the triples the adapter projects (its first KB layer's rows)."""

    def __init__(self, model, monkeypatch):
        self.rows = []
        inner = model.adapter.layer_states

        def counting(n, keys, values):
            if n == 0:
                self.rows.append(keys.shape[-2])
            return inner(n, keys, values)

        monkeypatch.setattr(model.adapter, "layer_states", counting)

    def take(self) -> int:
        n, self.rows = sum(self.rows), []
        return n


@pytest.mark.parametrize("null_slot", [True, False])
@pytest.mark.parametrize("m", [0, 1, 7, 9])
def test_the_cache_s_projection_is_the_adapter_s_states(hash_encoder, monkeypatch, m, null_slot):
    """kb_cache.project (PROJECT_ROWS triples and one KB layer at a time, the null slot written once) gives
    adapter.kb_states's keys and values, in the cache's dtype."""
    model = _model(hash_encoder, null_slot=null_slot)
    monkeypatch.setattr(kb_cache, "PROJECT_ROWS", 4)  # 9 triples: three pieces, the last of one
    keys, values = torch.randn(m, model.config.encoder_dim), torch.randn(m, model.config.encoder_dim)
    with torch.no_grad():
        expected = model.adapter.kb_states(keys, values)
    for dtype in (torch.float32, torch.bfloat16):
        got = kb_cache.project(model.adapter, keys, values, dtype)
        assert list(got) == list(expected) == list(model.config.kb_layers)
        for layer, pair in got.items():
            for state, want in zip(pair, expected[layer], strict=True):
                assert state.dtype == dtype and not state.requires_grad
                assert state.shape == want.shape == (1, model.config.num_key_value_heads, m + null_slot,
                                                     model.config.head_dim)
                torch.testing.assert_close(state, want.to(dtype), rtol=1e-5, atol=1e-6)


def test_cached_answers_equal_projecting_every_time(hash_encoder, monkeypatch):
    model = _model(hash_encoder)
    kb = _kb()
    fresh = _uncached(model, kb)
    projected = _Counting(model, monkeypatch)
    first = _answers(model, kb)
    again = _answers(model, kb)
    _same(first, fresh, scores_atol=0)
    _same(again, fresh, scores_atol=0)
    assert projected.take() == len(kb)  # once, not once per ask
    assert model.kb_cache.builds == 1 and model.kb_cache.hits >= 1
    assert any(a.quoted for a in first)  # the comparison covers quoted spans


@pytest.mark.parametrize("edit", ["update", "add", "remove"])
def test_an_edit_projects_only_the_new_triples(edit, hash_encoder, monkeypatch):
    model = _model(hash_encoder)
    kb = _kb()
    _answers(model, kb)
    projected = _Counting(model, monkeypatch)
    encoded_before = hash_encoder.misses
    if edit == "update":
        kb.update("entity 3", "symbol", "Zz")
    elif edit == "add":
        kb.add("entity 99", "symbol", "value 99")
    else:
        kb.remove("entity 5")
    edited = _answers(model, kb)
    assert projected.take() == (0 if edit == "remove" else 1)
    assert hash_encoder.misses - encoded_before == {"update": 1, "add": 2, "remove": 0}[edit]  # new texts only
    assert model.kb_cache.updates == 1 and model.kb_cache.builds == 1
    _same(edited, _uncached(model, kb), scores_atol=1e-5)  # the same answers as a KB projected afresh


def test_the_span_budget_follows_edits_without_a_pass_over_the_kb(hash_encoder):
    model = _model(hash_encoder)
    kb = _kb()
    before = _answers(model, kb)[0] and model.kb_states(kb).derived["longest_span"]
    long_value = "a value much longer than any other in this knowledge base"
    kb.update("entity 3", "symbol", long_value)
    states = model.kb_states(kb)
    assert "longest_span" in states.derived  # carried over, not recomputed from every triple
    assert states.derived["longest_span"] >= len(long_value) + 2 > before
    answer = model.ask("What is the symbol of entity 3?", kb, max_new_tokens=2, min_confidence=0.0)
    assert all(t.value == long_value or t.name != "entity 3" for t in answer.quoted)


@torch.no_grad()  # kb_layers keeps nothing while the adapter could train
def test_an_edit_leaves_the_version_being_read_alone(hash_encoder):
    model = _model(hash_encoder)
    kb = _kb(6)
    before = model.kb_states(kb)
    layers = {layer: (k.clone(), v.clone()) for layer, (k, v) in model.kb_layers(before).items()}
    kb.update("entity 2", "symbol", "changed")
    after = model.kb_states(kb)
    assert after is not before and before.triples[2].value == "value 2" and after.triples[2].value == "changed"
    for layer, (k, v) in model.kb_layers(before).items():  # copy on write: the old version is untouched
        assert torch.equal(k, layers[layer][0]) and torch.equal(v, layers[layer][1])
    for layer, (k, v) in model.kb_layers(after).items():  # the new value, the same key (re-projected alone)
        torch.testing.assert_close(k, layers[layer][0], atol=1e-6, rtol=0)
        assert not torch.allclose(v[:, :, 2], layers[layer][1][:, :, 2])


@torch.no_grad()  # kb_layers keeps nothing while the adapter could train
def test_an_edit_nobody_reads_is_written_in_place(hash_encoder):
    model = _model(hash_encoder)
    kb = _kb(6)
    states = model.kb_states(kb)
    pointers = [k.data_ptr() for k, _ in model.kb_layers(states).values()]
    old_value = model.kb_layers(states)[model.config.kb_layers[0]][1][:, :, 2].clone()
    del states  # no answer reads this version any more
    kb.update("entity 2", "symbol", "changed")
    states = model.kb_states(kb)
    layers = model.kb_layers(states)
    assert [k.data_ptr() for k, _ in layers.values()] == pointers  # the same tensors, nothing copied
    assert not torch.equal(layers[model.config.kb_layers[0]][1][:, :, 2], old_value)
    assert states.triples[2].value == "changed" and model.kb_cache.updates == 1
    _same(_answers(model, kb), _uncached(model, kb), scores_atol=1e-5)


@torch.no_grad()
def test_a_kbs_embeddings_are_the_encoders_kept_vectors_not_a_copy(hash_encoder):
    """Issue 10 (memory per triple): a KnowledgeBase's version reads its key and value embeddings where the
    encoder keeps them, by row number (a fresh KB's keys: a view of the kept block). An edit changes the
    version's row numbers, never a kept vector: the old value's vector still reads right, for the encoder
    and for another KB holding that value."""
    model = _model(hash_encoder)
    kb, twin = _kb(6), _kb(6)
    states = model.kb_states(kb)
    kept = model.encoder._cache
    assert states.keys.vectors is kept and states.values.vectors is kept
    assert states.keys[:].untyped_storage().data_ptr() == kept._blocks[0].untyped_storage().data_ptr()
    old_text = kb.triples[2].value_text(model.config.value_template)
    old_vector = model.encoder.encode([old_text])
    del states
    kb.update("entity 2", "symbol", "changed")
    states = model.kb_states(kb)
    assert model.kb_cache.updates == 1 and model.kb_cache.builds == 1  # written in place: row numbers
    new_text = kb.triples[2].value_text(model.config.value_template)
    assert torch.equal(states.values[2:3].float(), model.encoder.encode([new_text]))
    assert torch.equal(model.encoder.encode([old_text]), old_vector)
    assert torch.equal(model.kb_states(twin).values[2:3].float(), old_vector)
    _same(_answers(model, kb), _uncached(model, kb), scores_atol=1e-5)
    _same(_answers(model, twin), _uncached(model, twin), scores_atol=1e-5)


def test_a_kb_answers_as_its_embeddings_given_as_tensors(hash_encoder):
    """A KnowledgeBase (its embeddings read from the encoder's kept rows) answers exactly as the same KB's
    embeddings handed over as tensors (model.encode_kb: a copy, the caller's to change)."""
    model = _model(hash_encoder)
    kb = _kb(12)
    given = model.encode_kb(kb)
    expected = _answers(model, kb)
    _same(_answers(model, given), expected, scores_atol=0)
    given.keys.zero_()  # the caller's copy: the kept vectors are not touched
    _same(_answers(model, _kb(12)), expected, scores_atol=0)


def test_an_edit_after_the_encoder_forgot_builds_afresh(hash_encoder):
    """encoder.clear() between two versions: the next version's rows are not mixed from two sets of kept
    vectors; it is encoded afresh, and answers as an uncached KB does."""
    model = _model(hash_encoder)
    kb = _kb(6)
    _answers(model, kb)
    model.encoder.clear()
    kb.update("entity 2", "symbol", "changed")
    _same(_answers(model, kb), _uncached(model, kb), scores_atol=1e-5)
    assert model.kb_cache.builds == 2 and model.kb_states(kb).keys.vectors is model.encoder._cache


@torch.no_grad()
@pytest.mark.parametrize("edit", ["update", "add", "remove"])
def test_states_are_kept_token_by_token_through_edits(edit, hash_encoder):
    """The cached KB keys and values are contiguous (kv head, knowledge token, dim): torch's fused attention
    misreads values laid out otherwise (kblam.attention._fused_attention), and edits keep the layout,
    whether written in place or copied."""
    model = _model(hash_encoder)
    kb = _kb(6)
    held = model.kb_states(kb) if edit == "update" else None  # read while editing: copy on write
    for keys, values in model.kb_layers(model.kb_states(kb)).values():
        assert keys.is_contiguous() and values.is_contiguous()
    {"update": lambda: kb.update("entity 2", "symbol", "changed"), "add": lambda: kb.add("entity 9", "symbol", "v"),
     "remove": lambda: kb.remove("entity 4")}[edit]()
    after = model.kb_states(kb)
    assert model.kb_cache.updates == 1
    fresh = model.kb_cache
    model.kb_cache = None
    try:
        expected = model.kb_layers(model.kb_states(kb))
    finally:
        model.kb_cache = fresh
    for layer, (keys, values) in model.kb_layers(after).items():
        assert keys.is_contiguous() and values.is_contiguous()
        torch.testing.assert_close(values, expected[layer][1], atol=1e-6, rtol=0)
    del held


def test_a_changed_adapter_is_projected_again(hash_encoder):
    model = _model(hash_encoder)
    kb = _kb()
    _answers(model, kb)
    with torch.no_grad():
        for p in model.adapter.value_proj.parameters():
            p.mul_(-1.0)  # in place: the parameters' version counters move
    _same(_answers(model, kb), _uncached(model, kb), scores_atol=0)


@torch.no_grad()  # kb_layers keeps nothing while the adapter could train
def test_bounded_by_bytes_least_recently_used_first(hash_encoder):
    model = _model(hash_encoder)
    kbs = [_kb(10), _kb(12), _kb(14)]
    sizes = [model.kb_states(kb).nbytes() for kb in kbs if model.kb_layers(model.kb_states(kb))]
    model.kb_cache = KBStateCache(max_bytes=sizes[0] - 1)
    model.kb_layers(model.kb_states(kbs[0]))
    assert model.kb_cache.nbytes() == 0  # larger than the bound: used, not kept
    model.kb_cache = KBStateCache(max_bytes=sizes[0] + sizes[2] + sizes[1] // 2)
    for kb in (kbs[0], kbs[1], kbs[0], kbs[2]):  # kbs[1] is the least recently used when kbs[2] arrives
        model.kb_layers(model.kb_states(kb))
    kept = sorted(len(entry) for _, _, entry in model.kb_cache._entries.values())
    assert kept == [10, 14] and model.kb_cache.nbytes() <= model.kb_cache.max_bytes


def test_an_entry_goes_with_its_kb(hash_encoder, tmp_path):
    from kblam.store import KBStore

    model = _model(hash_encoder)
    store = KBStore.create(tmp_path / "kb", hash_encoder)
    store.add(list(_kb(6)), progress=False)
    kbs = [_kb(), random_kb(9), store]
    for kb in kbs:
        _answers(model, kb, questions=QUESTIONS[:1])
    assert len(model.kb_cache._entries) == 3
    store.close()
    del kb, kbs, store  # the cache holds them weakly
    gc.collect()
    _answers(model, _kb(5), questions=QUESTIONS[:1])
    assert len(model.kb_cache._entries) == 1


def test_store_generations(hash_encoder, tmp_path, monkeypatch):
    from kblam.store import KBStore

    model = _model(hash_encoder)
    store = KBStore.create(tmp_path / "kb", hash_encoder)
    store.add(list(_kb()), progress=False)
    _answers(model, store)
    projected = _Counting(model, monkeypatch)
    store.update("entity 3", "symbol", "Zz")
    edited = _answers(model, store)
    assert projected.take() == 1
    _same(edited, _uncached(model, store), scores_atol=1e-5)


def test_a_prefiltered_store_edit_reads_no_other_triple(hash_encoder, tmp_path, monkeypatch):
    """A store read through the pre-filter has nothing projected to carry over: its next generation is
    a fresh view, not a diff of every triple (which parsed a million-triple store on every edit)."""
    from kblam.store import KBStore

    model = _model(hash_encoder)
    store = KBStore.create(tmp_path / "kb", hash_encoder)
    store.add(list(_kb()), progress=False)
    _answers(model, store, prefilter=True)
    store.update("entity 3", "symbol", "Zz")
    store.remove("entity 7")

    def every_triple(self):
        raise AssertionError("the cache read every triple of the store")

    with monkeypatch.context() as m:
        m.setattr(KBStore, "triples", every_triple)
        edited = _answers(model, store, prefilter=True)
        version = model.kb_states(store).triples
        assert Triple("entity 3", "symbol", "Zz") in version and all(t.name != "entity 7" for t in version)
    _same(edited, _uncached(model, store, prefilter=True), scores_atol=1e-5)


def test_bfloat16_states(hash_encoder):
    model = _model(hash_encoder)
    kb = _kb(40)
    ids = torch.randint(4, 60, (2, 9))
    with torch.no_grad(), model.attach(kb, questions=QUESTIONS[:2]):
        full = model.base(input_ids=ids).logits
    float32_bytes = model.kb_cache.nbytes()
    model.kb_cache = KBStateCache(dtype=torch.bfloat16)
    with torch.no_grad(), model.attach(kb, questions=QUESTIONS[:2]):
        half = model.base(input_ids=ids).logits
    states = model.kb_states(kb)
    assert {k.dtype for k, _ in states.layers.values()} == {torch.bfloat16}
    layer_bytes = sum(k.nbytes + v.nbytes for k, v in states.layers.values())
    assert model.kb_cache.nbytes() == pytest.approx(float32_bytes - layer_bytes, rel=0.01)  # half the states
    torch.testing.assert_close(half, full, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", [None, 5, 16])  # None: sized to the call's rows
def test_chunked_asks_answer_as_one_pass(chunk, fused, hash_encoder, monkeypatch):
    """Chunked calls (explicit sizes, the adaptive default; torch's fused kernel or the chunked loop, its
    probabilities kept or recomputed for the recorded rows only) give the single pass's answers and sources."""
    model = _model(hash_encoder)
    kb = _kb(40)
    model.kb_chunk_size = 0
    whole = _answers(model, kb), [_answers(model, kb, [q])[0] for q in QUESTIONS]  # a batch, and one at a time
    model.kb_chunk_size = 8192
    monkeypatch.setattr("kblam.model.adaptive_chunk", lambda rows: chunk or max(4, 256 // rows))  # per call
    monkeypatch.setattr(attention, "ENABLE_FUSED", fused)
    calls = []
    for name in ("_chunked_attention", "_fused_attention"):
        inner = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, name=name, inner=inner: calls.append(name) or inner(*a))
    for keep in (attention.KEEP_PROBS, 0):
        monkeypatch.setattr(attention, "KEEP_PROBS", keep)
        _same(_answers(model, kb), whole[0], scores_atol=1e-5)
        _same([_answers(model, kb, [q])[0] for q in QUESTIONS], whole[1], scores_atol=1e-5)
    assert len(calls) >= 2 * len(model.config.kb_layers)
    # fused: a batch's decoding steps, whose questions each bias the KB (the retrieval prior), may still take
    # the chunked loop (attention._fused_fits)
    assert ("_fused_attention" in calls) == fused and (fused or set(calls) == {"_chunked_attention"})


def test_a_batch_sharing_one_kb_reads_it_as_each_question_alone(hash_encoder):
    model = _model(hash_encoder)
    kb = random_kb(30)
    ids = torch.randint(4, 60, (3, 7))
    questions = ["a?", "b?", "c?"]
    with torch.no_grad(), model.attach(kb, questions=questions):
        batch = model.base(input_ids=ids).logits
        step = model.base(input_ids=ids[:, :1]).logits  # one token per row: a decoding step's shape
    for i in range(3):
        with torch.no_grad(), model.attach(kb, questions=questions[i]):
            torch.testing.assert_close(model.base(input_ids=ids[i:i + 1]).logits, batch[i:i + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(model.base(input_ids=ids[i:i + 1, :1]).logits, step[i:i + 1], atol=1e-5,
                                       rtol=0)


def test_training_gradients_reach_the_adapter_through_attach(hash_encoder):
    model = _model(hash_encoder)
    kb = _kb(8)
    model.kb_states(kb)  # cached states must not stand in for the projection autograd needs
    with model.attach(kb, questions=QUESTIONS[:1]):
        model.base(input_ids=torch.randint(4, 60, (1, 6))).logits.sum().backward()
    assert model.adapter.key_proj[str(model.config.kb_layers[0])].weight.grad is not None
    assert model.kb_states(kb).layers is None  # nothing with a graph was kept


def test_asking_while_another_thread_edits(hash_encoder):
    """Each answer reads one consistent version: no errors, and what it quotes was in the KB at some point."""
    import threading

    model = _model(hash_encoder)
    kb = _kb(12)
    written = {t.value for t in kb}
    errors, stop = [], threading.Event()

    def edit():
        for i in range(40):
            value = f"edited {i}"
            written.add(value)
            kb.update("entity 3", "symbol", value)
        stop.set()

    def ask():
        try:
            while not stop.is_set():
                for answer in _answers(model, kb, questions=QUESTIONS[:1]):
                    assert all(t.value in written for t in answer.quoted)
        except Exception as error:  # noqa: BLE001 - the test counts every failure
            errors.append(repr(error))

    threads = [threading.Thread(target=ask), threading.Thread(target=edit)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _same(_answers(model, kb), _uncached(model, kb), scores_atol=1e-5)


def test_one_encoder_call_per_question_when_it_names_an_entity(hash_encoder):
    """ask encodes the question and the guess of what the confidence reads (the question without the
    entity's name) at once; after an edit the new entity's name is known without a pass over the KB."""
    model = _model(hash_encoder)
    kb = _kb()
    calls = []
    inner = hash_encoder.model.encode  # what reaches the encoder's model: texts not cached yet
    hash_encoder.model.encode = lambda texts, **kw: calls.append(list(texts)) or inner(texts, **kw)
    model.ask("What is the symbol of entity 3?", kb, max_new_tokens=2, min_confidence=0.0)
    asked = [texts for texts in calls if "What is the symbol of entity 3?" in texts]
    assert asked == [["What is the symbol of entity 3?", "What is the symbol of ?"]]  # guessed and encoded with it
    kb.add(Triple("Fresh Entity", "symbol", "Fx"))
    assert "fresh" in model.kb_states(kb).derived["entity_names"]  # merged from the edit's triples


def test_the_kbs_property_names_are_encoded_with_its_first_question(hash_encoder):
    """The confidence's property match reads the best entity's property names: encoded once per KB
    version, and an edit's new property with the next question, not each at question time."""
    model = _model(hash_encoder)
    kb = _kb()
    kb.add(Triple("entity 1", "atomic number", "1"))
    model.ask("What is the symbol of entity 3?", kb, max_new_tokens=2, min_confidence=0.0)
    assert "symbol" in hash_encoder and "atomic number" in hash_encoder
    kb.add(Triple("entity 2", "discoverer", "Someone"))
    model.ask("What is the symbol of entity 3?", kb, max_new_tokens=2, min_confidence=0.0)
    assert "discoverer" in hash_encoder
    assert model.kb_states(kb).derived["properties_encoded"] >= 3
