"""Forward-pass cost of reading a KB on the embedded default model, against the base model alone.

    .venv/bin/python benchmarks/forward_overhead.py [--batch 8] [--tokens 64] [--sizes 0 100 1000 10000]

Prints seconds per forward (median of --repeats) for each KB size; 0 means no KB attached (the base path).
KB embeddings are random: this measures cost, not quality.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kblam import KBLaM
from kblam.encoder import KBEmbeddings
from kblam.kb import Triple


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = KBLaM.from_pretrained()
    ids = torch.randint(100, 10000, (args.batch, args.tokens))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.tokens} tokens")
    print(f"KB layers {model.config.kb_layers}")
    for m in args.sizes:
        if m:
            kb = KBEmbeddings(
                tuple(Triple(f"e{j}", "p", "v") for j in range(m)),
                torch.randn(m, model.encoder.dim),
                torch.randn(m, model.encoder.dim),
            )
        times = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                model(input_ids=ids, kb=kb if m else None)
                times.append(time.perf_counter() - start)
        print(f"KB size {m:>6}: {statistics.median(times[1:]):.3f} s per forward")


if __name__ == "__main__":
    main()
