"""Cost of answering from a KB of 10 to 100,000 triples: kblam against ICL, FAISS RAG and zero-shot.

    .venv/bin/python benchmarks/cost.py --quick       # sizes 10, 1,000, 10,000, 100,000; one run each
    .venv/bin/python benchmarks/cost.py               # sizes 10 ... 100,000; median of 3 runs
    .venv/bin/python benchmarks/cost.py --adapter /path/to/adapter

Every (method, size) runs in a fresh subprocess (this script with --worker), so that its peak resident
memory (ru_maxrss) is its own; each is capped at --timeout seconds (default 300). A setting that fails is
recorded, not dropped: "exceeds context 8192" (ICL), "out of memory", "timeout" or "error: ...". Once a
method overflows or times out at a size, larger sizes are recorded the same way without being run.

Per setting:
- ttft_s: time to first token for one question, from the call (kblam: `model.ask`, which projects the KB
  through the adapter on a KB's first question and reuses the cached states after; RAG: question embedding,
  FAISS search and the prompt; ICL: the whole prompt's prefill, no prefix cache) to the first token's logits;
  "kblam" reads the whole KB at every size (prefilter=False); "kblam-prefilter" (from 10,000 triples) is
  `ask`'s default beyond 20,000: FAISS narrows each question to prefilter_k triples first;
- tokens_per_s: greedy decoding speed over the next tokens (--new-tokens in all, end-of-text suppressed):
  the tokens after the first (kblam: its answer's text, tokenized again) per second, from the first token's
  logits to the answer's return (a quoted span kblam reads in one forward pass counts its tokens);
- peak_rss_mb: the process's peak resident memory (ru_maxrss: model, KB, index, activations); loading
  alone has a transient peak (peak_load_mb) that hides small KBs, so peak_after_load_mb is the peak from
  the end of loading on (the kernel's mark reset through /proc/self/clear_refs), from rss_loaded_mb up;
  memory slopes are fitted on it;
- kb_prep_s: per KB (once, not per question), measured: the FAISS index build (RAG), the prompt's
  tokenization (ICL); kb_encode_s: sentence-encoder time for the KB's texts (kblam: keys and values, RAG:
  keys), measured on up to --encode-cap triples and extrapolated linearly beyond (flagged
  "encode_extrapolated"). The KB itself uses fixed random embeddings: cost does not depend on their values.
Slopes (least squares over the sizes that ran): KB of memory and ms of TTFT per added triple.
Results go to benchmarks/results/cost.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("kblam", "kblam-prefilter", "icl", "rag", "zero-shot")
PREFILTER_FROM = 10000  # kblam-prefilter is measured from this KB size on (ask pre-filters above 20,000)
SIZES = (10, 100, 1000, 10000, 100000)
QUICK_SIZES = (10, 1000, 10000, 100000)
ICL_EXTRA = {False: (30, 300, 500), True: (100,)}  # ICL is measured at these sizes too (it overflows early)
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cost.json"
RESULT_TAG = "RESULT "


# --------------------------------------------------------------------------- worker (one fresh process)

def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux /proc/self/clear_refs); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float | None:
    """The peak RSS since the last reset (VmHWM), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class _StepClock:
    """A logits processor that only notes when each generation step's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _kb_triples(size: int, seed: int):
    from kblam.training.evaluate import _test_kb

    kb, _ = _test_kb(size, seed)
    return kb


def worker(method: str, size: int, args) -> dict:
    """Measure one setting in this (fresh) process."""
    import random
    import warnings

    import torch

    from kb_builders.questions import question_for

    warnings.filterwarnings("ignore")
    out: dict = {"method": method, "size": size, "status": "ok"}
    triples = _kb_triples(size, args.seed) if size else []
    rng = random.Random(args.seed)
    questions = [question_for(triples[i % len(triples)] if triples else _kb_triples(10, 0)[0], rng, heldout=True)
                 for i in range(args.repeats)]
    n = args.new_tokens

    if method == "icl":  # the overflow check needs only the tokenizer: do it before loading weights
        from baselines import ICLBaseline
        from transformers import AutoTokenizer

        from kblam import defaults

        folder = defaults.cache_dir() / "smollm2-135m-instruct-q4_1"  # the converted default's tokenizer
        tok = AutoTokenizer.from_pretrained(folder) if folder.is_dir() else defaults.load_default_base()[1]
        icl = ICLBaseline(None, tok, max_new_tokens=n, context_limit=args.context)
        began = time.perf_counter()
        prefix, rest = icl.split_prompt(questions[0], triples)
        out["kb_prep_s"] = time.perf_counter() - began
        out["prompt_tokens"] = len(prefix) + len(rest)
        if out["prompt_tokens"] + n > args.context:
            out["status"] = f"exceeds context {args.context}"
            return out

    began = time.perf_counter()
    if method.startswith("kblam"):
        from kblam import KBLaM

        model = KBLaM.from_pretrained(args.adapter)
        model.encoder.progress = False
        base, tok, encoder = model.base, model.tokenizer, model.encoder
    else:
        from kblam import defaults

        base, tok = defaults.load_default_base()
        encoder = defaults.load_default_encoder() if method == "rag" else None
    torch.manual_seed(0)
    out["load_s"] = time.perf_counter() - began
    out["peak_load_mb"] = _peak_mb()  # loading has a transient peak of its own (weights read, then converted)
    gc.collect()
    out["rss_loaded_mb"] = _rss_mb()
    reset = _reset_peak()

    from baselines import ICLBaseline, RAGBaseline, ZeroShotBaseline

    dim = 384
    if method.startswith("kblam"):
        import inspect

        from kblam.encoder import KBEmbeddings

        kb = KBEmbeddings(tuple(triples), torch.randn(size, dim), torch.randn(size, dim))
        warm = KBEmbeddings(tuple(triples[:4]), torch.randn(4, dim), torch.randn(4, dim))
        options = {}
        if "prefilter" in inspect.signature(model.ask).parameters:
            # "kblam": the rectangular attention over the whole KB, whatever its size; "kblam-prefilter":
            # ask's FAISS pre-filter to each question's prefilter_k triples (by default above 20,000).
            options["prefilter"] = method == "kblam-prefilter"
            out["prefilter_k"] = getattr(model, "prefilter_k", None) if options["prefilter"] else None
        elif method == "kblam-prefilter":
            out["status"] = "error: this kblam has no pre-filter"
            return out
        if "min_confidence" in inspect.signature(model.ask).parameters:
            # Cost of answering, not of refusing: random KB embeddings match no question, and a calibrated
            # adapter would refuse them at prefill, before any token is generated.
            options["min_confidence"] = 0.0
        if options.get("prefilter"):
            t = time.perf_counter()
            model.prefilter_index(kb)  # built once per KB (cached), like RAG's index
            out["kb_prep_s"] = time.perf_counter() - t

        def run(question, clock):
            answer = model.ask(question, kb=kb, max_new_tokens=n, min_new_tokens=n, logits_processor=[clock],
                               **options)
            return len(tok(answer.text, add_special_tokens=False).input_ids)

        # Through decoding steps, not the prompt alone: a process's first decoding step loads the decoding
        # kernels (numba, ~0.5 s), which a single timed question would otherwise carry.
        model.ask(questions[0], kb=warm, max_new_tokens=4, min_new_tokens=4,
                  **{k: v for k, v in options.items() if k == "min_confidence"})
    else:
        system = {"icl": ICLBaseline, "zero-shot": ZeroShotBaseline}.get(method)
        if method == "rag":
            from kblam.prefilter import KBPrefilter

            system = RAGBaseline(base, tok, encoder, max_new_tokens=n)
            keys = torch.randn(size, dim)
            t = time.perf_counter()
            index = KBPrefilter(keys, kind="exact")
            out["kb_prep_s"] = time.perf_counter() - t
            system._index, system._index_for = index, tuple(triples)  # the random keys stand in for MiniLM's
        else:
            system = system(base, tok, max_new_tokens=n)
        facts = triples if method == "icl" else None

        def run(question, clock):
            if method == "rag":
                facts_now = system.retrieve([question], triples)[0]
            else:
                facts_now = facts
            prefix, rest = system.split_prompt(question, facts_now)
            system.generate_ids([prefix + rest], min_new_tokens=n, logits_processor=[clock])
            return n  # min_new_tokens and the system's max_new_tokens: exactly n

        prefix, rest = system.split_prompt(questions[0], None)
        system.generate_ids([prefix + rest], max_new_tokens=2)  # warm-up
        if method == "rag":
            system.retrieve(questions[:1], triples)
        elif method == "icl" and out["prompt_tokens"] > 2000:
            questions = questions[:1]  # a long prefill: one run (the median of one)
    ttfts, speeds = [], []
    for question in questions:
        clock = _StepClock()
        start = time.perf_counter()
        tokens = run(question, clock)
        end = time.perf_counter()
        ttfts.append(clock.times[0] - start)
        # Tokens after the first, per second from the first token's logits to the answer's return: kblam reads
        # a quoted span in one forward pass (kblam.spans), so counting passes (the clock's steps) undercounts.
        if tokens > 1:
            speeds.append((tokens - 1) / (end - clock.times[0]))
    ttfts.sort()
    speeds.sort()
    out["ttft_s"] = ttfts[len(ttfts) // 2]
    out["tokens_per_s"] = speeds[len(speeds) // 2] if speeds else None
    out["runs"] = len(questions)
    # The reset lowers ru_maxrss too: the whole run's peak is the larger of loading's and the rest's.
    out["peak_rss_mb"] = max(out["peak_load_mb"], _peak_mb())
    hwm = _hwm_mb() if reset else None
    # The peak from the end of loading on: the KB, the index or the prompt, and answering.
    out["peak_after_load_mb"] = hwm if hwm is not None else out["peak_rss_mb"]
    return out


def encode_worker(sizes: list[int], args) -> dict:
    """Sentence-encoder time for the keys and the values of KBs of these sizes (fresh encoder cache each)."""
    import warnings

    warnings.filterwarnings("ignore")
    from kblam import defaults

    encoder = defaults.load_default_encoder()
    encoder.progress = False
    encoder.encode(["warm up", "the encoder"])
    rows = []
    for size in sizes:
        triples = _kb_triples(size, args.seed)
        encoder.clear()
        t = time.perf_counter()
        encoder.encode([x.key_text() for x in triples])
        keys_s = time.perf_counter() - t
        t = time.perf_counter()
        encoder.encode([x.value_text() for x in triples])
        values_s = time.perf_counter() - t
        rows.append({"triples": size, "keys_s": keys_s, "values_s": values_s,
                     "triples_per_s": size / (keys_s + values_s)})
    return {"encoder": defaults.DEFAULT_ENCODER, "measured": rows}


# --------------------------------------------------------------------------- parent

def _spawn(argv: list[str], timeout: float) -> tuple[dict | None, str]:
    env = dict(os.environ)
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):]), "ok"
    lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
    text = lines[-1] if lines else f"exit status {proc.returncode}"  # the exception's own line
    if proc.returncode in (-9, 137) or "out of memory" in text.lower() or "MemoryError" in text:
        return None, "out of memory"
    return None, f"error: {text[-300:]}"


def linear_fit(xs: list[float], ys: list[float]) -> dict | None:
    """Least squares y = a + b x; b, a and r^2."""
    if len(xs) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return {"slope": b, "intercept": a, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def slopes(runs: list[dict]) -> dict:
    out = {}
    for method in METHODS:
        ok = sorted((r for r in runs if r["method"] == method and r["status"] == "ok" and r["size"] > 0),
                    key=lambda r: r["size"])
        if len(ok) < 2:
            continue
        xs = [r["size"] for r in ok]
        mem = linear_fit(xs, [r.get("peak_after_load_mb", r["peak_rss_mb"]) for r in ok])
        ttft = linear_fit(xs, [r["ttft_s"] for r in ok])
        out[method] = {
            "sizes": xs,
            "rss_kb_per_triple": round(mem["slope"] * 1024, 3), "rss_r2": round(mem["r2"], 4),
            "ttft_ms_per_triple": round(ttft["slope"] * 1000, 5), "ttft_r2": round(ttft["r2"], 4),
        }
    return out


def icl_capacity(runs: list[dict], context: int, new_tokens: int) -> int | None:
    """The most triples whose ICL prompt fits the context, from a linear fit of prompt tokens on size."""
    points = [(r["size"], r["prompt_tokens"]) for r in runs if r["method"] == "icl" and r.get("prompt_tokens")]
    fit = linear_fit([x for x, _ in points], [y for _, y in points])
    if fit is None or fit["slope"] <= 0:
        return None
    return int((context - new_tokens - fit["intercept"]) / fit["slope"])


def encode_estimate(encoding: dict, size: int, part: str) -> tuple[float, bool]:
    """Seconds to encode a KB's keys (part 'keys') or keys and values ('both'), and whether extrapolated."""
    rows = encoding["measured"]
    exact = [r for r in rows if r["triples"] == size]
    row, extrapolated = (exact[0], False) if exact else (max(rows, key=lambda r: r["triples"]), True)
    seconds = row["keys_s"] + (row["values_s"] if part == "both" else 0.0)
    return seconds * size / row["triples"], extrapolated


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 10, 1k, 10k, 100k; one run per setting")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: the one shipped in kblam)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=None, help="questions per setting (median; quick 1, full 3)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per setting")
    parser.add_argument("--encode-cap", type=int, default=None,
                        help="largest KB whose encoding is measured (quick 1000, full 5000)")
    parser.add_argument("--context", type=int, default=8192, help="the base model's context window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per setting (default: torch's own; 1 on a busy machine)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        method, size = args.worker
        if method == "encode":
            result = encode_worker([int(s) for s in size.split(",")], args)
        else:
            result = worker(method, int(size), args)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return result

    began = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - began:6.0f} s] {msg}", flush=True)

    sizes = sorted(args.sizes or (QUICK_SIZES if args.quick else SIZES))
    cap = args.encode_cap or (1000 if args.quick else 5000)
    common = ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--seed", str(args.seed),
              "--context", str(args.context)] + (["--adapter", args.adapter] if args.adapter else []) \
        + (["--threads", str(args.threads)] if args.threads else [])

    encode_sizes = sorted({min(s, cap) for s in sizes} | {cap})
    encoding, status = _spawn(["--worker", "encode", ",".join(map(str, encode_sizes)), *common], args.timeout)
    if encoding is None:
        encoding = {"error": status, "measured": []}
    else:
        for r in encoding["measured"]:
            log(f"encode {r['triples']:>6} triples: {r['keys_s'] + r['values_s']:.2f} s "
                f"({r['triples_per_s']:.0f} triples/s, keys and values)")

    runs: list[dict] = []
    plan = [("zero-shot", 0)] if "zero-shot" in args.methods else []
    for method in ("kblam", "kblam-prefilter", "icl", "rag"):
        if method in args.methods:
            method_sizes = sorted(set(sizes) | (set(ICL_EXTRA[args.quick]) if method == "icl" else set()))
            if method == "kblam-prefilter":
                method_sizes = [s for s in method_sizes if s >= PREFILTER_FROM]
            plan += [(method, s) for s in method_sizes]
    stopped: dict[str, str] = {}
    for method, size in plan:
        if method in stopped:
            runs.append({"method": method, "size": size, "status": stopped[method], "skipped": True})
            log(f"{method:>9} {size:>6}: {stopped[method]} (not run: it did at a smaller size)")
            continue
        t = time.perf_counter()
        result, status = _spawn(["--worker", method, str(size), *common], args.timeout)
        if result is None:
            result = {"method": method, "size": size, "status": status}
        result["wall_s"] = round(time.perf_counter() - t, 1)
        if method in ("kblam", "kblam-prefilter", "rag") and encoding.get("measured") and result["status"] == "ok":
            result["kb_encode_s"], result["encode_extrapolated"] = encode_estimate(
                encoding, size, "keys" if method == "rag" else "both")
        runs.append(result)
        if result["status"] != "ok":
            if result["status"].startswith("exceeds context") or result["status"] in ("timeout", "out of memory"):
                stopped[method] = result["status"]
            log(f"{method:>9} {size:>6}: {result['status']}")
        else:
            speed = "-" if result["tokens_per_s"] is None else f"{result['tokens_per_s']:.1f}"
            log(f"{method:>9} {size:>6}: ttft {result['ttft_s']:.3f} s, {speed} tok/s, "
                f"peak {result['peak_rss_mb']:.0f} MB ({result['wall_s']:.0f} s)")
    from quality import machine_info

    result = {
        "meta": {
            "command": " ".join(["benchmarks/cost.py", *(argv if argv is not None else sys.argv[1:])]),
            "quick": args.quick, "wall_seconds": round(time.perf_counter() - began, 1),
            "adapter": args.adapter or "shipped (kblam/adapters/smollm2-135m-instruct)",
            "machine": machine_info(),
            "settings": {"sizes": sizes, "repeats": args.repeats, "new_tokens": args.new_tokens,
                         "timeout_s": args.timeout, "encode_cap": cap, "context_window": args.context,
                         "kb_embeddings": "fixed random (cost does not depend on their values)",
                         "zero_shot": "no KB: measured once, size 0"},
        },
        "encoding": encoding,
        "runs": runs,
        "slopes": slopes(runs),
        "icl_fits_up_to_triples": icl_capacity(runs, args.context, args.new_tokens),
    }
    for r in runs:
        for key, value in list(r.items()):
            if isinstance(value, float):
                r[key] = round(value, 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for method, s in result["slopes"].items():
        log(f"{method:>9}: {s['rss_kb_per_triple']:+.2f} KB and {s['ttft_ms_per_triple']:+.4f} ms TTFT "
            f"per added triple (r2 {s['rss_r2']:.3f} / {s['ttft_r2']:.3f}, sizes {s['sizes']})")
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
