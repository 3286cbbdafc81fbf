"""Why a decoding step's KB products run below the memory's rate: the products of one question's query
rows by one KB layer's bfloat16 states, the states coming from memory (cold) or from the cache (warm).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kb_products.py [--triples 10000]

The shapes are the default model's: 3 KV heads of 64 dimensions, 3 query heads per KV head (one
question, one token). Each figure is the median of --repeats calls, each after a pass over a 256 MB
tensor that pushes the KB out of the caches (cold), or right after the previous call (warm). Rows:
the scores (queries x keys, as kblam.attention multiplies a whole KB), the mix (probabilities x
values), a plain read of the keys (the memory's rate for the same bytes), the scores after reading the
keys first (warming the cache on purpose) and the scores with the keys prepacked for oneDNN (the
layout torch's inductor uses for frozen weights; kblam keeps the plain one, which chunks and edits
slice). Prints one JSON object of milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    heads, group, dim, m = 3, 3, 64, args.triples
    keys = torch.randn(heads, m, dim).bfloat16()
    values = torch.randn(heads, m, dim).bfloat16()
    queries = torch.randn(heads, group, dim).bfloat16()
    probs = torch.rand(heads, group, m).bfloat16()
    flush = torch.zeros(64 << 20)

    def ms(fn, cold: bool = True) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            if cold:
                flush.add_(1)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1e3, 3)

    keys_t = keys.transpose(-1, -2)
    out = {
        "triples": m, "state_mb": round(2 * keys.numel() * keys.element_size() / 1e6, 2),
        "scores_cold": ms(lambda: torch.bmm(queries, keys_t)),
        "scores_warm": ms(lambda: torch.bmm(queries, keys_t), cold=False),
        "mix_cold": ms(lambda: torch.bmm(probs, values)),
        "mix_warm": ms(lambda: torch.bmm(probs, values), cold=False),
        "read_keys_cold": ms(lambda: keys.sum()),
        "read_then_scores_cold": ms(lambda: (keys.sum(), torch.bmm(queries, keys_t))),
    }
    try:
        packed = [torch.ops.mkldnn._reorder_linear_weight(keys[h].contiguous(), group) for h in range(heads)]
        out["prepacked_scores_cold"] = ms(lambda: [torch.ops.mkldnn._linear_pointwise(
            queries[h], packed[h], None, "none", [], "") for h in range(heads)])
    except (AttributeError, RuntimeError) as error:  # a torch build without oneDNN's linear ops
        out["prepacked_scores_cold"] = f"unavailable: {error}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
