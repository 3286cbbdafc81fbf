"""KBPrefilter: exact top-k, IVF recall, clipping, adds/removes that follow the KB's row numbering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HashEncoder

from kblam.encoder import KBEncoder
from kblam.prefilter import KBPrefilter
from kblam.store import KBStore


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """n points around random centres (like sentence embeddings: clumped, not uniform), and the centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    return points.astype(np.float32), centres


def brute_force(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries.astype(np.float64) @ keys.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def test_exact_is_the_true_top_k():
    keys, _ = clustered(3000, 16, 20, seed=1)
    keys *= np.random.default_rng(2).uniform(0.1, 10, (len(keys), 1)).astype(np.float32)  # cosine ignores norms
    queries, _ = clustered(50, 16, 20, seed=3)
    pre = KBPrefilter(keys)
    assert pre.kind == "exact" and pre.ntotal == 3000
    scores, rows = pre.search(queries, 10)
    want_scores, want_rows = brute_force(keys, queries, 10)
    assert rows.dtype == np.int64 and rows.shape == (50, 10)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # Rows match wherever the k-th score is not tied with the next one.
    assert (rows == want_rows).mean() > 0.999
    # torch input, float16 input and a single 1-D query all work and agree.
    t_scores, t_rows = KBPrefilter(torch.from_numpy(keys)).search(torch.from_numpy(queries[0]), 10)
    np.testing.assert_array_equal(t_rows[0], rows[0])
    h_scores, _ = KBPrefilter(keys.astype(np.float16)).search(queries[:1], 10)
    np.testing.assert_allclose(h_scores[0], scores[0], atol=2e-3)


def test_ivf_recall_against_exact():
    keys, centres = clustered(50_000, 24, 300, seed=4)
    rng = np.random.default_rng(5)
    queries = (centres[rng.integers(0, 300, 200)] + 0.5 * rng.standard_normal((200, 24))).astype(np.float32)
    exact = KBPrefilter(keys, kind="exact")
    ivf = KBPrefilter(keys.astype(np.float16), kind="ivf", seed=0)
    assert ivf.kind == "ivf" and ivf.nlist == round(4 * 50_000 ** 0.5) and ivf.ntotal == 50_000
    k = 32
    _, truth = exact.search(queries, k)
    _, got = ivf.search(queries, k)
    recall = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(got, truth, strict=True)])
    assert recall >= 0.95, recall
    again = KBPrefilter(keys.astype(np.float16), kind="ivf", seed=0)  # seeded k-means: same index
    np.testing.assert_array_equal(again.search(queries, k)[1], got)

    tuned = ivf.tune_nprobe(queries[:100], k, target_recall=0.99)
    assert 1 <= tuned <= ivf.nlist
    _, got = ivf.search(queries[100:], k)
    recall = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(got, truth[100:], strict=True)])
    assert recall >= 0.95, recall


def test_auto_choice_and_k_clipping():
    keys, _ = clustered(2000, 8, 10, seed=6)
    assert KBPrefilter(keys).kind == "exact"
    auto_ivf = KBPrefilter(keys, exact_up_to=1000)
    assert auto_ivf.kind == "ivf" and auto_ivf.nlist == 2000 // 40  # capped: >= 40 training keys per list
    small = KBPrefilter(keys[:5])
    scores, rows = small.search(keys[:3], 50)
    assert scores.shape == rows.shape == (3, 5)
    assert sorted(rows[0].tolist()) == [0, 1, 2, 3, 4] and rows[0, 0] == 0
    assert small.search(keys[:3], 0)[1].shape == (3, 0)
    empty = KBPrefilter(np.zeros((0, 8), np.float32))
    assert empty.ntotal == 0 and empty.search(keys[:2], 4)[1].shape == (2, 0)
    with pytest.raises(ValueError, match="dim"):
        small.search(np.zeros((1, 9), np.float32), 2)
    with pytest.raises(ValueError, match="kind"):
        KBPrefilter(keys, kind="lsh")


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_add_and_remove_follow_kb_rows(kind):
    keys, _ = clustered(4000, 12, 16, seed=7)
    queries, _ = clustered(30, 12, 16, seed=8)
    pre = KBPrefilter(keys[:3000], kind=kind, nprobe=64 if kind == "ivf" else None)
    pre.add(keys[3000:])
    pre.remove([0, 10, 2999, 3500])
    pre.add(keys[:2])
    expected = np.concatenate([np.delete(keys, [0, 10, 2999, 3500], axis=0), keys[:2]])
    assert pre.ntotal == len(expected)
    _, rows = pre.search(queries, 5)
    _, want = brute_force(expected, queries, 5)
    # Row numbering is what this checks (a shifted row would miss almost always); IVF's 8-bit codes
    # may swap near-ties, so compare the top-5 as sets.
    found = np.mean([len(set(r) & set(w)) / 5 for r, w in zip(rows, want, strict=True)])
    assert found > 0.95
    with pytest.raises(IndexError):
        pre.remove([len(expected)])


