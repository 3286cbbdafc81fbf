"""KBStore: round trips, re-encoding only what changed, crash safety, damage detection, concurrency."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HashEncoder

import kblam.store.core as store_module
from kblam.encoder import KBEncoder
from kblam.kb import KnowledgeBase, Triple
from kblam.store import KBStore, KBStoreError

TESTS = Path(__file__).parent
F16 = dict(atol=2e-3, rtol=1e-2)  # float16 storage of unit-norm vectors


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny checksum blocks and batches, so a few dozen triples span several of each."""
    monkeypatch.setattr(store_module, "BLOCK_ROWS", 8)
    monkeypatch.setattr(store_module, "BATCH_SIZE", 16)


def counting_encoder(name: str = "test/hash-encoder", dim: int = 24) -> tuple[KBEncoder, HashEncoder]:
    raw = HashEncoder(dim)
    return KBEncoder(raw, name=name), raw


def facts(n: int, tag: str = "") -> list[Triple]:
    return [Triple(f"entity {i}{tag}", f"property {i % 3}", f"value {i}{tag}") for i in range(n)]


def assert_matches_encoder(store: KBStore, rows: list[int] | None = None) -> None:
    """Stored rows equal a fresh encoding of their texts, to float16 precision."""
    fresh = KBEncoder(HashEncoder(store.dim), name=store.encoder_name)
    emb = store.embeddings()
    assert emb.triples == tuple(store.triples())
    assert emb.keys.dtype == emb.values.dtype == torch.float16  # copies of the rows as kept, not widened
    rows = list(range(len(emb))) if rows is None else rows
    if not rows:
        return
    expected = fresh.encode_kb([emb.triples[r] for r in rows], store.key_template, store.value_template)
    torch.testing.assert_close(emb.keys[rows], expected.keys, **F16)
    torch.testing.assert_close(emb.values[rows], expected.values, **F16)


# ---------------------------------------------------------------------------------------- round trips


def test_round_trip(tmp_path, small_blocks):
    encoder, _ = counting_encoder()
    path = tmp_path / "kb"
    with KBStore.create(path, encoder) as store:
        assert len(store) == 0 and store.triples() == []
        assert store.embeddings().keys.shape == (0, 24) and store.key_matrix().shape == (0, 24)
        added = store.add([Triple("gold", "symbol", "Au"), ("iron", "symbol", "Fe"),
                           {"name": "gold", "property": "atomic number", "value": 79}])
        assert added == 3
        assert store.add(facts(40)) == 40
        assert store.add([("gold", "symbol", "Au")]) == 0  # exact duplicate: nothing to do
        assert store.generation == 2
    assert sorted(p.name for p in path.iterdir()) == [
        "keys-00000000.f16", "manifest.json", "triples-00000000.jsonl", "values-00000000.f16", "writer.lock"]

    reader = KBStore.open(path, readonly=True)
    expected = [Triple("gold", "symbol", "Au"), Triple("iron", "symbol", "Fe"), Triple("gold", "atomic number", "79"),
                *facts(40)]
    assert reader.triples() == expected and list(reader) == expected and len(reader) == 43
    assert reader.get(" gold ", "symbol") == Triple("gold", "symbol", "Au") and reader.get("gold", "colour") is None
    assert ("iron", "symbol", "Fe") in reader and ("iron", "symbol", "Cu") not in reader
    assert reader.index_of("iron", "symbol") == 1
    assert reader.to_kb() == KnowledgeBase(expected)
    assert_matches_encoder(reader)
    keys = reader.key_matrix()
    assert isinstance(keys, np.memmap) and keys.dtype == np.float16 and keys.shape == (43, 24)
    assert not keys.flags.writeable
    np.testing.assert_array_equal(keys.astype(np.float32), reader.embeddings().keys.numpy())
    reader.verify()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["count"] == 43 and manifest["dim"] == 24 and manifest["dtype"] == "float16"
    assert manifest["encoder"] == "test/hash-encoder" and manifest["key_template"] == "The {property} of {name}"
    assert len(manifest["files"]["keys"]["blocks"]) == 6  # ceil(43 / 8)
    with pytest.raises(KBStoreError, match="read-only"):
        reader.add([("a", "b", "c")])
    reader.close()
    with pytest.raises(KBStoreError, match="closed"):
        len(reader)


