"""The pre-filter index saved in a KBStore (issue 14): used memory-mapped by every process, kept current
across edits without a rebuild, and rebuilt, said once, never used, when missing, damaged or stale."""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings

import pytest
from conftest import ask_model

from kblam.kb import Triple
from kblam.prefilter import KBPrefilter
from kblam.store import KBStore, KBStoreError
from kblam.store import index as index_module
from kblam.store.index import IndexRebuildWarning

QUESTIONS = ["What colour is thing 12?", "What colour is thing 47?", "Which shade has thing 3?"]


def things(n: int, start: int = 0) -> list[Triple]:
    return [Triple(f"thing {j}", "colour", f"shade {j % 7}") for j in range(start, start + n)]


@pytest.fixture
def model(hash_encoder):
    model = ask_model("llama", hash_encoder, retrieval_prior=True)
    model.prefilter_above, model.prefilter_k = 10, 8  # every store here is pre-filtered
    return model


@pytest.fixture
def store_path(tmp_path, hash_encoder, model):
    path = tmp_path / "kb"
    with KBStore.create(path, hash_encoder) as store:
        store.add(things(60), progress=False)
    with pytest.warns(IndexRebuildWarning, match="none is saved"):
        answers(model, path)  # the first use builds and saves it
    return path


def answers(model, path, **kw) -> list[tuple[str, list[Triple]]]:
    """Ask through a fresh read-only store, as `kblam ask --kb STORE` does."""
    with KBStore.open(path, readonly=True) as store:
        return [(a.text, [t for t, _ in a.sources]) for a in model.ask(QUESTIONS, store, max_new_tokens=4, **kw)]


def fresh_answers(model, store) -> list[tuple[str, list[Triple]]]:
    """The same questions with an exact index built here and now from the store's keys."""
    index = KBPrefilter(store.key_matrix(), kind="exact")
    return [(a.text, [t for t, _ in a.sources])
            for a in model.ask(QUESTIONS, store, max_new_tokens=4, prefilter=index)]


