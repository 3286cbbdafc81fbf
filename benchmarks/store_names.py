"""What a store's name index (kblam.store.names) saves a question, and that the answers stay the same.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/store_names.py [--size 100000] [--questions 60]

Over benchmarks/scale.py's MiniLM-encoded store of --size synthetic triples (under the kblam cache,
bench-scale; built once, as speed.py does), pre-filtered as ask() reads a store of that size, each
question is asked twice in turn, with the store's name index and without it (as before it: no names,
so the confidence's masked question costs a second encoder call after the forward pass). Each ask
starts with the encoder's cache of recent texts emptied, so each variant meets the question new (the
store's property names stay: they are encoded with its first question either way).

Questions: "What is the P of N?" and "Tell me the p of n." (lower case) over triples spread through the
store, and two the store cannot answer. Reports the encoder calls each way, the median time to the
first token each way, and whether the answers match: text and quoted triples exactly, source scores
within 1e-6, and the largest differences in source score and confidence (encoded in one batch with the question, the masked question's embedding
differs from the one encoded alone by float rounding). Also the index's build time (reading and hashing
the triples) and its load time (from the saved file, checksum included, as a new process loads it).
Prints one JSON object and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--real-workdir", type=Path, default=None, help="default: kblam cache/bench-scale")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "store-names.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from cost import _StepClock
    from scale import child_build
    from speed import _load

    from kblam.defaults import cache_dir
    from kblam.store import KBStore
    from kblam.store import names as store_names

    built = child_build(args.size, str(args.real_workdir or cache_dir() / "bench-scale"), real=True)
    model = _load(None)
    store = KBStore.open(built["store"], readonly=True)
    t0 = time.perf_counter()
    store_names.NameIndex.of(store._st().phys.stream())  # what a build reads and hashes (not saved here)
    build_s = time.perf_counter() - t0
    store.entity_names()  # built and saved, if none was
    store._names = None
    store_names._CHECKED.clear()  # as a new process: the file's sha256 checked again
    t0 = time.perf_counter()
    store.entity_names()
    load_s = time.perf_counter() - t0

    triples = store.view().triples
    half = args.questions // 2
    step = len(store) // max(half, 1)
    questions = [f"What is the {t.property} of {t.name}?" for t in triples.take(range(13, len(store), step))][:half]
    questions += [f"Tell me the {t.property} of {t.name.lower()}." for t in triples.take(range(17, len(store), step))][:half]
    questions += ["What is the capital of Atlantis?", "Who wrote the Iliad?"]

    calls = {"n": 0}
    encode = model.encoder.model.encode

    def counting(texts, **kw):
        calls["n"] += 1
        return encode(texts, **kw)

    model.encoder.model.encode = counting
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a pre-filter index built for the first time says so
        model.ask("What is the capital of France?", store, max_new_tokens=1)  # the store's first question

    with_names = store.entity_names

    def ask(question: str, names: bool) -> tuple[tuple, float, int]:
        store.entity_names = with_names if names else dict
        model.encoder._recent.clear()
        calls["n"], clock = 0, _StepClock()
        t0 = time.perf_counter()
        a = model.ask(question, store, max_new_tokens=args.max_new_tokens, logits_processor=[clock])
        return (a.text, a.confidence, [(t, s) for t, s in a.sources]), clock.times[0] - t0, calls["n"]

    runs = {True: [], False: []}
    for i, q in enumerate(questions):
        for names in (True, False) if i % 2 == 0 else (False, True):  # each side first half the time
            runs[names].append(ask(q, names))
    store.entity_names = with_names

    same = [a[0][0] == b[0][0] and [t for t, _ in a[0][2]] == [t for t, _ in b[0][2]]
            and all(abs(x[1] - y[1]) < 1e-6 for x, y in zip(a[0][2], b[0][2], strict=True))
            for a, b in zip(runs[True], runs[False], strict=True)]
    out = {
        "command": " ".join([".venv/bin/python", "benchmarks/store_names.py", *sys.argv[1:]]),
        "store": built["store"], "triples": len(store), "questions": len(questions),
        "index": repr(store.entity_names()), "build_s": round(build_s, 2), "load_s": round(load_s, 4),
        "same_text_and_sources": sum(same),
        "max_confidence_difference": max(abs(a[0][1] - b[0][1]) for a, b in zip(runs[True], runs[False], strict=True)),
        "max_source_score_difference": max((abs(x[1] - y[1]) for a, b in zip(runs[True], runs[False], strict=True)
                                            for x, y in zip(a[0][2], b[0][2], strict=False)), default=0.0),
        "encoder_calls": {"with_names": sum(r[2] for r in runs[True]), "without": sum(r[2] for r in runs[False])},
        "ttft_s_median": {"with_names": statistics.median(r[1] for r in runs[True]),
                          "without": statistics.median(r[1] for r in runs[False])},
    }
    store.close()
    print(json.dumps(out, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