def test_update_remove_compact(tmp_path, small_blocks):
    encoder, _ = counting_encoder()
    store = KBStore.create(tmp_path / "kb", encoder)
    store.add(facts(20))
    store.update("entity 3", "property 0", "new value")
    assert store.triples()[3] == Triple("entity 3", "property 0", "new value")  # index kept
    assert store.add([("entity 5", "property 2", "another"), ("entity 5", "property 2", "another")]) == 1
    assert store.triples()[5].value == "another"
    assert store.remove("entity 7") == 1 and store.remove("entity 8", "property 2") == 1
    assert len(store) == 18 and store.triples()[7] == facts(20)[9]  # later rows shift down
    with pytest.raises(KeyError, match="nothing to remove"):
        store.remove("entity 7")
    with pytest.raises(KeyError, match="use add"):
        store.update("entity 99", "property 0", "x")
    expected = store.triples()
    assert_matches_encoder(store)
    keys = store.key_matrix()
    assert not isinstance(keys, np.memmap)  # rows changed since the last compaction: gathered
    np.testing.assert_array_equal(keys.astype(np.float32), store.embeddings().keys.numpy())
    store.verify()

    store.remove("entity 3", "property 0")  # an updated row, then removed
    expected.remove(Triple("entity 3", "property 0", "new value"))
    before = store.embeddings()
    assert any(p.name.startswith("overlay-") for p in store.path.iterdir())
    store.compact()
    assert store.triples() == expected and isinstance(store.key_matrix(), np.memmap)
    torch.testing.assert_close(store.embeddings().keys, before.keys, rtol=0, atol=0)
    assert sorted(p.name for p in store.path.iterdir()) == [
        "keys-00000007.f16", "manifest.json", "triples-00000007.jsonl", "values-00000007.f16", "writer.lock"]
    store.add([("entity 3", "property 0", "back")])
    store.close()
    with KBStore.open(store.path, readonly=True) as again:
        assert again.triples() == [*expected, Triple("entity 3", "property 0", "back")]
        assert_matches_encoder(again)
        again.verify()


def test_only_changed_texts_are_encoded(tmp_path):
    encoder, raw = counting_encoder()
    path = tmp_path / "kb"
    with KBStore.create(path, encoder) as store:
        store.add([("gold", "symbol", "Au"), ("iron", "symbol", "Fe"), ("gold", "atomic number", "79")])
        assert sorted(raw.calls) == sorted(["The symbol of gold", "Au", "The symbol of iron", "Fe",
                                            "The atomic number of gold", "79"])
        raw.calls.clear()
        store.update("gold", "symbol", "Gold!")
        assert raw.calls == ["Gold!"]  # one value text; the key row is copied
        store.add([("iron", "symbol", "Fe"), ("gold", "symbol", "Gold!")])
        assert raw.calls == ["Gold!"]  # nothing new
        store.add([("copper", "atomic number", "79")])
        assert raw.calls == ["Gold!", "The atomic number of copper"]  # "79" is already stored
        store.add([("tin", "symbol", "Sn"), ("lead", "symbol", "Sn")])
        assert raw.calls[2:] == ["The symbol of tin", "Sn", "The symbol of lead"]  # de-duplicated
        assert_matches_encoder(store)

    fresh_encoder, fresh_raw = counting_encoder()  # a new process: empty KBEncoder cache
    with KBStore.open(path, fresh_encoder) as store:
        store.update("iron", "symbol", "Ferrum")
        assert fresh_raw.calls == ["Ferrum"]
        assert_matches_encoder(store)


def test_templates_are_stored_and_used(tmp_path):
    encoder, raw = counting_encoder()
    with KBStore.create(tmp_path / "kb", encoder, key_template="{name}, {property}: {value}",
                        value_template="{property} = {value}") as store:
        store.add([("gold", "symbol", "Au")])
        store.update("gold", "symbol", "Gold")
        assert raw.calls == ["gold, symbol: Au", "symbol = Au", "gold, symbol: Gold", "symbol = Gold"]
        assert_matches_encoder(store)  # the key holds the value here, so an update re-encodes it too
    with KBStore.open(tmp_path / "kb", readonly=True) as store:
        assert store.key_template == "{name}, {property}: {value}" and store.value_template == "{property} = {value}"
    with pytest.raises(ValueError, match="not a template"):
        KBStore.create(tmp_path / "other", encoder, key_template="The {colour} of {name}")


