"""torch's default threads against one torch thread, with a KB: which setting a user of a CPU should run.

    .venv/bin/python benchmarks/threads.py          # -> benchmarks/results/threads.json

torch takes every core by default. kblam's second thread (kblam.second_thread: the question's KB work beside
the prompt's first layers, a large KB's halves) and its numba kernels (kblam.few_rows: a decoding step's KB
attention, a prompt's softmax without AMX) serve only a process of one torch thread, where a core is left
free. In one process, taking turns question by question (kblam.few_rows reads torch's thread count at each
call): time to first token with full attention over benchmarks/scale.py's MiniLM-encoded stores of 10,000
and 100,000 triples (built once under the kblam cache, as speed.py's goals) and without a KB, and the median
decoding step (32 steps, one pass a token) with 10,000 triples and without a KB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT = ROOT / "benchmarks" / "results" / "threads.json"


def main() -> None:
    import speed
    import torch

    from kblam.defaults import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=12, help="questions a side of each time to first token")
    parser.add_argument("--decodings", type=int, default=4, help="decodings a side")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(1)
    model = speed._load(None)
    kbs = {m: speed._real_kb(m, cache_dir() / "bench-scale") for m in (10_000, 100_000)}

    def threads(n, f):
        def run():
            torch.set_num_threads(n)
            try:
                return f()
            finally:
                torch.set_num_threads(1)
        return run

    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": speed._cpu_name(), "cores": cores,
           "load_average_start": os.getloadavg()}
    n = args.questions
    for m, kb in kbs.items():
        model.ask("warm up", kb, max_new_tokens=1, prefilter=False)
        qs = speed._questions(kb, 2 * n)
        one, default = speed._alternate(threads(1, speed._ttft(model, kb, qs[:n], prefilter=False)),
                                        threads(cores, speed._ttft(model, kb, qs[n:], prefilter=False)), n)
        out[f"ttft_{m}_full"] = {"one_thread_s": one, "default_threads_s": default}
    nokb = [f"What is the capital of country number {i}?" for i in range(2 * n)]
    one, default = speed._alternate(threads(1, speed._ttft(model, None, nokb[:n])),
                                    threads(cores, speed._ttft(model, None, nokb[n:])), n)
    out["ttft_no_kb"] = {"one_thread_s": one, "default_threads_s": default}
    question = speed._questions(kbs[10_000], 1)[0]

    def step(kb):
        def run():
            t = speed._decode_times(model, question, kb, 32)
            return statistics.median([b - a for a, b in zip(t, t[1:], strict=False)])
        return run

    for name, kb in (("decode_step_10000", kbs[10_000]), ("decode_step_no_kb", None)):
        one, default = speed._alternate(threads(1, step(kb)), threads(cores, step(kb)), args.decodings)
        out[name] = {"one_thread_s": one, "default_threads_s": default}
    out["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for key, row in out.items():
        if isinstance(row, dict):
            print(f"{key}: one torch thread {row['one_thread_s'] * 1e3:.1f} ms, torch's default ({cores}) "
                  f"{row['default_threads_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
