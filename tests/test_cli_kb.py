"""`kblam kb` on stores (issue 14): import, add, update, remove, verify, compact, export, inspect, index;
an import killed at a random moment and run again ends with every triple exactly once."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import HashEncoder

from kblam import defaults
from kblam.cli import main
from kblam.encoder import KBEncoder
from kblam.kb import KnowledgeBase, Triple
from kblam.store import KBStore

TESTS = Path(__file__).parent
EXAMPLE = TESTS.parents[0] / "examples" / "elements.csv"


@pytest.fixture
def encoders(monkeypatch):
    """`kblam kb` loads the store's encoder by name; here every name gives a HashEncoder (no MiniLM)."""
    made = []

    def load_encoder(name):
        made.append(KBEncoder(HashEncoder(), name=name))
        return made[-1]

    monkeypatch.setattr(defaults, "load_encoder", load_encoder)
    return made


def write_csv(path: Path, triples: list[Triple]) -> Path:
    KnowledgeBase(triples).save(path)
    return path


def things(n: int, start: int = 0) -> list[Triple]:
    return [Triple(f"thing {j}", "colour", f"shade {j}") for j in range(start, start + n)]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_round_trip_on_a_small_store(tmp_path, capsys, encoders):
    store = tmp_path / "facts.kbstore"
    first = write_csv(tmp_path / "first.csv", things(30))
    second = tmp_path / "second.jsonl"
    KnowledgeBase([*things(5, start=25), *things(10, start=30), Triple("thing 2", "colour", "teal")]).save(second)

    code, out, _ = run(capsys, "kb", "import", first, second, store, "--commit-every", "7")
    assert code == 0 and "46 rows read, 41 triples new or changed, 5 already stored; 0 -> 40 triples" in out
    assert encoders[0].name == defaults.DEFAULT_ENCODER
    code, out, _ = run(capsys, "kb", "import", first, second, store)  # again: nothing to do
    assert code == 0 and "40 -> 40 triples" in out  # thing 2 goes to shade 2 and back to teal: the last wins

    assert run(capsys, "kb", "add", store, "gold", "symbol", "Au")[0] == 0
    code, _, err = run(capsys, "kb", "add", store, "gold", "symbol", "Gd")
    assert code == 1 and "already in" in err and "kblam kb update" in err
    assert run(capsys, "kb", "update", store, "gold", "symbol", "Gd")[0] == 0
    code, _, err = run(capsys, "kb", "update", store, "silver", "symbol", "Ag")
    assert code == 1 and "use add()" in err
    code, out, _ = run(capsys, "kb", "remove", store, "thing 7")
    assert code == 0 and "removed 1 triple(s): thing 7" in out
    assert run(capsys, "kb", "remove", store, "thing 8", "colour")[0] == 0
    assert run(capsys, "kb", "remove", store, "thing 8", "colour")[0] == 1

    code, out, _ = run(capsys, "kb", "verify", store)
    assert code == 0 and "ok: 39 triples" in out and "match their checksums" in out
    assert "row checksums: none saved" in out
    code, out, _ = run(capsys, "kb", "inspect", store)
    assert code == 0 and "(KB store, format 1" in out and "triples:          39 (6 replaced or removed" in out
    assert "name index:       none saved (built with the first question)" in out
    assert "row checksums:    none saved (KBStore.check() or kblam kb index saves them" in out
    code, out, _ = run(capsys, "kb", "compact", store)
    assert code == 0 and "45 rows -> 39" in out
    code, out, _ = run(capsys, "kb", "index", store)
    assert code == 0 and "KBPrefilter(exact, 39 keys" in out and "prefilter-" in out
    assert "name index: names-00000015.npz: 0 names of 0 rows, 39 rows added since" in out
    assert "row checksums: rowsums-00000015.npz: 0 rows, 39 rows added since (checked by block)" in out

    expected = [Triple("thing 0", "colour", "shade 0"), Triple("thing 1", "colour", "shade 1"),
                Triple("thing 2", "colour", "teal"), *things(4, start=3), *things(31, start=9),
                Triple("gold", "symbol", "Gd")]
    for suffix in (".csv", ".jsonl", ".json", ".tsv"):
        code, out, _ = run(capsys, "kb", "export", store, tmp_path / f"out{suffix}")
        assert code == 0 and "39 triples" in out
        assert list(KnowledgeBase.from_file(tmp_path / f"out{suffix}")) == expected
    code, out, _ = run(capsys, "kb", "inspect", store)
    assert "triples:          39\n" in out and "exact, 39 key rows" in out
    assert "name index:       names-00000015.npz: 0 names of 0 rows, 39 rows added since (read on load)" in out

    code, _, err = run(capsys, "kb", "verify", first)
    assert code == 1 and "a KB file, not a store" in err and "kblam kb import" in err
    code, _, err = run(capsys, "kb", "export", store, tmp_path / "out.xml")
    assert code == 1 and "use .jsonl, .json, .csv or .tsv" in err