def test_add_inputs_and_conflicting_values(tmp_path, small_blocks):
    encoder, _ = counting_encoder()
    store = KBStore.create(tmp_path / "kb", encoder)
    many = [(f"e{i % 20}", "p", f"v{i}") for i in range(50)]  # each pair several times, across batches
    with pytest.warns(UserWarning, match="20 .* several values in one add"):
        assert store.add(iter(many)) > 20
    assert store.triples() == [Triple(f"e{i}", "p", f"v{i + 40 if i < 10 else i + 20}") for i in range(20)]
    with pytest.raises(Exception, match="item 2"):
        store.add([("ok", "p", "v"), ("broken",)])
    with pytest.raises(Exception, match="empty 'value'"):
        store.add([{"name": "a", "property": "b", "value": " "}])
    assert len(store) == 20  # a failed add commits nothing, not even its valid first items
    assert_matches_encoder(store)


def test_encoder_checks_and_writer_lock(tmp_path):
    encoder, _ = counting_encoder()
    path = tmp_path / "kb"
    KBStore.create(path, encoder).close()
    with pytest.raises(KBStoreError, match="already exists"):
        KBStore.create(path, encoder)
    with pytest.raises(KBStoreError) as err:
        KBStore.open(path, counting_encoder("other/encoder")[0])
    assert "'test/hash-encoder'" in str(err.value) and "'other/encoder'" in str(err.value)
    with pytest.raises(KBStoreError, match="24-dim .* 16-dim"):
        KBStore.open(path, counting_encoder(dim=16)[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(KBStoreError, match="manifest.json is missing"):
        KBStore.open(tmp_path / "empty")
    with pytest.raises(KBStoreError, match="does not exist"):
        KBStore.open(tmp_path / "absent")

    writer = KBStore.open(path)  # no encoder: may remove and compact, not add
    with pytest.raises(KBStoreError, match="without an encoder"):
        writer.add([("a", "b", "c")])
    with pytest.raises(KBStoreError, match=f"open for writing by process {os.getpid()}"):
        KBStore.open(path, encoder)
    with KBStore.open(path, readonly=True) as reader:  # readers never wait for the lock
        assert len(reader) == 0
    writer.close()
    with KBStore.create(path, encoder, exist_ok=True) as store:
        store.add([("a", "b", "c")])
    with pytest.raises(KBStoreError, match="templates"):
        KBStore.create(path, encoder, exist_ok=True, key_template="{name} has {property}")


def test_create_never_overwrites_a_store_that_lost_its_manifest(tmp_path, small_blocks):
    """Issue 13, item 1: create(exist_ok=True) on data files without a manifest must refuse, not truncate."""
    encoder, _ = counting_encoder()
    path = tmp_path / "kb"
    with KBStore.create(path, encoder) as store:
        store.add(facts(30))
        store.update("entity 1", "property 1", "changed")
        expected = store.triples()
    sizes = {p.name: p.stat().st_size for p in path.iterdir()}
    manifest = (path / "manifest.json").read_bytes()
    (path / "manifest.json").unlink()
    for exist_ok in (True, False):
        with pytest.raises(KBStoreError, match="no manifest.json: the manifest was deleted .* Nothing was changed"):
            KBStore.create(path, encoder, exist_ok=exist_ok)
    assert {p.name: p.stat().st_size for p in path.iterdir()} == {k: v for k, v in sizes.items() if k != "manifest.json"}
    (path / "manifest.json").write_bytes(manifest)  # restoring the manifest gives everything back
    with KBStore.open(path, readonly=True) as store:
        assert store.triples() == expected
        store.verify()

    # A create() that died before its first manifest leaves empty files only: a new create() proceeds.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("triples-00000000.jsonl", "keys-00000000.f16", "values-00000000.f16"):
        (fresh / name).touch()
    with KBStore.create(fresh, encoder) as store:
        store.add(facts(3))
    with KBStore.open(fresh, readonly=True) as store:
        assert store.triples() == facts(3)


# ------------------------------------------------------------------------------------- crash safety


def test_failure_before_the_manifest_commit_keeps_the_old_state(tmp_path, monkeypatch, small_blocks):
    encoder, _ = counting_encoder()
    path = tmp_path / "kb"
    store = KBStore.create(path, encoder)
    store.add(facts(20))
    store.update("entity 2", "property 2", "changed once")
    before, files = store.triples(), sorted(p.name for p in path.iterdir())

    def crash(src, dst):
        raise OSError("simulated crash between the data files and the manifest")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        for change in (lambda: store.add(facts(30, tag="b")), lambda: store.update("entity 4", "property 1", "x"),
                       lambda: store.remove("entity 5"), store.compact):
            with pytest.raises(OSError, match="simulated crash"):
                change()
            assert store.triples() == before  # the object went back to the committed state...
            assert sorted(p.name for p in path.iterdir()) == files  # ...and so did the folder
    store.add(facts(2, tag="c"))  # and it is still usable
    before = store.triples()

    # Now the process "dies" at the same point: nothing cleans up after the failed update.
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        patch.setattr(KBStore, "_reload", lambda self, first=False: None)
        patch.setattr(KBStore, "_remove_strays", lambda self, names=None: None)
        with pytest.raises(OSError, match="simulated crash"):
            store.update("entity 4", "property 1", "lost")
    store.close()
    keys = path / "keys-00000000.f16"
    assert keys.stat().st_size == 24 * 24 * 2  # 23 committed rows + the uncommitted one
    assert (path / "overlay-00000004.i64").exists()  # written for the commit that never happened

    with pytest.warns(UserWarning, match="uncommitted bytes at the end of .*keys-00000000.f16"):
        reopened = KBStore.open(path, encoder)
    assert reopened.triples() == before
    assert keys.stat().st_size == 23 * 24 * 2  # the tail is dropped, the orphan overlay too
    assert not (path / "overlay-00000004.i64").exists()
    reopened.verify()
    assert_matches_encoder(reopened)
    reopened.update("entity 4", "property 1", "kept")  # appends continue cleanly
    reopened.compact()
    reopened.verify()
    assert len(reopened) == 22 and reopened.get("entity 4", "property 1").value == "kept"
    reopened.close()


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from conftest import HashEncoder
from kblam.encoder import KBEncoder
from kblam.store import KBStore
store = KBStore.open({path!r}, KBEncoder(HashEncoder(), name="test/hash-encoder"))
for i, op in enumerate({ops!r}):
    kind = op[0]
    if kind == "add":
        store.add([(f"e{{op[1]}}-{{j}}", "p", f"v{{op[1]}}-{{j}}") for j in range(op[2])])
    elif kind == "update":
        store.update(op[1], "p", op[2])
    elif kind == "remove":
        store.remove(op[1])
    else:
        store.compact()
    print("ack", i, flush=True)
"""


def crash_ops(n_ops: int, batch: int) -> list[tuple]:
    ops: list[tuple] = []
    for b in range(n_ops):
        ops.append(("add", b, batch))
        if b % 3 == 2:
            ops.append(("update", f"e{b - 1}-0", f"updated {b}"))
            ops.append(("remove", f"e{b - 2}-1"))
        if b % 7 == 6:
            ops.append(("compact",))
    return ops


def replay_fingerprints(ops: list[tuple]) -> list[int]:
    """hash(state) after each prefix of ops (index j: after the first j operations)."""
    state: dict[tuple[str, str], str] = {}
    out = [hash(())]
    for op in ops:
        if op[0] == "add":
            for j in range(op[2]):
                state[(f"e{op[1]}-{j}", "p")] = f"v{op[1]}-{j}"
        elif op[0] == "update":
            state[(op[1], "p")] = op[2]
        elif op[0] == "remove":
            del state[(op[1], "p")]
        out.append(hash(tuple(state.items())))
    return out


def check_snapshot(store: KBStore, fingerprints: list[int], at_least: int, rng: random.Random) -> int:
    """The store holds exactly the state after some prefix of ops (>= at_least of them); return which."""
    triples = store.triples()
    mine = hash(tuple(((t.name, t.property), t.value) for t in triples))
    done = [j for j in range(at_least, len(fingerprints)) if fingerprints[j] == mine]
    assert done, f"{len(triples)} triples match no state after {at_least} or more operations"
    assert_matches_encoder(store, rng.sample(range(len(triples)), min(5, len(triples))))
    return done[0]


def test_sigkill_at_a_random_moment_loses_nothing_acknowledged(tmp_path):
    """A writer process is killed mid-stream while this process keeps opening the store to read."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    path = tmp_path / "kb"
    KBStore.create(path, counting_encoder()[0]).close()
    ops = crash_ops(60, batch=300)
    fingerprints = replay_fingerprints(ops)
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS), path=str(path), ops=ops)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acks: list[int] = []
    reader = threading.Thread(target=lambda: acks.extend(int(line.split()[1]) for line in child.stdout))
    reader.start()
    kill_after = rng.randint(4, 30)
    reads = 0
    try:
        deadline = time.monotonic() + 60
        while len(acks) < kill_after and child.poll() is None and time.monotonic() < deadline:
            seen = len(acks)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a live writer's unfinished append must not look like damage
                with KBStore.open(path, readonly=True) as snapshot:
                    check_snapshot(snapshot, fingerprints, seen, rng)
            reads += 1
        time.sleep(rng.uniform(0, 0.03))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        reader.join()
    assert len(acks) >= min(kill_after, 4), f"writer died early (seed {seed}): {child.stderr.read()}"
    assert reads > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncommitted bytes are expected here
        store = KBStore.open(path, counting_encoder()[0])
    done = check_snapshot(store, fingerprints, len(acks), rng)
    assert done in (len(acks), len(acks) + 1), f"seed {seed}: state after {done} ops, {len(acks)} acknowledged"
    store.verify()
    store.add([("after", "p", "crash")])
    store.verify()
    store.close()


