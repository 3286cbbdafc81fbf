"""FAISS candidate pre-filter: the top-k KB rows for a question, before rectangular attention.

    pre = KBPrefilter(store.key_matrix())              # float16 memmap, float32 array or tensor
    scores, rows = pre.search(question_embeddings, k)  # (Q, k) cosine scores and int64 KB rows

Scores are cosine similarities: keys and queries are L2-normalised (as float32) inside, and the
index uses inner product. Rows are KB indices (``store.triples()[row]``); a slot that the index
could not fill holds -1 with score -inf (possible only for approximate kinds with a tiny nprobe).

Which index (``kind``):

* ``"exact"`` -- ``faiss.IndexFlatIP``: brute force, always the true top-k. Search costs M x d
  multiply-adds per query: at 200,000 x 384 that is 77 MFLOP, a few milliseconds per question on
  one core, and the index holds M x d float32 (300 MB). Nothing to train, add/remove are trivial.
* ``"ivf"`` -- ``faiss.IndexIVFScalarQuantizer`` (8-bit codes, inner product, spherical k-means;
  a quarter of IVFFlat's memory, see the benchmark in docs/scale.md): keys are bucketed into
  ``nlist`` clusters and a query scans only the ``nprobe`` nearest clusters. With
  ``nlist = 4 * sqrt(M)`` (faiss's guideline for up to ~1M vectors) a list holds ~sqrt(M)/4 keys,
  and the default ``nprobe = max(8, sqrt(nlist))`` scans about 2 % of the KB at 1M rows (so ~25x
  less work than exact) while keeping recall@k high on embedding-like, clustered data; at search
  time nprobe is raised if needed so that the probed lists hold at least 4 k keys on average. For
  a guarantee on *your* queries, call ``tune_nprobe(sample_queries, k, target_recall)``: it picks
  the smallest nprobe whose recall against exhaustive search (nprobe = nlist) meets the target.
  Training is k-means over a seeded sample of ``40 * nlist`` keys (faiss wants >= 39 per
  centroid), 10 iterations; at 1M x 384 that is a one-off few TFLOP, i.e. tens of seconds on
  a multi-core CPU. IVF supports ``add`` (new keys go to their nearest list, no retraining) and
  ``remove`` (cheap) -- rebuild after the KB has grown several-fold so the lists stay balanced.
* ``"hnsw"`` -- ``faiss.IndexHNSWFlat`` (``hnsw_m`` links per node): the fastest queries, but
  building is slow and memory-hungry, build order (threads) makes it non-deterministic, and faiss
  cannot remove from it (``remove`` raises: rebuild instead). Offered, not chosen by ``"auto"``.
* ``"auto"`` -- exact up to ``exact_up_to`` rows (default 200,000: below that brute force is both
  fast enough and exact, and it needs no training), IVF beyond.

Row numbering follows the KB: ``add(keys)`` appends rows at the end (as ``KBStore.add`` does for
new triples) and ``remove(rows)`` shifts later rows down (as ``KBStore.remove`` does). An in-place
value update in the store keeps its key, so the index needs no change.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

KINDS = ("auto", "exact", "ivf", "hnsw")
_CHUNK = 65536  # rows converted to float32 at a time when adding (bounds the extra memory)
_TRAIN_PER_LIST = 40


def _as_matrix(x: Any, what: str) -> np.ndarray:
    """A 2-D array view (no copy for numpy input, float16 memmaps included)."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16",):
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a (n, dim) matrix, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{what} must be floating point, got {arr.dtype}")
    return arr


def _normalised(x: np.ndarray) -> np.ndarray:
    """Contiguous float32 copy with unit rows (zero rows stay zero)."""
    out = np.ascontiguousarray(x, dtype=np.float32)
    if out is x:  # never normalise the caller's array in place
        out = out.copy()
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


