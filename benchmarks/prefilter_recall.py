"""Recall of the FAISS pre-filter: is the asked triple among the top-K keys for its question?

    .venv/bin/python benchmarks/prefilter_recall.py [--n 100000] [--k 256] [--questions 500] [--kind auto]

Builds a synthetic KB of --n triples (``kb_builders.synthetic``, test-split entities), encodes
the key sentences with the default MiniLM encoder, builds a ``KBPrefilter`` and asks one held-out
paraphrased question (``kb_builders.questions.question_for``) about each of --questions random
triples. Prints JSON: recall@1/10/K of the asked triple, build and search times, and for an
approximate index its overlap with exact search.

With --store DIR the index measured is the one a ``KBStore`` saves (issue 14): the keys go into a store
(reused if it already holds --n triples), its pre-filter index is built and saved with --kind, and the
recall is that of the index a fresh read-only ``KBStore.open(DIR).prefilter()`` loads from disk,
memory-mapped. With --keys-cache too, the store's keys are the cached MiniLM keys and its values are
zeros (values play no part in recall), so a million-triple store needs only its keys encoded.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def synthetic_kb(n: int, seed: int):
    from kb_builders.synthetic import synthetic_triples_exactly

    return synthetic_triples_exactly(n, seed=seed, split="test")


def encoded_keys(triples, encoder, args) -> np.ndarray:
    """The key sentences' MiniLM embeddings; with --keys-cache, encoded once per (n, seed) and kept.

    At a million triples encoding is most of the run (about 45 min on one idle core), so the vectors
    are kept as float16 (as a KBStore keeps them), written in parts of 50,000 as they are done (a run
    that is stopped resumes from the last part) and reused by later runs."""
    import torch

    cache = args.keys_cache
    texts = [t.key_text() for t in triples]
    about = {"n": len(triples), "seed": args.seed, "encoder": encoder.name, "template": "default key template"}
    if cache is None:
        return encoder.model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True,
                                    show_progress_bar=False).astype(np.float32)
    info_file = cache.with_suffix(".json")
    if cache.is_file() and info_file.is_file():
        info = json.loads(info_file.read_text())
        if {k: info.get(k) for k in about} == about:
            return np.load(cache, mmap_mode="r")
    cache.parent.mkdir(parents=True, exist_ok=True)
    part, parts, spent = 50_000, [], 0.0
    for start in range(0, len(texts), part):
        path = cache.with_name(f"{cache.stem}.part{start // part:04d}.npy")
        if not path.is_file():
            t0 = time.perf_counter()
            chunk = encoder.model.encode(texts[start:start + part], batch_size=args.batch_size,
                                         convert_to_numpy=True, show_progress_bar=False)
            spent += time.perf_counter() - t0
            np.save(path.with_suffix(".tmp.npy"), chunk.astype(np.float16))
            path.with_suffix(".tmp.npy").replace(path)
            timing = cache.with_name(f"{cache.stem}.parts.json")
            done = json.loads(timing.read_text()) if timing.is_file() else {"encode_s": 0.0}
            done["encode_s"] = round(done["encode_s"] + time.perf_counter() - t0, 1)
            timing.write_text(json.dumps(done))
            print(f"[recall] encoded keys {start + len(chunk):,} / {len(texts):,}", file=sys.stderr, flush=True)
        parts.append(path)
    keys = np.concatenate([np.load(p) for p in parts])
    timing = cache.with_name(f"{cache.stem}.parts.json")
    total_s = json.loads(timing.read_text())["encode_s"] if timing.is_file() else round(spent, 1)
    np.save(cache, keys)
    info_file.write_text(json.dumps({**about, "encode_s": total_s, "torch_threads": torch.get_num_threads(),
                                     "texts_per_s": round(len(texts) / max(total_s, 1e-9), 1)}, indent=1) + "\n")
    for p in [*parts, timing]:
        p.unlink(missing_ok=True)
    return np.load(cache, mmap_mode="r")


def saved_index(triples, encoder, args, report: dict):
    """(the index a fresh reader of the store loads, the store's keys); builds what is missing."""
    from kblam.encoder import KBEncoder
    from kblam.store import KBStore, is_store
    from kblam.store import index as store_index

    report["store"] = str(args.store)
    if is_store(args.store):
        with KBStore.open(args.store, readonly=True) as store:
            reuse = len(store) == len(triples)
    else:
        reuse = False
    if not reuse:
        t0 = time.perf_counter()
        if args.keys_cache is not None:  # cached MiniLM keys, zero values: nothing to encode
            cached = encoded_keys(triples, encoder, args)
            lookup = _Lookup(int(cached.shape[1]))
            store = KBStore.create(args.store, KBEncoder(lookup, name=encoder.name))
            for start in range(0, len(triples), 65536):
                batch = triples[start:start + 65536]
                lookup.table = {t.key_text(): k for t, k in zip(batch, cached[start:start + 65536], strict=True)}
                store.add(batch, progress=False)
        else:
            store = KBStore.create(args.store, encoder)
            store.add(triples, progress=False)
        store.close()
        report["store_add_s"] = round(time.perf_counter() - t0, 2)
    with KBStore.open(args.store) as writer:
        t0 = time.perf_counter()
        store_index.build(writer, progress=False, kind=args.kind, nlist=args.nlist, nprobe=args.nprobe,
                          seed=args.seed)
        report["build_s"] = round(time.perf_counter() - t0, 3)
    reader = KBStore.open(args.store, readonly=True)
    t0 = time.perf_counter()
    pre = reader.prefilter()  # the saved one, memory-mapped
    report["load_index_s"] = round(time.perf_counter() - t0, 3)
    report["index_file_mb"] = round(sum(p.stat().st_size for p in Path(args.store).glob("prefilter-*.faiss")) / 2**20, 1)
    return pre, reader.key_matrix()


class _Lookup:
    """Encoder stand-in: the cached vector for a key text, zeros for any other (value) text."""

    def __init__(self, dim: int):
        self.dim, self.table = dim, {}

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts, **_):
        return np.stack([self.table.get(t, np.zeros(self.dim, np.float16)) for t in texts]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="triples in the KB")
    parser.add_argument("--k", type=int, default=256, help="candidates kept per question")
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--kind", choices=["auto", "exact", "ivf", "hnsw"], default="auto")
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256, help="sentence-encoder batch size")
    parser.add_argument("--store", type=Path, default=None,
                        help="measure the index a KBStore in this folder saves (made if missing)")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact comparison for ivf/hnsw")
    parser.add_argument("--keys-cache", type=Path, default=None,
                        help="a .npy of the KB's MiniLM keys (float16): read if it matches --n/--seed, else "
                             "encoded once and written, with the encoding time beside it (.json)")
    args = parser.parse_args()

    import faiss
    import torch

    from kb_builders.questions import question_for
    from kblam.defaults import load_default_encoder
    from kblam.prefilter import KBPrefilter

    report: dict = {"n": args.n, "k": args.k, "questions": args.questions, "kind_asked": args.kind,
                    "seed": args.seed, "torch_threads": torch.get_num_threads(),
                    "faiss_threads": faiss.omp_get_max_threads()}
    t0 = time.perf_counter()
    triples = synthetic_kb(args.n, args.seed)
    report["kb_s"] = round(time.perf_counter() - t0, 3)
    encoder = load_default_encoder()
    encoder.batch_size = args.batch_size
    report["encoder"] = encoder.name

    t0 = time.perf_counter()
    if args.store is not None:
        pre, keys = saved_index(triples, encoder, args, report)
    else:
        keys = encoded_keys(triples, encoder, args)
        report["encode_keys_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        pre = KBPrefilter(keys, kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, seed=args.seed)
        report["build_s"] = round(time.perf_counter() - t0, 3)
    if args.keys_cache is not None:
        report["keys_cache"] = json.loads(args.keys_cache.with_suffix(".json").read_text())
    report["dim"] = int(keys.shape[1])
    report.update(kind=pre.kind, nlist=pre.nlist, nprobe=pre.nprobe, ntotal=pre.ntotal, index=repr(pre))

    rng = random.Random(args.seed)
    asked = [rng.randrange(len(triples)) for _ in range(args.questions)]
    questions = [question_for(triples[i], rng, heldout=True) for i in asked]
    report["example_question"] = {"question": questions[0], "triple": triples[asked[0]].to_record()}
    t0 = time.perf_counter()
    q = encoder.model.encode(questions, batch_size=args.batch_size, convert_to_numpy=True,
                             show_progress_bar=False).astype(np.float32)
    report["encode_questions_s"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    _, rows = pre.search(q, args.k)
    search_s = time.perf_counter() - t0
    report["search_s"] = round(search_s, 4)
    if pre.kind == "ivf":
        report["nprobe_used"] = pre.nprobe_for(args.k)  # raised for large k: see KBPrefilter
    report["search_ms_per_question"] = round(1000 * search_s / max(len(q), 1), 4)
    target = np.asarray(asked)[:, None]
    for cut in sorted({1, 10, min(args.k, rows.shape[1])}):
        report[f"recall@{cut}"] = round(float((rows[:, :cut] == target).any(axis=1).mean()), 4)
    hit = rows == target
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)
    report["mrr"] = round(float(np.where(ranks > 0, 1.0 / np.maximum(ranks, 1), 0.0).mean()), 4)

    if pre.kind != "exact" and not args.no_exact:
        t0 = time.perf_counter()
        exact = KBPrefilter(keys, kind="exact")
        _, truth = exact.search(q, args.k)
        report["exact_search_s"] = round(time.perf_counter() - t0, 4)
        overlap = np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(rows, truth, strict=True)])
        report[f"overlap_with_exact@{truth.shape[1]}"] = round(float(overlap), 4)
        report[f"exact_recall@{truth.shape[1]}"] = round(float((truth == target).any(axis=1).mean()), 4)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