def test_concurrent_reader_sees_whole_generations(tmp_path, small_blocks):
    encoder, _ = counting_encoder()
    path = tmp_path / "kb"
    writer = KBStore.create(path, encoder)
    writer.add(facts(30))
    values = {"value 0"} | {f"round {i}" for i in range(25)}
    errors: list[BaseException] = []

    def write():
        try:
            for i in range(25):
                writer.update("entity 0", "property 0", f"round {i}")
                writer.add([(f"extra {i}", "p", f"x {i}")])
                if i % 5 == 4:
                    writer.remove(f"extra {i - 2}")
                    writer.compact()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=write)
    thread.start()
    follower = KBStore.open(path, readonly=True)
    generations = set()
    while thread.is_alive():
        with KBStore.open(path, readonly=True) as snapshot:
            assert snapshot.triples()[0].value in values
            assert len(snapshot) == len(snapshot.embeddings().keys) >= 30
            assert_matches_encoder(snapshot, [0, len(snapshot) - 1])
            generations.add(snapshot.generation)
        follower.reload()
        assert_matches_encoder(follower, [0])
    thread.join()
    assert not errors, errors
    assert len(generations) > 1
    follower.reload()
    assert follower.triples() == writer.triples()
    follower.verify()
    writer.close()


# --------------------------------------------------------------------------------- damage and rebuild