class KBPrefilter:
    """Cosine top-k over KB keys with FAISS; see the module docstring for the choice of index."""

    def __init__(self, keys: Any, *, kind: str = "auto", exact_up_to: int = 200_000, nlist: int | None = None,
                 nprobe: int | None = None, hnsw_m: int = 32, ef_search: int | None = None, seed: int = 0):
        import faiss

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        keys = _as_matrix(keys, "keys")
        m, self.dim = keys.shape
        if kind == "auto":
            kind = "exact" if m <= exact_up_to else "ivf"
        self._kind = kind
        self._nprobe_given = nprobe is not None
        self._ef_given = ef_search
        self._ids: np.ndarray | None = None  # IVF after a removal: KB row -> faiss id
        self._rows_of: np.ndarray | None = None  # IVF after a removal: faiss id -> KB row (-1: gone)
        self._next_id = 0
        self.nlist = self.nprobe = None
        if kind == "exact":
            self.index = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            if m == 0:
                raise ValueError("an IVF index needs keys to train on; use kind='exact' for an empty KB")
            # Enough training points per list, and never more lists than keys allow.
            self.nlist = max(1, min(nlist or round(4 * math.sqrt(m)), m // _TRAIN_PER_LIST or 1))
            self.nprobe = min(self.nlist, nprobe or max(8, math.ceil(math.sqrt(self.nlist))))
            quantizer = faiss.IndexFlatIP(self.dim)
            # 8-bit scalar quantisation: a quarter of IVFFlat's memory (384 MB instead of 1.5 GB at
            # 1M x 384), which the 4 GB budget at a million triples needs; ranking loss is small.
            self.index = faiss.IndexIVFScalarQuantizer(
                quantizer, self.dim, self.nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
            self.index.cp.seed = seed
            self.index.cp.spherical = True
            self.index.cp.max_points_per_centroid = 256  # our sample is below it: faiss won't resample
            self._quantizer = quantizer  # keep it alive alongside the index
            rng = np.random.default_rng(seed)
            n_train = min(m, _TRAIN_PER_LIST * self.nlist)
            sample = np.sort(rng.choice(m, size=n_train, replace=False)) if n_train < m else slice(None)
            self.index.train(_normalised(keys[sample]))
            self.index.nprobe = self.nprobe
        self._add(keys)

    # -------------------------------------------------------------------------------- info

    @property
    def kind(self) -> str:
        """"exact", "ivf" or "hnsw" (what "auto" resolved to)."""
        return self._kind

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        extra = f", nlist={self.nlist}, nprobe={self.nprobe}" if self._kind == "ivf" else ""
        return f"KBPrefilter({self._kind}, {self.ntotal} keys, dim {self.dim}{extra})"

    # ------------------------------------------------------------------------------ search

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (Q, k'), best first, with k' = min(k, ntotal); rows are int64 KB indices."""
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]}, the keys have dim {self.dim}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        k = min(int(k), self.ntotal)
        if k == 0 or len(q) == 0:
            return np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        self._set_search_params(k)
        scores, ids = self.index.search(_normalised(q), k)
        ids = ids.astype(np.int64, copy=False)
        if self._rows_of is not None:
            ids = np.where(ids >= 0, self._rows_of[np.maximum(ids, 0)], -1)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _set_search_params(self, k: int) -> None:
        if self._kind == "ivf":
            nprobe = self.nprobe
            if not self._nprobe_given:  # probe enough lists to hold ~4k keys on average
                nprobe = max(nprobe, math.ceil(4 * k * self.nlist / max(self.ntotal, 1)))
            self.index.nprobe = min(self.nlist, nprobe)
        elif self._kind == "hnsw":
            self.index.hnsw.efSearch = max(self._ef_given or 64, 2 * k)

    def tune_nprobe(self, queries: Any, k: int, target_recall: float = 0.95) -> int:
        """IVF only: set nprobe to the smallest value (doubling) whose recall@k, against exhaustive
        search over all lists, reaches ``target_recall`` on these sample queries; returns it."""
        if self._kind != "ivf":
            raise ValueError(f"tune_nprobe is for IVF indexes; this one is {self._kind!r}")
        q = _normalised(_as_matrix(queries, "queries"))
        k = min(k, self.ntotal)
        self.index.nprobe = self.nlist
        _, truth = self.index.search(q, k)
        nprobe = 1
        while nprobe < self.nlist:
            self.index.nprobe = nprobe
            _, got = self.index.search(q, k)
            hits = sum(len(np.intersect1d(a[a >= 0], b[b >= 0])) for a, b in zip(got, truth, strict=True))
            if hits / max(truth.size, 1) >= target_recall:
                break
            nprobe *= 2
        self.nprobe, self._nprobe_given = min(nprobe, self.nlist), True
        self.index.nprobe = self.nprobe
        return self.nprobe

    # ------------------------------------------------------------------------------ changes

    def _add(self, keys: np.ndarray) -> None:
        n = len(keys)
        for start in range(0, n, _CHUNK):
            chunk = _normalised(keys[start:start + _CHUNK])
            if self._kind == "ivf":  # explicit ids: faiss would reuse ids (ntotal + i) after a removal
                first = self._next_id + start
                self.index.add_with_ids(chunk, np.arange(first, first + len(chunk), dtype=np.int64))
            else:
                self.index.add(chunk)
        if self._ids is not None:
            self._ids = np.concatenate([self._ids, np.arange(self._next_id, self._next_id + n, dtype=np.int64)])
            self._rows_of = np.concatenate([self._rows_of, np.arange(len(self._ids) - n, len(self._ids))])
        self._next_id += n

    def add(self, keys: Any) -> None:
        """Append keys as the next KB rows (IVF: assigned to the trained lists, no retraining)."""
        keys = _as_matrix(keys, "keys")
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys have dim {keys.shape[1]}, the index has dim {self.dim}")
        self._add(keys)

    def remove(self, rows: Any) -> None:
        """Remove KB rows; later rows shift down, as in ``KBStore.remove``. Not for HNSW (rebuild)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64).ravel())
        if len(rows) == 0:
            return
        if rows[0] < 0 or rows[-1] >= self.ntotal:
            raise IndexError(f"rows must be in [0, {self.ntotal}); got {rows[0]}..{rows[-1]}")
        if self._kind == "hnsw":
            raise NotImplementedError("faiss cannot remove from an HNSW index; build a new KBPrefilter "
                                      "from the updated keys (or use kind='ivf' / 'exact')")
        if self._kind == "exact":
            self.index.remove_ids(rows)  # a flat index renumbers, so rows stay ids
            return
        if self._ids is None:
            self._ids = np.arange(self._next_id, dtype=np.int64)
        self.index.remove_ids(self._ids[rows])
        self._ids = np.delete(self._ids, rows)
        self._rows_of = np.full(self._next_id, -1, dtype=np.int64)
        self._rows_of[self._ids] = np.arange(len(self._ids))
