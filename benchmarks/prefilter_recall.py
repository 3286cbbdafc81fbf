"""Recall of the FAISS pre-filter: is the asked triple among the top-K keys for its question?

    .venv/bin/python benchmarks/prefilter_recall.py [--n 100000] [--k 256] [--questions 500] [--kind auto]

Builds a synthetic KB of --n triples (``kb_builders.synthetic``, test-split entities), encodes
the key sentences with the default MiniLM encoder, builds a ``KBPrefilter`` and asks one held-out
paraphrased question (``kb_builders.questions.question_for``) about each of --questions random
triples. Prints JSON: recall@1/10/K of the asked triple, build and search times, and for an
approximate index its overlap with exact search. With --store DIR the keys go through a
``KBStore`` (timing ``add``) and the index is built from its zero-copy float16 key matrix.
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
    parser.add_argument("--store", type=Path, default=None, help="build through a KBStore in this new folder")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact comparison for ivf/hnsw")
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
        from kblam.store import KBStore

        store = KBStore.create(args.store, encoder)
        store.add(triples, progress=False)
        keys = store.key_matrix()
        report["store"] = str(args.store)
    else:
        texts = [t.key_text() for t in triples]
        keys = encoder.model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True,
                                    show_progress_bar=False).astype(np.float32)
    report["encode_keys_s"] = round(time.perf_counter() - t0, 3)
    report["dim"] = int(keys.shape[1])

    t0 = time.perf_counter()
    pre = KBPrefilter(keys, kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, seed=args.seed)
    report["build_s"] = round(time.perf_counter() - t0, 3)
    report.update(kind=pre.kind, nlist=pre.nlist, nprobe=pre.nprobe, ntotal=pre.ntotal)

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
        report["nprobe_used"] = int(pre.index.nprobe)  # raised for large k: see KBPrefilter
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