def test_truncated_keys_file_is_reported_and_rebuild_recovers(tmp_path, small_blocks):
    encoder, _ = counting_encoder()
    path = tmp_path / "kb"
    with KBStore.create(path, encoder) as store:
        store.add(facts(40))
        store.update("entity 1", "property 1", "changed")
        store.remove("entity 2")
        expected, before = store.triples(), store.embeddings()
    keys = path / "keys-00000000.f16"
    with open(keys, "r+b") as fh:
        fh.truncate(25 * 24 * 2 + 7)
    with pytest.raises(KBStoreError) as err:
        KBStore.open(path, readonly=True)
    message = str(err.value)
    assert "keys-00000000.f16 is truncated: 25 of 41 rows intact" in message
    assert "triples-00000000.jsonl still holds all 39 triples" in message and "KBStore.rebuild(" in message

    rebuilt_encoder, raw = counting_encoder()
    with KBStore.rebuild(path, rebuilt_encoder) as store:
        assert store.triples() == expected
        torch.testing.assert_close(store.embeddings().keys, before.keys, rtol=0, atol=0)
        torch.testing.assert_close(store.embeddings().values, before.values, rtol=0, atol=0)
        assert len(raw.calls) == 2 * 39
        store.verify()
    assert not keys.exists()


def test_flipped_bytes_are_found_by_verify(tmp_path, small_blocks):
    encoder, _ = counting_encoder()
    path = tmp_path / "kb"
    with KBStore.create(path, encoder) as store:
        store.add(facts(40))
        expected = store.embeddings()
    values = path / "values-00000000.f16"
    data = bytearray(values.read_bytes())
    data[20 * 24 * 2 + 5] ^= 0x10  # row 20: checksum block 2 (rows 16-23)
    values.write_bytes(bytes(data))
    with KBStore.open(path, readonly=True) as store:  # open checks sizes only
        with pytest.raises(KBStoreError) as err:
            store.verify()
    assert "values-00000000.f16: rows 16-23 do not match their checksums" in str(err.value)
    assert "KBStore.rebuild(" in str(err.value)
    with KBStore.rebuild(path, encoder) as store:
        store.verify()
        torch.testing.assert_close(store.embeddings().values, expected.values, rtol=0, atol=0)

    triples = path / "triples-00000002.jsonl"
    triples.write_bytes(triples.read_bytes().replace(b"value 33", b"value 38"))
    with KBStore.open(path, readonly=True) as store:
        with pytest.raises(KBStoreError, match=r"triples-00000002.jsonl: rows 32-39 .* restore the folder"):
            store.verify()
    with pytest.raises(KBStoreError, match="cannot be trusted"):
        KBStore.rebuild(path, encoder)
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"count": 40', '"count": 41'))
    with pytest.raises(KBStoreError, match="does not match its own checksum"):
        KBStore.open(path, readonly=True)


