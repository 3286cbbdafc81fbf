"""The entity names a KBStore keeps beside its data (kblam.store.names): what lets a question over a store
be encoded in one call, as over a KnowledgeBase. Saved, loaded, kept current across edits, rebuilt when
it cannot be used, and never a reason for an answer to change."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import ask_model

from kblam.confidence import entity_names, masked_guess
from kblam.kb import Triple
from kblam.store import KBStore, files
from kblam.store import core as store_core
from kblam.store import names as names_module
from kblam.store.names import NameIndex


def people(n: int, start: int = 0) -> list[Triple]:
    return [Triple(f"Person {j} Smith", "birthplace", f"town {j % 5}") for j in range(start, start + n)]


@pytest.fixture
def store_path(tmp_path, hash_encoder, monkeypatch):
    monkeypatch.setattr(store_core, "BLOCK_ROWS", 8)  # small blocks: the saved file covers whole ones
    path = tmp_path / "kb"
    with KBStore.create(path, hash_encoder) as store:
        store.add(people(30) + [Triple("Marie Curie", "field", "physics"), Triple("the Isle of Man", "capital", "Douglas")],
                  progress=False)
        names_module.build(store)  # as `kblam kb index` does
    return path


def saved(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("names-"))


QUESTIONS = ["Where was Person 7 Smith born?", "What field did marie curie work in?", "Capital of the isle of man?",
             "Where was Person 70 Smith born?", "Who is Person Smith?", "Tell me about Curie.", "What is a town?"]


def test_guesses_match_the_knowledge_base_names_and_the_file_is_saved(store_path):
    with KBStore.open(store_path, readonly=True) as store:
        index = store.entity_names()
        expected = entity_names(store.triples())
        for q in QUESTIONS:
            assert masked_guess(q, index) == masked_guess(q, expected), q
    assert masked_guess(QUESTIONS[1], index) == "What field did  work in?"
    assert "person 7 smith" in index and "person 70 smith" not in index and "curie" not in index
    assert saved(store_path) == ["names-00000001.json", "names-00000001.npz"]
    record = json.loads((store_path / "names-00000001.json").read_text())
    assert record["rows"] == 32 and record["triples_file"] == "triples-00000000.jsonl"  # 4 blocks of 8
    assert record["properties"] == ["birthplace", "capital", "field"]


def test_a_saved_index_is_loaded_without_reading_the_triples_and_follows_edits(store_path, hash_encoder, monkeypatch):
    with KBStore.open(store_path, readonly=True) as store:
        store.entity_names()  # built and saved

    read = []
    real = files._Lines.stream

    def counting(self, start=0, stop=None):
        rows = list(real(self, start, stop))
        read.append(len(rows))
        return iter(rows)

    monkeypatch.setattr(files._Lines, "stream", counting)
    with KBStore.open(store_path, hash_encoder) as writer:
        assert "marie curie" in writer.entity_names() and read == []  # loaded: no row parsed
        writer.add([Triple("Ada Lovelace", "occupation", "mathematician")], progress=False)
        writer.update("Person 3 Smith", "birthplace", "town 9")
        writer.remove("Marie Curie")
        index = writer.entity_names()
        assert "ada lovelace" in index and read == [2]  # the two rows appended since, no more
        assert index.properties == {"birthplace", "capital", "field", "occupation"}
        # A removed entity's name stays (a guess that names it only misses).
        assert "marie curie" in index

    with KBStore.open(store_path, readonly=True) as reader:  # another process: the saved rows, then the tail
        assert "ada lovelace" in reader.entity_names() and read[-1] == 2

    monkeypatch.setattr(names_module, "REFRESH_ROWS", 4)
    with KBStore.open(store_path, hash_encoder) as writer:
        writer.add(people(20, start=100), progress=False)
        assert "person 119 smith" in writer.entity_names()  # loaded, tail past the refresh line: saved anew
    assert saved(store_path) == ["names-00000005.json", "names-00000005.npz"]
    assert json.loads((store_path / "names-00000005.json").read_text())["rows"] == 48  # 54 rows: 6 blocks
    with KBStore.open(store_path, hash_encoder) as writer:
        read.clear()
        index = writer.entity_names()
        assert "person 105 smith" in index and "ada lovelace" in index and read == [6]
        writer.compact()  # a new triples file: the old index is deleted, built anew when next used
        assert saved(store_path) == []
        assert "person 105 smith" in writer.entity_names() and "marie curie" not in writer.entity_names()


@pytest.mark.parametrize("how", ["deleted", "flipped byte", "record", "another store"])
def test_an_index_that_cannot_be_used_is_rebuilt(store_path, hash_encoder, tmp_path, how):
    with KBStore.open(store_path, readonly=True) as store:
        store.entity_names()
    npz, record = store_path / "names-00000001.npz", store_path / "names-00000001.json"
    if how == "deleted":
        npz.unlink()
    elif how == "flipped byte":
        data = bytearray(npz.read_bytes())
        data[-30] ^= 0x01
        npz.unlink()
        npz.write_bytes(bytes(data))
    elif how == "record":
        record.write_text("{not json")
    else:
        other = tmp_path / "other"
        with KBStore.create(other, hash_encoder) as store:
            store.add(people(40, start=500), progress=False)
            store.entity_names()
        for name in ("names-00000001.npz", "names-00000001.json"):
            os.replace(other / name, store_path / name)
    with KBStore.open(store_path, readonly=True) as store:
        index = store.entity_names()
        assert "person 7 smith" in index and "marie curie" in index and "person 507 smith" not in index


def test_name_index_reads_like_the_names_dict():
    index = NameIndex.of([Triple("Jean-Paul Sartre", "born", "1905"), Triple("the Hague", "country", "NL"),
                          Triple("Ünal Ak", "born", "1970")])
    assert index.get("the") is index and index.get("hague") is None
    assert "jean paul sartre" in index and index["the hague"] == "the hague" and "ünal ak" in index
    with pytest.raises(KeyError):
        index["the"]
    index.add([Triple("New Name", "field", "x")], 3)
    names, firsts, row_keys, rows = index.arrays()
    assert "new name" in NameIndex(names, firsts) and len(names) == 4
    assert index.rows_of("New Name") == [3] and index.rows_of("the Hague") == [1] and index.rows_of("Hague") == []
    assert NameIndex(names, firsts, (), row_keys, rows).rows_of("Ünal Ak") == [2]
    assert index.properties == {"born", "country", "field"}
    index.add((Triple(f"thing {j}", f"property {j}", "x") for j in range(names_module.PROPERTIES_KEPT)), 4)
    assert index.properties is None  # too many to encode with a KB's first question


def test_a_question_over_a_store_is_encoded_once(store_path, hash_encoder):
    """The question and its guess go to the encoder together; the confidence finds its text cached. The
    answer is the one asked without the index (two encoder calls)."""
    model = ask_model("llama", hash_encoder, retrieval_prior=True)
    model.prefilter_above, model.prefilter_k = 10, 8
    calls = []
    real = hash_encoder.model.encode
    hash_encoder.model.encode = lambda texts, **kw: calls.append(list(texts)) or real(texts, **kw)
    question = "Where was Person 7 Smith born?"
    with KBStore.open(store_path, readonly=True) as store:
        with pytest.warns(UserWarning, match="building the pre-filter index"):  # and the name index
            model.ask("What is the birthplace of Person 3 Smith?", store, max_new_tokens=2)
        assert all(p in hash_encoder for p in ("birthplace", "capital", "field"))  # with the first question
        calls.clear()
        guessed = model.ask(question, store, max_new_tokens=2)
        assert len(calls) == 1 and "Where was  born?" in calls[0], calls

        hash_encoder._recent.clear()
        store.entity_names = dict  # no names: as before the index
        calls.clear()
        unguessed = model.ask(question, store, max_new_tokens=2)
        assert len(calls) == 2 and calls[1] == ["Where was  born?"], calls  # the properties were kept
    assert (guessed.text, guessed.confidence, guessed.sources) == (unguessed.text, unguessed.confidence,
                                                                   unguessed.sources)
    assert guessed.sources


def test_edits_of_a_large_store_read_the_rows_of_the_names_they_touch(tmp_path, hash_encoder, monkeypatch):
    """Above SLOT_MAP_ROWS an update, a removal, a small add, get() and index_of() find their triples through
    the name index, never reading every triple, and leave the store as the slot map's path does."""
    edits = [("update", "Person 3 Smith", "birthplace", "town 9"), ("remove", "Person 4 Smith", None),
             ("add", [Triple("Person 5 Smith", "birthplace", "elsewhere"), Triple("Ada", "field", "maths")]),
             ("update", "Person 5 Smith", "birthplace", "back home"), ("remove", "Person 6 Smith", "birthplace"),
             ("add", [Triple("Person 4 Smith", "birthplace", "returned")])]
    full_reads, counting = [], [False]
    real_all, real_map = files._Lines.all, store_core._State.read_slot_map
    monkeypatch.setattr(files._Lines, "all", lambda self: (counting[0] and full_reads.append("all")) or real_all(self))
    monkeypatch.setattr(store_core._State, "read_slot_map",
                        lambda self: (counting[0] and full_reads.append("map")) or real_map(self))

    def edited(path, lazy: bool) -> list[Triple]:
        monkeypatch.setattr(store_core, "SLOT_MAP_ROWS", 0 if lazy else 10**9)
        with KBStore.create(path, hash_encoder) as store:
            store.add(people(30), progress=False)
        with KBStore.open(path, hash_encoder) as store:
            counting[0] = True
            for op, *args in edits:
                getattr(store, op)(*args, **({"progress": False} if op == "add" else {}))
            with pytest.raises(KeyError):
                store.update("Person 4 Smith", "height", "tall")
            with pytest.raises(KeyError):
                store.remove("Nobody")
            assert store.get("Person 5 Smith", "birthplace").value == "back home"
            assert store.index_of("Ada", "field") == len(store) - 2 and store.get("Person 6 Smith", "birthplace") is None
            counting[0] = False
            return store.triples()

    expected = edited(tmp_path / "map", lazy=False)
    assert "map" in full_reads  # the slot map's path reads every triple
    full_reads.clear()
    assert edited(tmp_path / "lazy", lazy=True) == expected and full_reads == []
    with KBStore.open(tmp_path / "lazy", readonly=True) as reader:  # as the next process reads it
        assert reader.triples() == expected


def test_the_server_checks_the_store_and_loads_its_names_when_it_starts(store_path, hash_encoder, monkeypatch):
    from kblam.serve.kbservice import KBService

    service = KBService(store_path, hash_encoder)
    try:
        hashed = []
        real = files.hashlib.sha256

        def sha256(data=b""):
            if sys._getframe(1).f_code.co_name == "_check_blocks":
                hashed.append(len(data))
            return real(data)

        monkeypatch.setattr(files.hashlib, "sha256", sha256)
        reader = service.reader()
        keys, values, _ = reader.view()
        keys[[0, 9, 31]], values[[3, 30]]
        assert hashed == []  # every block was checked when the service started
        assert service._writer._names is not None and "marie curie" in service._writer.entity_names()
    finally:
        service.close()
