"""KBStore against a plain dict, with Hypothesis driving (issue 13): add, update, remove, compact, close and
reopen, and a crash between any two writes, in any order; after every step the store equals the dict.

The dict maps (name, property) -> value; its order is the store's row order (an update keeps its place,
a removal shifts the rest, as ``KBStore`` documents). After every step the store's triples, its
embeddings (against a fresh encoding), its row views, a fresh read-only opening (its rows read as a new
process reads them, through the row checksums a check() saved), its saved pre-filter index (every key
finds its own row first) and its saved names are checked against it.

A crash is an ``OSError`` from the n-th ``os.fsync`` of an operation, with the store's own clean-up
switched off, as if the process had died there; the store is then reopened, as the next process would.
It must hold the state before the operation, or after it when the commit point had passed.

CI runs a few dozen sequences; ``make fuzz-store`` runs many more (KBLAM_STORE_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from conftest import HashEncoder
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import kblam.store.core as core
from kblam.encoder import KBEncoder
from kblam.kb import Triple
from kblam.store import KBStore, files

NAMES = st.sampled_from(["gold", "iron", "tin", "lead", "neon"])
PROPS = st.sampled_from(["symbol", "number", "colour"])
VALUES = st.sampled_from(["Au", "Fe", "26", "79", "grey", "a longer value, with a comma", "é"])
TRIPLES = st.tuples(NAMES, PROPS, VALUES)
OPS = st.one_of(
    st.tuples(st.just("add"), st.lists(TRIPLES, min_size=1, max_size=9)),
    st.tuples(st.just("update"), TRIPLES),
    st.tuples(st.just("remove"), NAMES, st.one_of(st.none(), PROPS)),
    st.tuples(st.just("compact")),
)


def apply(model: dict, op: tuple) -> dict:
    """The dict after ``op``, or KeyError where the store must refuse it."""
    model = dict(model)
    if op[0] == "add":
        for name, prop, value in op[1]:
            model[(name, prop)] = value
    elif op[0] == "update":
        name, prop, value = op[1]
        if (name, prop) not in model:
            raise KeyError((name, prop))
        model[(name, prop)] = value
    elif op[0] == "remove":
        gone = [k for k in model if k[0] == op[1] and op[2] in (None, k[1])]
        if not gone:
            raise KeyError(op[1:])
        for key in gone:
            del model[key]
    return model


def run(store: KBStore, op: tuple) -> None:
    if op[0] == "add":
        store.add(op[1], progress=False)
    elif op[0] == "update":
        store.update(*op[1])
    elif op[0] == "remove":
        store.remove(op[1], op[2])
    else:
        store.compact()


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.patches = contextlib.ExitStack()
        # Tiny checksum blocks and batches, so a few triples span several of each.
        self.patches.enter_context(mock.patch.object(core, "BLOCK_ROWS", 4))
        self.patches.enter_context(mock.patch.object(core, "BATCH_SIZE", 5))
        # Every small change finds its triples through the name index (KBStore._slots), as a large store's do;
        # adds of more than BATCH_SIZE read the slot map.
        self.patches.enter_context(mock.patch.object(core, "SLOT_MAP_ROWS", 0))
        self.patches.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # uncommitted tails after a crash, index rebuilds: reported, expected
        self.folder = Path(tempfile.mkdtemp(prefix="kblam-stateful-")) / "kb"
        self.encoder = KBEncoder(HashEncoder(8), name="test/hash-encoder")
        self.store = KBStore.create(self.folder, self.encoder)
        self.model: dict[tuple[str, str], str] = {}

    def teardown(self):
        self.store.close()
        self.patches.close()
        shutil.rmtree(self.folder.parent, ignore_errors=True)

    @rule(op=OPS)
    def change(self, op):
        try:
            expected = apply(self.model, op)
        except KeyError:
            expected = None  # the store must refuse it, and change nothing
        if expected is None:
            with pytest.raises(KeyError):
                run(self.store, op)
            return
        run(self.store, op)
        self.model = expected

    @rule(readonly=st.booleans())
    def reopen(self, readonly):
        self.store.close()
        if readonly:  # reads only; a writer comes back for the next rules
            with KBStore.open(self.folder, readonly=True) as reader:
                self.check(reader)
        self.store = KBStore.open(self.folder, self.encoder)

    @rule()
    def check_rows(self):
        """Every block checked and each row's checksum saved (kblam.store.rowsums): reads check rows then."""
        self.store.check(progress=False)

    @rule(op=OPS, at=st.integers(min_value=0, max_value=12))
    def crash(self, op, at):
        """The process dies at the (at+1)-th fsync of ``op``; the next process opens the store."""
        try:
            after = apply(self.model, op)
        except KeyError:
            return
        fsyncs, real_fsync = [0], os.fsync

        def fsync(fd):
            fsyncs[0] += 1
            if fsyncs[0] > at:
                raise OSError("simulated crash")
            real_fsync(fd)

        with contextlib.ExitStack() as dying:
            dying.enter_context(mock.patch.object(os, "fsync", fsync))
            # A dead process cleans nothing up: no reload, no removal of the files it left.
            dying.enter_context(mock.patch.object(KBStore, "_reload", lambda self, first=False: None))
            dying.enter_context(mock.patch.object(KBStore, "_remove_strays", lambda self, names=None: None))
            with contextlib.suppress(OSError):
                run(self.store, op)
        self.store.close()  # releases the lock, as the kernel would for a dead process
        self.store = KBStore.open(self.folder, self.encoder)
        found = self.as_model(self.store)
        assert found in (self.model, after), (op, at, found)
        if after != self.model:
            event(f"crash during {op[0]}: " + ("committed" if found == after else "rolled back"))
        self.model = found

    @staticmethod
    def as_model(store: KBStore) -> dict:
        return {(t.name, t.property): t.value for t in store.triples()}

    def expected_triples(self) -> list[Triple]:
        return [Triple(n, p, v) for (n, p), v in self.model.items()]

    def check(self, store: KBStore) -> None:
        expected = self.expected_triples()
        assert store.triples() == expected and len(store) == len(expected)
        if not expected:
            return
        fresh = self.encoder.encode_kb(expected, store.key_template, store.value_template)
        emb = store.embeddings()
        np.testing.assert_allclose(emb.keys.numpy(), fresh.keys.numpy(), atol=2e-3)
        np.testing.assert_allclose(emb.values.numpy(), fresh.values.numpy(), atol=2e-3)
        keys, values, triples = store.view()
        rows = np.arange(len(expected))[::-1]
        assert [triples[int(r)] for r in rows] == expected[::-1]
        np.testing.assert_array_equal(keys[rows].astype(np.float32), emb.keys.numpy()[rows])
        np.testing.assert_array_equal(np.asarray(values, dtype=np.float32), emb.values.numpy())
        # The saved index, kept current across edits: each key text finds its own row first.
        _, found = store.prefilter().search(fresh.keys.numpy(), 1)
        assert found[:, 0].tolist() == list(range(len(expected)))
        # The saved names hold every live name and property (a removed one may stay: a guess that misses).
        names = store.entity_names()
        assert all(t.name in names for t in expected) and names.properties >= {t.property for t in expected}

    @invariant()
    def store_equals_model(self):
        self.check(self.store)
        files._VERIFIED.clear()  # no block checked yet, as in another process
        with KBStore.open(self.folder, readonly=True) as reader:  # what another process sees
            assert reader.triples() == self.expected_triples()
            keys, values, _ = reader.view()  # rows checked against saved checksums where check() left any
            rows = np.arange(len(reader))[::-1]
            np.testing.assert_array_equal(keys[rows], self.store.key_matrix()[rows])
            np.testing.assert_array_equal(values[rows], self.store.value_matrix()[rows])


TestStoreStateful = StoreMachine.TestCase
TestStoreStateful.settings = settings(
    max_examples=int(os.environ.get("KBLAM_STORE_FUZZ_EXAMPLES", "25")),
    stateful_step_count=int(os.environ.get("KBLAM_STORE_FUZZ_STEPS", "20")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,  # examples are drawn afresh each run; a failure prints its steps to replay
)