def test_damaged_rows_are_errors_when_first_read(tmp_path, small_blocks, monkeypatch):
    """Issue 13, item 12: a flipped byte is found the first time its block is read, not only by verify()."""
    import kblam.store.files as files_module

    encoder, _ = counting_encoder()
    path = tmp_path / "kb"
    with KBStore.create(path, encoder) as store:
        store.add(facts(40))
    for name, offset in (("keys-00000000.f16", 20 * 24 * 2 + 3), ("values-00000000.f16", 33 * 24 * 2)):
        data = bytearray((path / name).read_bytes())
        data[offset] ^= 0x04
        (path / name).write_bytes(bytes(data))
    triples = path / "triples-00000000.jsonl"
    triples.write_bytes(triples.read_bytes().replace(b"value 10", b"value 1O"))

    hashed = []  # data blocks hashed (not the manifest)
    real_sha256 = files_module.hashlib.sha256

    def sha256(data=b""):
        if sys._getframe(1).f_code.co_name in ("_check_blocks", "_read_block"):
            hashed.append(len(data))
        return real_sha256(data)

    monkeypatch.setattr(files_module.hashlib, "sha256", sha256)
    reader = KBStore.open(path, readonly=True)  # opening reads no row
    assert len(reader) == 40 and hashed == []
    keys, values, triples_view = reader.view()
    assert keys[[0, 1, 30]].shape == (3, 24) and triples_view[0] == facts(40)[0]
    assert len(hashed) == 3  # keys blocks 0 and 3, triples block 0
    keys[[2, 31]], values[4]
    assert len(hashed) == 4  # only values block 0 is new: each block is checked once per process
    with pytest.raises(KBStoreError, match=r"keys-00000000.f16: rows 16-23 do not match their checksums .* "
                                           r"KBStore.rebuild"):
        keys[[5, 20]]
    with pytest.raises(KBStoreError, match=r"values-00000000.f16: rows 32-39 do not match"):
        values[33]
    assert values[[31, 40 - 8 - 1]].shape == (2, 24)  # the blocks around it are fine
    with pytest.raises(KBStoreError, match=r"triples-00000000.jsonl: rows 8-15 .* restore the folder"):
        triples_view[10]
    assert triples_view[16] == facts(40)[16]
    for read_all in (reader.triples, reader.embeddings, reader.key_matrix, reader.value_matrix):
        with pytest.raises(KBStoreError, match="do not match their checksums"):
            read_all()
    reader.close()