def rewrite(path, data: bytes) -> None:
    """Replace a file as another process would (a new inode), so this process's checks see it anew."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def saved(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("prefilter-"))


@pytest.fixture
def count_builds(monkeypatch):
    built = []

    class Counting(KBPrefilter):
        def __init__(self, keys, **kw):
            built.append(len(keys))
            super().__init__(keys, **kw)

    monkeypatch.setattr(index_module, "KBPrefilter", Counting)
    return built


def test_saved_index_is_mapped_and_kept_current_without_rebuilds(model, store_path, hash_encoder, count_builds,
                                                                 monkeypatch):
    assert saved(store_path) == ["prefilter-00000001.faiss", "prefilter-00000001.json"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid saved index is used silently
        with KBStore.open(store_path, readonly=True) as reader:
            pre = reader.prefilter()
            assert pre.kind == "exact" and "memory-mapped, 0 added since" in repr(pre)
            assert fresh_answers(model, reader) == answers(model, store_path)

        with KBStore.open(store_path, hash_encoder) as writer:
            writer.update("thing 12", "colour", "ultramarine")
            writer.remove("thing 47")
            writer.add(things(5, start=60), progress=False)
            writer.add([("thing 3", "colour", "vermilion")], progress=False)
            assert saved(store_path)[0] == "prefilter-00000001.faiss"  # edits do not rewrite it
            with KBStore.open(store_path, readonly=True) as reader:
                assert answers(model, store_path) == fresh_answers(model, reader)
                pre = reader.prefilter()
                assert "memory-mapped, 7 added since" in repr(pre) and pre.ntotal == len(reader) == 64
                # A key text is its own best match (HashEncoder): each asked row comes first, as edited.
                asked = [f"The colour of thing {j}" for j in (12, 47, 3, 64)]
                _, rows = pre.search(hash_encoder.encode(asked), 3)
                top = [reader.triples()[r] for r in rows[:, 0]]
                assert top[0] == Triple("thing 12", "colour", "ultramarine") and top[1].name != "thing 47"
                assert top[2:] == [Triple("thing 3", "colour", "vermilion"), Triple("thing 64", "colour", "shade 1")]
                assert all(len(set(r)) == 3 for r in rows.tolist())  # replaced rows are skipped, not repeated

            monkeypatch.setattr(index_module, "REFRESH_ROWS", 5)  # many rows added since the save:
            writer.add(things(6, start=100), progress=False)  # the writer saves them into a new file
            assert saved(store_path) == ["prefilter-00000006.faiss", "prefilter-00000006.json"]
            record = json.loads((store_path / "prefilter-00000006.json").read_text())
            assert record["rows"] == 60 + 1 + 5 + 1 + 6 and record["keys_file"] == "keys-00000000.f16"
            with KBStore.open(store_path, readonly=True) as reader:
                assert "memory-mapped, 0 added since" in repr(reader.prefilter())
                assert answers(model, store_path) == fresh_answers(model, reader)
            assert count_builds == []  # nothing was rebuilt

            writer.compact()  # new physical rows: the index is rebuilt for the new keys file
            assert count_builds == [len(writer)]
            assert saved(store_path) == ["prefilter-00000007.faiss", "prefilter-00000007.json"]
            with KBStore.open(store_path, readonly=True) as reader:
                assert index_module.status(reader).startswith("prefilter-00000007.faiss: exact, 70 key rows")
                assert answers(model, store_path) == fresh_answers(model, reader)


def _damage(store_path, model, hash_encoder, how: str) -> None:
    faiss_file, record = store_path / "prefilter-00000001.faiss", store_path / "prefilter-00000001.json"
    data = faiss_file.read_bytes()
    if how == "deleted":
        faiss_file.unlink()
    elif how == "truncated":
        rewrite(faiss_file, data[: len(data) // 2])
    elif how == "flipped byte":
        flipped = bytearray(data)
        flipped[-100] ^= 0x01
        rewrite(faiss_file, bytes(flipped))
    elif how == "record":
        rewrite(record, b"{not json")
    elif how == "another generation":  # an index of the rows as they were before a compaction
        kept = {p.name: p.read_bytes() for p in (faiss_file, record)}
        with KBStore.open(store_path, hash_encoder) as writer:
            writer.remove("thing 0")
            writer.add([("thing 0", "colour", "shade 0")], progress=False)
            writer.compact()  # the saved index is rebuilt here; the old one comes back below
        for name in saved(store_path):
            (store_path / name).unlink()
        for name, content in kept.items():
            (store_path / name).write_bytes(content)
    elif how == "another store":
        other = store_path.parent / "other"
        with KBStore.create(other, hash_encoder) as store, pytest.warns(IndexRebuildWarning):
            store.add(things(60, start=1000), progress=False)
            store.prefilter()
        for name in saved(other):
            rewrite(store_path / name, (other / name).read_bytes())
        shutil.rmtree(other)


@pytest.mark.parametrize("how", ["deleted", "truncated", "flipped byte", "record", "another generation",
                                 "another store"])
def test_a_missing_damaged_or_stale_index_is_rebuilt_and_said_once(model, store_path, hash_encoder, how):
    _damage(store_path, model, hash_encoder, how)
    with KBStore.open(store_path, readonly=True) as reader:
        expected = fresh_answers(model, reader)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = answers(model, store_path)
        second = answers(model, store_path)  # a new store object: the rebuilt index was saved
    said = [str(w.message) for w in caught if issubclass(w.category, IndexRebuildWarning)]
    assert len(said) == 1 and "building the pre-filter index over" in said[0], said
    reason = {"deleted": "prefilter-00000001.faiss is missing", "truncated": "truncated", "flipped byte": "does not match its checksum",
              "record": "prefilter-00000001: ", "another generation": "compacted or rebuilt since",
              "another store": "fingerprint does not match"}[how]
    assert reason in said[0], said
    assert first == second == expected
    with KBStore.open(store_path, readonly=True) as reader:
        assert index_module.status(reader).startswith(f"prefilter-{reader.generation:08d}.faiss: exact")


def test_a_damaged_key_row_is_an_error_not_an_answer(model, store_path):
    keys = store_path / "keys-00000000.f16"
    data = bytearray(keys.read_bytes())
    data[12 * 24 * 2 + 4] ^= 0x08  # the key of thing 12, which the first question retrieves
    rewrite(keys, bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the damage is the error, not a stale-index warning
        with pytest.raises(KBStoreError, match="keys-00000000.f16: rows 0-59 do not match their checksums"):
            answers(model, store_path)


def test_a_store_path_is_a_kb(model, store_path, hash_encoder):
    """ask() reads a store folder given as a path, through one cached read-only store per folder."""
    with KBStore.open(store_path, readonly=True) as reader:
        expected = fresh_answers(model, reader)
    got = [(a.text, [t for t, _ in a.sources]) for a in model.ask(QUESTIONS, str(store_path), max_new_tokens=4)]
    assert got == expected
    again = model.ask(QUESTIONS[0], store_path, max_new_tokens=4)
    assert (again.text, [t for t, _ in again.sources]) == expected[0]
    assert KBStore.shared(store_path) is KBStore.shared(str(store_path))  # one per folder and thread
    other: list = []
    thread = threading.Thread(target=lambda: other.append(KBStore.shared(store_path)))
    thread.start()
    thread.join()
    assert other[0] is not KBStore.shared(store_path) and len(other[0]) == 60

    with KBStore.open(store_path, hash_encoder) as writer:  # another writer changes the store:
        writer.update("thing 12", "colour", "ultramarine")  # the shared reader moves to it
    with KBStore.open(store_path, readonly=True) as reader:
        expected = fresh_answers(model, reader)
    got = [(a.text, [t for t, _ in a.sources]) for a in model.ask(QUESTIONS, store_path, max_new_tokens=4)]
    assert got == expected and KBStore.shared(store_path).get("thing 12", "colour").value == "ultramarine"
    empty = store_path.parent / "empty"
    empty.mkdir()
    with pytest.raises(KBStoreError, match="manifest.json is missing"):
        model.ask(QUESTIONS[0], str(empty), max_new_tokens=1)
