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
value update in the store keeps its key, so the index needs no change. A removed key stays in the
FAISS index and is skipped by an ``IDSelectorBitmap`` at search time (every kind, HNSW included):
top-k is still k live rows, and FAISS never has to rewrite its lists. Rebuild after removing a
large share of the KB, which would otherwise still be scanned.

On disk: ``save(path)`` is FAISS's own ``write_index``; ``KBPrefilter.load(path, settings)`` reads it
back memory-mapped (``IO_FLAG_MMAP_IFC``: the codes stay in the page cache, shared between
processes, and loading a million-key index takes milliseconds). A mapped index is read-only to
FAISS, so keys added afterwards go to a small exact side index searched alongside it; that is how a
``KBStore`` keeps a saved index current between rebuilds (``kblam.store.index``).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
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


def _live_selector(rows_of: np.ndarray, first: int, count: int):
    """An IDSelectorBitmap over ids [first, first + count) keeping those that hold a KB row (and the
    bitmap itself, which FAISS does not copy and must stay alive)."""
    import faiss

    bits = np.packbits(rows_of[first:first + count] >= 0, bitorder="little")
    return faiss.IDSelectorBitmap(count, faiss.swig_ptr(bits)), bits


class KBPrefilter:
    """Cosine top-k over KB keys with FAISS; see the module docstring for the choice of index."""

    def __init__(self, keys: Any, *, kind: str = "auto", exact_up_to: int = 200_000, nlist: int | None = None,
                 nprobe: int | None = None, hnsw_m: int = 32, ef_search: int | None = None, seed: int = 0,
                 on_added: Callable[[int], Any] | None = None):
        """``on_added(n)`` is called as each chunk of n keys is added (after IVF training): a progress bar."""
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
        self._init_rows()
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
        self._add(keys, on_added)

    def _init_rows(self) -> None:
        self._mapped = False  # True: the main index is a read-only memory map (FAISS aborts on writes)
        self._tail = None  # exact side index for keys added to a mapped index; ids follow the main ones
        self._rows_of: np.ndarray | None = None  # FAISS id -> KB row, -1: removed (None: id == row)
        self._rows = 0  # live KB rows
        self._selectors: dict[str, tuple] = {}  # cached IDSelectorBitmaps while rows are removed

    # -------------------------------------------------------------------------------- info

    @property
    def kind(self) -> str:
        """"exact", "ivf" or "hnsw" (what "auto" resolved to)."""
        return self._kind

    @property
    def ntotal(self) -> int:
        """KB rows the index answers with (removed ones not counted)."""
        return self._rows

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        extra = f", nlist={self.nlist}, nprobe={self.nprobe}" if self._kind == "ivf" else ""
        if self._mapped:
            extra += f", memory-mapped, {0 if self._tail is None else self._tail.ntotal} added since"
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
        q = _normalised(q)
        scores, ids = self.index.search(q, k, params=self._params("main", k))
        ids = ids.astype(np.int64, copy=False)
        if self._tail is not None and self._tail.ntotal:
            import faiss

            first = int(self.index.ntotal)
            sel = self._selector("tail", first, int(self._tail.ntotal))
            t_scores, t_ids = self._tail.search(q, k, params=faiss.SearchParameters(sel=sel) if sel else None)
            t_ids = np.where(t_ids >= 0, t_ids + first, -1)
            scores, ids = np.concatenate([scores, t_scores], 1), np.concatenate([ids, t_ids], 1)
            scores[ids < 0] = -np.inf
            best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, best, 1), np.take_along_axis(ids, best, 1)
        if self._rows_of is not None:
            ids = np.where(ids >= 0, self._rows_of[np.maximum(ids, 0)], -1)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _selector(self, part: str, first: int, count: int):
        """The live-ids selector for the main index or the tail, or None while nothing is removed there."""
        if self._rows_of is None or (self._rows_of[first:first + count] >= 0).all():
            return None
        if part not in self._selectors:
            self._selectors[part] = _live_selector(self._rows_of, first, count)
        return self._selectors[part][0]

    def nprobe_for(self, k: int) -> int | None:
        """IVF: the lists a search for k candidates probes (nprobe, raised so that they hold ~4k keys
        on average unless nprobe was given or tuned)."""
        if self._kind != "ivf":
            return None
        nprobe = self.nprobe
        if not self._nprobe_given:
            nprobe = max(nprobe, math.ceil(4 * k * self.nlist / max(self.ntotal, 1)))
        return min(self.nlist, nprobe)

    def _params(self, part: str, k: int):
        """FAISS search parameters for the main index: the live-ids selector and this k's nprobe/efSearch."""
        import faiss

        sel = self._selector(part, 0, int(self.index.ntotal))
        if self._kind == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe_for(k))
        if self._kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=max(self._ef_given or 64, 2 * k))
        return faiss.SearchParameters(sel=sel) if sel is not None else None

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

    def _add(self, keys: np.ndarray, on_added: Callable[[int], Any] | None = None) -> None:
        import faiss

        n = len(keys)
        if self._mapped and self._tail is None and n:
            self._tail = faiss.IndexFlatIP(self.dim)
        target = self._tail if self._mapped else self.index
        for start in range(0, n, _CHUNK):
            chunk = _normalised(keys[start:start + _CHUNK])
            target.add(chunk)  # ids continue from the last one
            if on_added is not None:
                on_added(len(chunk))
        if self._rows_of is not None:
            self._rows_of = np.concatenate([self._rows_of, np.arange(self._rows, self._rows + n, dtype=np.int64)])
        self._rows += n
        self._selectors.pop("tail" if self._mapped else "main", None)

    def add(self, keys: Any) -> None:
        """Append keys as the next KB rows (IVF: assigned to the trained lists, no retraining; a
        memory-mapped index: into its exact side index)."""
        keys = _as_matrix(keys, "keys")
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys have dim {keys.shape[1]}, the index has dim {self.dim}")
        self._add(keys)

    def remove(self, rows: Any) -> None:
        """Remove KB rows; later rows shift down, as in ``KBStore.remove``. The keys stay in FAISS and
        are skipped at search time (see the module docstring)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64).ravel())
        if len(rows) == 0:
            return
        if rows[0] < 0 or rows[-1] >= self.ntotal:
            raise IndexError(f"rows must be in [0, {self.ntotal}); got {rows[0]}..{rows[-1]}")
        current = self._ids_to_rows()
        shifted = current - np.searchsorted(rows, current)  # rows below each one that go
        self.set_rows(np.where((current >= 0) & ~np.isin(current, rows), shifted, -1))

    def _ids_to_rows(self) -> np.ndarray:
        total = int(self.index.ntotal) + (0 if self._tail is None else int(self._tail.ntotal))
        return np.arange(total, dtype=np.int64) if self._rows_of is None else self._rows_of

    def set_rows(self, rows_of: Any) -> None:
        """Say which KB row each key added so far holds, in the order added (-1: none, skipped at
        search time). How a ``KBStore`` maps its physical rows, some replaced or removed, to the
        rows of ``triples()``; ``remove`` is this with the later rows shifted down."""
        rows_of = np.asarray(rows_of, dtype=np.int64)
        total = len(self._ids_to_rows())
        if rows_of.shape != (total,):
            raise ValueError(f"set_rows needs one row per key added ({total}), got shape {rows_of.shape}")
        live = rows_of[rows_of >= 0]
        if len(live) and (live.max() >= len(live) or not (np.bincount(live, minlength=len(live)) == 1).all()):
            raise ValueError("set_rows: the live rows must be 0..n-1, each once")
        self._rows_of = rows_of.copy()
        self._rows = len(live)
        self._selectors = {}

    # ------------------------------------------------------------------------------ on disk

    def settings(self) -> dict:
        """What ``load`` needs beside the FAISS file (JSON-ready)."""
        return {"kind": self._kind, "dim": self.dim, "ntotal": int(self.index.ntotal), "nlist": self.nlist,
                "nprobe": self.nprobe, "nprobe_given": self._nprobe_given, "ef_search": self._ef_given}

    def save(self, path: str | os.PathLike) -> dict:
        """Write the FAISS index with ``faiss.write_index`` (to a temp file, fsynced, then renamed:
        a reader never sees half a file); returns ``settings()``. Only an index as built (plus adds)
        can be saved: removals and a mapped index's side index live in memory."""
        import faiss

        if self._mapped or self._rows_of is not None:
            raise ValueError("save() writes an index as built and added to; this one was memory-mapped or "
                             "had rows removed, which live in memory only: build a new KBPrefilter to save")
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600: other users' readers need it too
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return self.settings()

    @classmethod
    def load(cls, path: str | os.PathLike, settings: dict, *, mmap: bool = True) -> KBPrefilter:
        """An index written by ``save``, memory-mapped by default (read-only to FAISS: later ``add``s
        go to an exact side index). Raises ValueError if the file does not match ``settings``."""
        import faiss

        flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as err:  # FAISS reports a short or garbled file this way
            raise ValueError(f"{path}: FAISS cannot read it ({str(err).splitlines()[0][:200]})") from None
        kind = settings["kind"]
        expected = {"exact": faiss.IndexFlatIP, "ivf": faiss.IndexIVFScalarQuantizer, "hnsw": faiss.IndexHNSWFlat}
        if (not isinstance(index, expected.get(kind, ())) or index.d != settings["dim"]
                or index.ntotal != settings["ntotal"]):
            raise ValueError(f"{path} holds a {type(index).__name__} of {index.ntotal} x {index.d} keys, "
                             f"not the {kind} index of {settings['ntotal']} x {settings['dim']} it should")
        self = cls.__new__(cls)
        self.index, self.dim, self._kind = index, int(index.d), kind
        self._init_rows()
        self._mapped = mmap
        self._rows = int(index.ntotal)
        self.nlist, self.nprobe = settings.get("nlist"), settings.get("nprobe")
        self._nprobe_given, self._ef_given = bool(settings.get("nprobe_given")), settings.get("ef_search")
        if kind == "ivf":
            self.index.nprobe = self.nprobe
        return self