def test_max_triple_bytes_bounds_every_triple_without_parsing(tmp_path, small_blocks, monkeypatch):
    encoder, _ = counting_encoder()
    with KBStore.create(tmp_path / "kb", encoder) as store:
        store.add(facts(30))
        store.add([("gold", "symbol", "Au with a \"quote\" and é")])
        longest = max(len(f"{t.name}{t.property}{t.value}".encode()) for t in store.triples())
        assert longest <= store.max_triple_bytes() <= longest + 4  # JSON escapes only make lines longer
        store.update("entity 3", "property 0", "x" * 500)  # appended by this writer
        assert store.max_triple_bytes() == len(b"entity 3property 0") + 500
    monkeypatch.setattr(store_module._Lines, "_parse", lambda *a: pytest.fail("no triple is parsed"))
    with KBStore.open(tmp_path / "kb", readonly=True) as reader:
        assert reader.max_triple_bytes() == len(b"entity 3property 0") + 500


def test_rebuild_moves_a_store_to_another_encoder(tmp_path):
    encoder, _ = counting_encoder()
    path = tmp_path / "kb"
    with KBStore.create(path, encoder) as store:
        store.add(facts(5))
    other, raw = counting_encoder("other/encoder", dim=16)
    with KBStore.rebuild(path, other) as store:
        assert store.encoder_name == "other/encoder" and store.dim == 16 and store.triples() == facts(5)
        assert_matches_encoder(store)
    with pytest.raises(KBStoreError, match="'other/encoder'"):
        KBStore.open(path, encoder)


def test_a_views_triples_are_taken_many_rows_at_once_as_one_by_one(tmp_path):
    """StoreView.triples.take (a question's candidates in one call) reads what row-by-row indexing reads,
    in the logical order that updates and removals leave."""
    encoder, _ = counting_encoder()
    with KBStore.create(tmp_path / "kb", encoder) as store:
        store.add(facts(30))
        store.update("entity 4", "property 1", "changed")
        store.remove("entity 9")
        view = store.view()
        rows = [0, 4, 28, 3, 4, -1]
        assert view.triples.take(rows) == [view.triples[r] for r in rows] == [store.triples()[r] for r in rows]
        assert view.triples.take(rows)[1].value == "changed" and len(view.triples) == 29
        with pytest.raises(IndexError):
            view.triples.take([29])


def test_check_hashes_every_block_once_so_that_reads_hash_none(tmp_path, small_blocks, monkeypatch):
    from kblam.store import files as files_module

    encoder, _ = counting_encoder()
    path = tmp_path / "kb"
    with KBStore.create(path, encoder) as store:
        store.add(facts(40))
    hashed = []
    real_sha256 = files_module.hashlib.sha256
    def sha256(data=b""):
        if sys._getframe(1).f_code.co_name in ("_check_blocks", "build"):  # data blocks, not the manifest
            hashed.append(len(data))
        return real_sha256(data)

    monkeypatch.setattr(files_module.hashlib, "sha256", sha256)
    with KBStore.open(path, readonly=True) as reader:
        reader.check()
        assert len(hashed) == 15  # 5 blocks of 8 rows in each data file
        keys, values, _ = reader.view()
        keys[[0, 17, 39]], values[[5, 33]]
        assert len(hashed) == 15  # checked already: nothing hashed again
    data = bytearray((path / "values-00000000.f16").read_bytes())
    data[30 * 24 * 2] ^= 0x04
    (path / "values.new").write_bytes(bytes(data))
    os.replace(path / "values.new", path / "values-00000000.f16")  # a new inode, as another process would write
    with KBStore.open(path, readonly=True) as reader, pytest.raises(KBStoreError, match="rows 24-31 do not match"):
        reader.check()


def test_the_manifest_keeps_one_line_per_checksum_block(tmp_path, small_blocks):
    """kblam.store.files._manifest_text renders the block lists itself (json's indented encoder was slow):
    the text is the manifest, every block on a line of its own."""
    encoder, _ = counting_encoder()
    with KBStore.create(tmp_path / "kb", encoder) as store:
        store.add(facts(20))
        text = (tmp_path / "kb" / "manifest.json").read_text()
        body = json.loads(text)
        assert body == {**store._manifest, "checksum": body["checksum"]}
    block_lines = [line for line in text.splitlines() if line.lstrip().startswith("[")]
    assert len(block_lines) == 9  # 3 blocks (8, 8 and 4 rows) in each of the 3 files
    assert all(re.fullmatch(r' {4}\[\d+, "[0-9a-f]{64}"\],?', line) for line in block_lines)
