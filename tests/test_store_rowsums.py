"""kblam.store.rowsums: each embedding row's checksum, saved by KBStore.check(), lets a later process check
the rows it reads instead of hashing their whole blocks, without ever taking a damaged row for a good one."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from test_store import counting_encoder, facts

import kblam.store.core as store_module
from kblam.store import KBStore, KBStoreError, rowsums
from kblam.store import files as files_module


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(store_module, "BLOCK_ROWS", 8)
    monkeypatch.setattr(store_module, "BATCH_SIZE", 16)


@pytest.fixture
def hashed(monkeypatch):
    """The sizes of the data blocks sha256 hashes from now on (embeddings and triples; not the manifest's
    or a derived file's)."""
    out: list[int] = []
    real = files_module.hashlib.sha256

    def sha256(data=b""):
        if sys._getframe(1).f_code.co_name in ("_check_blocks", "build", "_read_block"):
            out.append(len(data))
        return real(data)

    monkeypatch.setattr(files_module.hashlib, "sha256", sha256)
    return out


def new_process() -> None:
    """What a new process starts with: no block taken as checked (the set is per process)."""
    files_module._VERIFIED.clear()


def damage(path, name: str, byte: int) -> None:
    data = bytearray((path / name).read_bytes())
    data[byte] ^= 0x04
    (path / "damaged.new").write_bytes(bytes(data))
    os.replace(path / "damaged.new", path / name)


@pytest.fixture
def checked_store(tmp_path, small_blocks):
    """40 triples (5 whole blocks of 8) whose rows' checksums check() saved."""
    encoder, _ = counting_encoder()
    path = tmp_path / "kb"
    with KBStore.create(path, encoder) as store:
        store.add(facts(40))
        store.check()
    return path


def test_a_new_process_checks_the_rows_it_reads_not_their_blocks(checked_store, hashed):
    with KBStore.open(checked_store, readonly=True) as reader:
        expected = reader.key_matrix()[[0, 17, 39]].copy(), reader.value_matrix()[[5, 33]].copy()
    new_process()
    hashed.clear()
    with KBStore.open(checked_store, readonly=True) as reader:
        assert rowsums.status(reader) == "rowsums-00000001.npz: 40 rows"
        keys, values, triples = reader.view()
        np.testing.assert_array_equal(keys[[0, 17, 39]], expected[0])
        np.testing.assert_array_equal(values[np.array([[5], [33]])], expected[1][:, None])
        assert triples.take([39, 2, 17]) == [facts(40)[i] for i in (39, 2, 17)]
        assert hashed == []  # 5 rows and 3 triples read, no block hashed
        assert repr(rowsums.current(reader)) == "RowSums(40 rows)"


def test_rows_appended_since_are_checked_by_block(checked_store, hashed):
    encoder, _ = counting_encoder()
    with KBStore.open(checked_store, encoder) as store:
        store.update("entity 3", "property 0", "changed")  # row 40, in a block of its own
        store.add(facts(3, tag=" more"))
    new_process()
    with KBStore.open(checked_store, readonly=True) as reader:
        assert rowsums.status(reader) == "rowsums-00000001.npz: 40 rows, 4 rows added since (checked by block)"
        row = reader.index_of("entity 3", "property 0")  # (reads the triples)
        keys, values, _ = reader.view()
        hashed.clear()
        values[[row, 0]]
        assert hashed == [4 * 24 * 2]  # rows 40-43: the one block the checksums do not cover
        np.testing.assert_array_equal(values[[row]], reader.value_matrix()[[row]])


def test_a_damaged_row_is_an_error_when_read(checked_store, hashed):
    damage(checked_store, "values-00000000.f16", 30 * 24 * 2 + 7)  # row 30, another inode
    new_process()
    with KBStore.open(checked_store, readonly=True) as reader:
        keys, values, _ = reader.view()
        with pytest.raises(KBStoreError, match="rows 24-31 do not match their checksums"):
            values[[2, 30]]
        hashed.clear()
        values[[29]]  # what it gives up: a row beside the damage is read (check() and verify() find it)
        assert hashed == []
        with pytest.raises(KBStoreError, match="rows 24-31 do not match"):
            reader.check()
        with pytest.raises(KBStoreError, match="rows 24-31 do not match"):
            reader.verify()
    # A triple's line: "value 30" read as "value 38" would be an answer; it is an error.
    text = (checked_store / "triples-00000000.jsonl").read_bytes()
    damage(checked_store, "triples-00000000.jsonl", text.index(b'"value 30"') + 7)
    new_process()
    with KBStore.open(checked_store, readonly=True) as reader:
        triples = reader.view().triples
        with pytest.raises(KBStoreError, match="triples-00000000.jsonl: rows 24-31 do not match"):
            triples.take([3, 30])
        assert triples.take([29]) == [facts(40)[29]]


def test_wrong_or_damaged_checksum_files_cost_speed_never_a_false_alarm(checked_store, hashed):
    npz, record = checked_store / "rowsums-00000001.npz", checked_store / "rowsums-00000001.json"
    # Sums that do not match the rows, in a file that matches its record: the blocks' sha256 decide.
    info = json.loads(record.read_text())
    with np.load(npz) as data:
        arrays = dict(data)
    arrays["keys"] = arrays["keys"] + np.uint32(1)
    arrays["triples"] = arrays["triples"] + np.uint32(1)
    np.savez(npz, **arrays)
    info["bytes"], info["sha256"] = npz.stat().st_size, files_module._sha256_file(npz)
    record.write_text(json.dumps(info))
    new_process()
    hashed.clear()
    with KBStore.open(checked_store, readonly=True) as reader:
        assert rowsums.status(reader).startswith("rowsums-00000001.npz")
        keys, values, triples = reader.view()
        got = keys[[1, 20]]
        assert len(hashed) == 2  # the two rows' blocks were hashed, and matched
        assert triples.take([1, 20]) == [facts(40)[1], facts(40)[20]]
        assert len(hashed) == 4  # and the two triples' blocks
        np.testing.assert_array_equal(got, reader.key_matrix()[[1, 20]])
    # A damaged file: not used, reads check blocks as without one.
    npz.write_bytes(b"not an npz")
    new_process()
    with KBStore.open(checked_store, readonly=True) as reader:
        assert rowsums.status(reader).startswith("unusable") and rowsums.current(reader) is None
        hashed.clear()
        reader.view().keys[[3]]
        assert len(hashed) == 1
        reader.check()  # saves them again
        assert rowsums.status(reader) == "rowsums-00000001.npz: 40 rows"


def test_compact_and_rebuild_drop_the_row_checksums(checked_store):
    encoder, _ = counting_encoder()
    with KBStore.open(checked_store, encoder) as store:
        store.remove("entity 5")
        store.compact()
        assert not list(checked_store.glob("rowsums-*"))
        assert rowsums.status(store).startswith("none saved") and rowsums.current(store) is None
        store.check()
        assert rowsums.status(store) == "rowsums-00000003.npz: 32 rows, 7 rows added since (checked by block)"
        assert [p.name for p in sorted(checked_store.glob("rowsums-*"))] == [
            "rowsums-00000003.json", "rowsums-00000003.npz"]
    with KBStore.rebuild(checked_store, counting_encoder("other/encoder", dim=16)[0]) as store:
        assert not list(checked_store.glob("rowsums-*")) and rowsums.current(store) is None