def test_hnsw_search_and_removal():
    keys, _ = clustered(2000, 8, 10, seed=9)
    pre = KBPrefilter(keys, kind="hnsw", hnsw_m=16)
    _, rows = pre.search(keys[:20], 5)
    assert (rows[:, 0] == np.arange(20)).all()
    pre.remove([1])  # skipped at search time: FAISS cannot remove from HNSW itself
    _, rows = pre.search(keys[:3], 5)
    assert rows[0, 0] == 0 and 1 not in rows[1] and rows[2, 0] == 1  # row 2 is now row 1


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_save_and_load_memory_mapped(kind, tmp_path):
    keys, _ = clustered(3000, 12, 16, seed=10)
    queries, _ = clustered(40, 12, 16, seed=11)
    built = KBPrefilter(keys[:2500], kind=kind, nprobe=16 if kind == "ivf" else None, hnsw_m=16)
    settings = built.save(tmp_path / "index.faiss")
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]  # no temp file left
    loaded = KBPrefilter.load(tmp_path / "index.faiss", settings)
    assert loaded.kind == kind and loaded.ntotal == 2500 and "memory-mapped" in repr(loaded)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], built.search(queries, 10)[1])

    # A mapped index is read-only to FAISS (a write would abort the process): adds go to a side index,
    # and the rows come out numbered as in an index that took them all.
    for pre in (built, loaded):
        pre.add(keys[2500:])
        pre.remove([3, 2600, 2999])
    assert loaded.ntotal == built.ntotal == 2997
    scores, rows = loaded.search(queries, 10)
    _, want = brute_force(np.delete(keys, [3, 2600, 2999], axis=0), queries, 10)
    found = np.mean([len(set(r) & set(w)) / 10 for r, w in zip(rows, want, strict=True)])
    assert found > 0.95 and (np.diff(scores, axis=1) <= 1e-6).all()  # merged best first
    with pytest.raises(ValueError, match="memory-mapped or had rows removed"):
        loaded.save(tmp_path / "again.faiss")

    with pytest.raises(ValueError, match="not the .* index of 2400"):
        KBPrefilter.load(tmp_path / "index.faiss", {**settings, "ntotal": 2400})
    data = (tmp_path / "index.faiss").read_bytes()
    (tmp_path / "short.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="short.faiss: FAISS cannot read it"):
        KBPrefilter.load(tmp_path / "short.faiss", settings)


def test_prefilter_over_a_store_key_matrix(tmp_path):
    encoder = KBEncoder(HashEncoder(), name="test/hash-encoder")
    with KBStore.create(tmp_path / "kb", encoder) as store:
        store.add([(f"entity {i}", "colour", f"colour {i % 7}") for i in range(300)])
        pre = KBPrefilter(store.key_matrix())  # zero-copy float16 memmap
        query = encoder.encode(["The colour of entity 42"])
        _, rows = pre.search(query, 3)
        assert store.triples()[rows[0, 0]].name == "entity 42"
        store.remove("entity 5")
        pre.remove([5])
        _, rows = pre.search(query, 3)
        assert store.triples()[rows[0, 0]].name == "entity 42"