def test_damage_is_a_one_line_error(tmp_path, capsys, encoders):
    store = tmp_path / "kb"
    run(capsys, "kb", "import", write_csv(tmp_path / "f.csv", things(20)), store)
    keys = store / "keys-00000000.f16"
    data = bytearray(keys.read_bytes())
    data[100] ^= 1
    keys.write_bytes(bytes(data))
    code, _, err = run(capsys, "kb", "verify", store)
    assert code == 1 and err.count("\n") == 1 and "do not match their checksums" in err and "rebuild" in err
    code, _, err = run(capsys, "kb", "export", store, tmp_path / "out.csv")  # export reads triples only
    assert code == 0
    (store / "manifest.json").unlink()
    code, _, err = run(capsys, "kb", "import", tmp_path / "f.csv", store)
    assert code == 1 and "no manifest.json: the manifest was deleted" in err


def test_parquet_shards_with_precomputed_embeddings(tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(defaults, "load_encoder", lambda name: pytest.fail("no encoder should be loaded"))
    encoder = KBEncoder(HashEncoder(), name="any")
    shards = tmp_path / "encoded"
    shards.mkdir()
    triples = things(25)
    for i, part in enumerate((triples[:10], triples[10:])):
        emb = encoder.encode_kb(part)
        pq.write_table(pa.table({
            "name": [t.name for t in part], "property": [t.property for t in part], "value": [t.value for t in part],
            "key_emb": list(emb.keys.numpy()), "value_emb": list(emb.values.numpy()),
        }), shards / f"{i:05d}.parquet")
    code, out, _ = run(capsys, "kb", "import", shards, tmp_path / "kb", "--commit-every", "8")
    assert code == 0 and "25 triples new or changed" in out
    with KBStore.open(tmp_path / "kb", readonly=True) as store:
        assert store.triples() == triples and store.encoder_name == defaults.DEFAULT_ENCODER
        np.testing.assert_allclose(store.embeddings().keys.numpy(), encoder.encode_kb(triples).keys.numpy(),
                                   atol=2e-3)


def test_parquet_shards_of_triples_are_encoded(tmp_path, capsys, encoders):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "shards"
    shards.mkdir()
    for i, part in enumerate((things(7), things(5, start=7))):
        pq.write_table(pa.table({"name": [t.name for t in part], "property": [t.property for t in part],
                                 "value": [t.value for t in part]}), shards / f"{i:05d}.parquet")
    (shards / "00002.parquet").write_bytes(b"not parquet")
    code, _, err = run(capsys, "kb", "import", shards, tmp_path / "kb")
    assert code == 1 and "00002.parquet" in err and "parquet" in err  # one line, no traceback
    (shards / "00002.parquet").unlink()
    code, out, _ = run(capsys, "kb", "import", shards, tmp_path / "kb")
    assert code == 0 and "12 triples new or changed" in out
    with KBStore.open(tmp_path / "kb", readonly=True) as store:
        assert store.triples() == things(12)


class SlowHashEncoder(HashEncoder):
    def encode(self, texts, **kw):
        time.sleep(0.002 * len(texts))  # an import that takes seconds, to be killed midway
        return super().encode(texts, **kw)


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_cli_kb import SlowHashEncoder
from kblam import defaults
from kblam.cli import main
from kblam.encoder import KBEncoder
defaults.load_encoder = lambda name: KBEncoder(SlowHashEncoder(), name=name)
sys.exit(main(["kb", "import", {source!r}, {store!r}, "--commit-every", "40", "--index", "no"]))
"""


def test_an_import_killed_at_random_resumes_and_stores_each_triple_once(tmp_path, capsys, encoders):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    triples = things(1500)
    source = tmp_path / "facts.csv"
    source.write_text("name,property,value\n" + "".join(f"{t.name},{t.property},{t.value}\n"
                                                       for t in triples + triples[:100]))  # duplicates too
    store = tmp_path / "kb"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS), source=str(source),
                                                                 store=str(store))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            manifest = store / "manifest.json"
            if manifest.exists() and json.loads(manifest.read_text())["count"] > 0:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.5))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL, f"seed {seed}: the import ended before it was killed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the killed writer's uncommitted tail is reported: expected
        with KBStore.open(store, readonly=True) as partial:
            committed = len(partial)
            assert 0 < committed < 1500 and partial.triples() == triples[:committed], f"seed {seed}"

    code, out, err = run(capsys, "kb", "import", source, store)
    assert code == 0, f"seed {seed}: {err}"
    assert all(line.startswith("kblam: warning: ") for line in err.splitlines()), err  # no traceback
    assert f"{1500 - committed:,} triples new or changed" in out
    encoded = encoders[-1].model.calls
    assert len(encoded) == 2 * (1500 - committed)  # what was committed is not encoded again
    with KBStore.open(store, readonly=True) as done:
        assert done.triples() == triples
        done.verify()


@pytest.mark.slow
def test_ask_a_store_on_the_default_model(tmp_path, capsys):
    store = tmp_path / "elements.kbstore"
    assert main(["kb", "import", str(EXAMPLE), str(store)]) == 0
    capsys.readouterr()
    question = "Who discovered chlorine?"
    assert main(["ask", "--kb", str(store), "--max-new-tokens", "16", "--sources", "2", "--json", question]) == 0
    from_store = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["ask", "--kb", str(EXAMPLE), "--max-new-tokens", "16", "--sources", "2", "--json", question]) == 0
    from_file = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_store["answer"] == from_file["answer"]
    assert [s["name"] for s in from_store["sources"]] == [s["name"] for s in from_file["sources"]]
    assert from_store["sources"][0]["name"] == "Chlorine"
