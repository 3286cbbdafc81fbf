"""Scale benchmark (issue 5): time to first token and peak memory with 1K to 1M triples on one machine.

    .venv/bin/python benchmarks/scale.py --sizes 1000 10000 100000 1000000

For each size it builds (once, cached under --workdir) a KBStore of synthetic triples
(``kb_builders.synthetic.synthetic_triples``). Sizes up to --real-encode-up-to (10,000) are encoded
with the real MiniLM encoder; larger ones get RANDOM-BUT-FIXED vectors (a unit vector seeded by a hash
of each text, stored under MiniLM's name so that the model accepts them): right for cost, meaningless
for answers. MiniLM's own throughput is measured on --encode-sample triples (5,000) and extrapolated.

Then, each in a fresh subprocess (so peak RSS is that setting's alone), on the embedded default model
(``KBLaM.from_pretrained()``: the shipped adapter, or an untrained one while none ships; same cost):
- ``nokb``: the question without a KB (the baseline of the "TTFT within 2x" goal);
- ``prefilter``: ``ask(question, store, prefilter=True)``: FAISS top-256 candidates, read from the
  store's float16 memmaps;
- ``full``: ``ask(question, store.embeddings(), prefilter=False)``: every triple, through the chunked
  attention. At 1M the adapter's KB states alone are ~15 GB (float32, 10 KB layers x keys and values):
  a setting that fails is recorded with its error, not dropped.
- ``cold``: what a fresh process pays before its first answer (issue 14): load the model, open the
  store read-only, load its saved pre-filter index (memory-mapped), answer one question of
  --answer-tokens tokens; each step timed, plus the time from the process's start.
The build step also builds and saves each store's pre-filter index (``KBStore.prefilter()``), once.
TTFT is ``ask(..., max_new_tokens=1)`` (question encoding, pre-filter search, KB projection, prefill and
one token), median of --repeats distinct questions after one warm-up; ``answer_s`` is one ask of
--answer-tokens new tokens. Peak RSS is ``resource.getrusage`` of the child (model load included), run
under an address-space limit (--mem-limit-gb) so that an infeasible setting fails instead of pushing
the machine into swap or the OOM killer. With a size >= 100,000 it also runs
``benchmarks/prefilter_recall.py --n N --k 256 --store ... --keys-cache ...`` for each --recall size
(default 100,000): recall@256 of the index a store saves, with real MiniLM keys (encoded once and
cached), for the kind "auto" picks and, where that is exact, for IVF too.

Writes benchmarks/results/scale.json (merged with earlier runs, per setting) and the tables in
docs/scale.md between its "scale-results" markers (``--markdown-only`` redoes just the tables).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

OUT = ROOT / "benchmarks" / "results" / "scale.json"
# The results as they were before issue 14 (git show 17b8824:benchmarks/results/scale.json), for comparison.
BEFORE = ROOT / "benchmarks" / "results" / "scale-17b8824.json"
DOCS = ROOT / "docs" / "scale.md"
BEGIN, END = "<!-- scale-results:begin -->", "<!-- scale-results:end -->"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
BUILD_PIECE = 50_000  # triples a build commits at a time
QUESTIONS = [  # distinct questions, so the encoder's per-text cache never answers for it
    "What year was Harbor Lane Analytics founded?",
    "Who is the chief executive of Northwind Cartography?",
    "Where is the headquarters of Quill and Sparrow Books?",
    "When was the novel The Glass Orchard published?",
    "What is the population of the city of Marrowfield?",
    "Which label released the first album of The Copper Lanterns?",
    "Who directed the film A Winter at Calder Point?",
    "What is the tonnage of the ship Mistral Verity?",
    "In which country is Ostvale University located?",
    "What is the product code of the Lumen S7 lamp?",
    "Who founded the band Velvet Meridian?",
]


# ------------------------------------------------------------------------------------------ children


class FixedRandomVectors:
    """A stand-in sentence encoder for the 100K/1M stores: each text's vector is a unit vector drawn
    from a generator seeded by a hash of the text. Deterministic, fast, and meaningless: cost only."""

    def __init__(self, dim: int = 384):
        self.dim = dim

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts, batch_size=None, convert_to_tensor=False, show_progress_bar=False, **_):
        out = np.empty((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            out[i] = np.random.default_rng(seed).standard_normal(self.dim, dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _synthetic(n: int, seed: int = 0):
    from kb_builders.synthetic import synthetic_triples_exactly

    return synthetic_triples_exactly(n, seed=seed, split="all")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _disk_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20


def child_build(n: int, workdir: str, real: bool) -> dict:
    """Build the KBStore for n triples, or reuse the one a previous run built the same way."""
    from kblam.encoder import KBEncoder
    from kblam.store import KBStore

    vectors = "MiniLM" if real else "fixed-random"
    folder = Path(workdir) / f"store-{n}-{vectors}"
    marker = folder / "bench.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        with KBStore.open(folder, readonly=True) as store:
            reuse = len(store) == n
        if reuse:
            info = {**info, **_saved_index(folder, info), **_saved_row_sums(folder, info)}
            marker.write_text(json.dumps(info, indent=1))
            return {**info, "reused": True, "disk_mb": round(_disk_mb(folder), 1)}
    t0 = time.perf_counter()
    triples = _synthetic(n)
    synth_s = time.perf_counter() - t0
    if real:
        from kblam.defaults import load_default_encoder

        encoder = load_default_encoder()
    else:
        encoder = KBEncoder(FixedRandomVectors(), name=MINILM)
    # Committed a piece at a time, so that a build killed part way (the million MiniLM store takes over an
    # hour here, longer than some sessions have left) goes on from its last commit when run again: the
    # triples are the same each time (a seeded generator) and a store's rows keep their order.
    resumed = _committed_rows(folder, encoder)
    if resumed is None:
        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    with (KBStore.open(folder, encoder) if resumed else KBStore.create(folder, encoder)) as store:
        for start in range(resumed or 0, len(triples), BUILD_PIECE):
            store.add(triples[start:start + BUILD_PIECE], progress=False)
            print(f"[build] {len(store):,} of {len(triples):,} triples committed", file=sys.stderr, flush=True)
        count = len(store)
    add_s = time.perf_counter() - t0
    info = {"n": n, "count": count, "store": str(folder), "vectors": vectors,
            "synthetic_s": round(synth_s, 2), "store_add_s": round(add_s, 2), "resumed_from": resumed or 0}
    info = {**info, **_saved_index(folder, info), **_saved_row_sums(folder, info),
            "build_peak_rss_mb": round(_peak_rss_mb())}
    marker.write_text(json.dumps(info, indent=1))
    return {**info, "reused": False, "disk_mb": round(_disk_mb(folder), 1)}


def _committed_rows(folder: Path, encoder) -> int | None:
    """How many triples a killed build of this folder committed (the rows to go on from), or None when
    there is nothing to go on from: no store, an empty one, or one of another encoder."""
    from kblam.store import KBStore

    if not (folder / "manifest.json").is_file():
        return None
    try:
        with KBStore.open(folder, readonly=True) as store:
            rows = len(store)
            same = store.encoder_name == encoder.name
    except Exception:  # a store too broken to open is built afresh
        return None
    return rows if rows and same else None


def _saved_index(folder: Path, info: dict) -> dict:
    """Build and save the store's pre-filter index unless a usable one is saved; its build time."""
    from kblam.store import KBStore
    from kblam.store import index as store_index

    with KBStore.open(folder) as store:
        if not store_index.status(store).startswith("prefilter-"):
            t0 = time.perf_counter()
            store_index.build(store, progress=False)
            info = {**info, "index_build_s": round(time.perf_counter() - t0, 2)}
        return {"index_build_s": info.get("index_build_s"), "index": store_index.status(store),
                "index_mb": round(sum(p.stat().st_size for p in folder.glob("prefilter-*.faiss")) / 2**20, 1)}


def _saved_row_sums(folder: Path, info: dict) -> dict:
    """Save the store's row checksums (KBStore.check(), as `kblam kb index` does) unless they are saved;
    how long that took. In a process of its own: the blocks it checks must not count as checked in the
    process that measures questions over the store, as a new process's."""
    code = ("import sys, time; from kblam.store import KBStore, rowsums\n"
            "with KBStore.open(sys.argv[1], readonly=True) as s:\n"
            "    t0 = time.perf_counter()\n"
            "    if not rowsums.status(s).startswith('rowsums-'): s.check(progress=False); print(time.perf_counter() - t0)")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], check=True, capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip()
    return {"row_sums_s": round(float(out), 2) if out else info.get("row_sums_s")}


def child_encode(sample: int) -> dict:
    """MiniLM throughput: KBStore.add of `sample` synthetic triples (keys + de-duplicated values)."""
    import torch

    from kblam.defaults import load_default_encoder
    from kblam.store import KBStore

    triples = _synthetic(sample, seed=1)
    encoder = load_default_encoder()
    texts = len(set(t.key_text() for t in triples) | set(t.value_text() for t in triples))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with KBStore.create(Path(tmp) / "kb", encoder) as store:
            store.add(triples, progress=False)
        seconds = time.perf_counter() - t0
    return {"sample": sample, "distinct_texts": texts, "seconds": round(seconds, 2),
            "triples_per_s": round(sample / seconds, 1), "texts_per_s": round(texts / seconds, 1),
            "torch_threads": torch.get_num_threads(), "encoder": MINILM}


def child_measure(n: int, mode: str, store: str | None, repeats: int, answer_tokens: int, k: int) -> dict:
    import psutil
    import torch

    from kblam import KBLaM
    from kblam.store import KBStore

    rec: dict = {"n": n, "mode": mode, "torch_threads": torch.get_num_threads(),
                 "loadavg_1min": round(os.getloadavg()[0], 2)}
    t_start = time.perf_counter()
    if mode == "cold":
        return child_cold(rec, store, answer_tokens)
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrained-adapter warning: fine for cost
            model = KBLaM.from_pretrained()
        rec["load_model_s"] = round(time.perf_counter() - t0, 2)
        rec["adapter_trained"] = model.config.trained
        rec["rss_after_load_mb"] = round(psutil.Process().memory_info().rss / 2**20)
        kb, options = None, {}
        if mode != "nokb":
            t0 = time.perf_counter()
            kb = KBStore.open(store, readonly=True)
            rec["open_store_s"] = round(time.perf_counter() - t0, 3)
            rec["triples"] = len(kb)
            if mode == "prefilter":
                t0 = time.perf_counter()
                index = model.prefilter_index(kb)
                rec["index_build_s"] = round(time.perf_counter() - t0, 3)
                rec["index"] = repr(index)
                options = {"prefilter": True, "prefilter_k": k}
            else:
                t0 = time.perf_counter()
                kb = kb.embeddings()
                rec["load_embeddings_s"] = round(time.perf_counter() - t0, 3)
                rec["kb_chunk_size"] = model.kb_chunk_size
                options = {"prefilter": False}
        times = []
        for question in QUESTIONS[: repeats + 1]:
            t0 = time.perf_counter()
            model.ask(question, kb, max_new_tokens=1, **options)
            times.append(time.perf_counter() - t0)
        rec["ttft_warmup_s"] = round(times[0], 3)
        rec["ttft_s"] = round(statistics.median(times[1:]), 3)
        rec["ttft_all_s"] = [round(t, 3) for t in times[1:]]
        t0 = time.perf_counter()
        answer = model.ask(QUESTIONS[-1], kb, max_new_tokens=answer_tokens, **options)
        rec["answer_s"] = round(time.perf_counter() - t0, 3)
        rec["answer_tokens"] = len(model.tokenizer(answer.text, add_special_tokens=False)["input_ids"])
    except (MemoryError, RuntimeError) as err:
        rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        rec["failed_after_s"] = round(time.perf_counter() - t_start, 2)
    rec["peak_rss_mb"] = round(_peak_rss_mb())
    return rec


def child_cold(rec: dict, store: str, answer_tokens: int) -> dict:
    """A fresh process's first answer: model, store, saved index, one question; each step timed."""
    import psutil

    from kblam import KBLaM
    from kblam.store import KBStore

    started = psutil.Process().create_time()
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = KBLaM.from_pretrained()
        rec["load_model_s"] = round(time.perf_counter() - t0, 2)
        t_open = t0 = time.perf_counter()
        kb = KBStore.open(store, readonly=True)
        rec["open_store_s"] = round(time.perf_counter() - t0, 3)
        rec["triples"] = len(kb)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            index = kb.prefilter()
        rec["load_index_s"] = round(time.perf_counter() - t0, 3)
        rec["index"] = repr(index)
        rec["index_warnings"] = [str(w.message)[:200] for w in said]
        t0 = time.perf_counter()
        answer = model.ask(QUESTIONS[0], kb, max_new_tokens=answer_tokens)
        rec["first_answer_s"] = round(time.perf_counter() - t0, 3)
        rec["open_to_answer_s"] = round(time.perf_counter() - t_open, 3)
        rec["answer_tokens"] = len(model.tokenizer(answer.text, add_special_tokens=False)["input_ids"])
        rec["from_process_start_s"] = round(time.time() - started, 2)
    except (MemoryError, RuntimeError) as err:
        rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    rec["peak_rss_mb"] = round(_peak_rss_mb())
    return rec


def _child_main(spec: str) -> None:
    task = json.loads(spec)
    kind = task.pop("task")
    threads = task.pop("threads", None)
    if threads:  # torch's and FAISS's OpenMP pools
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    result = {"build": child_build, "encode": child_encode, "measure": child_measure}[kind](**task)
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ parent


def _limit_memory(gb: float):
    def apply():
        import resource

        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_child(task: dict, mem_limit_gb: float, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(task)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_limit_memory(mem_limit_gb), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**_label(task), "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    return {**_label(task), "error": f"{why} after {time.perf_counter() - t0:.1f} s: {tail}"}


def _label(task: dict) -> dict:
    return {k: task[k] for k in ("n", "mode") if k in task}


def machine_info() -> dict:
    import faiss
    import psutil
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu, "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "faiss": faiss.__version__,
        "torch_threads": torch.get_num_threads(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def goals(results: dict) -> dict:
    by = {(m["n"], m["mode"]): m for m in results.get("measure", [])}
    out = {}
    big = by.get((1_000_000, "prefilter"))
    if big and "ttft_s" in big:
        out["1M prefilter: answer < 2 s"] = {"ttft_s": big["ttft_s"], "answer_s": big["answer_s"],
                                             "met_ttft": big["ttft_s"] < 2, "met_answer": big["answer_s"] < 2}
        out["1M prefilter: peak memory < 4 GB"] = {"peak_rss_mb": big["peak_rss_mb"],
                                                   "met": big["peak_rss_mb"] < 4096}
    cold = by.get((1_000_000, "cold"))
    if cold and "open_to_answer_s" in cold:
        out["1M, fresh process: open the store and answer its first question < 5 s"] = {
            "open_to_answer_s": cold["open_to_answer_s"], "load_model_s": cold["load_model_s"],
            "from_process_start_s": cold["from_process_start_s"], "met": cold["open_to_answer_s"] < 5}
        out["1M, fresh process: peak memory < 4 GB"] = {"peak_rss_mb": cold["peak_rss_mb"],
                                                       "met": cold["peak_rss_mb"] < 4096}
    for rec in _recall_runs(results):
        if rec.get("n") in (100_000, 1_000_000) and "error" not in rec:
            out[f"recall@{rec['k']} of the saved {rec['kind']} index at {rec['n']:,} (MiniLM keys) >= 0.99"] = {
                "recall": rec.get(f"recall@{rec['k']}"), "met": rec.get(f"recall@{rec['k']}", 0) >= 0.99}
    mid, base = by.get((100_000, "prefilter")), by.get((0, "nokb"))
    if mid and base and "ttft_s" in mid and "ttft_s" in base:
        ratio = mid["ttft_s"] / base["ttft_s"]
        out["100K prefilter: TTFT within 2x of no KB"] = {"ratio": round(ratio, 2), "met": ratio <= 2}
    return out


def _recall_runs(results: dict) -> list[dict]:
    rec = results.get("recall") or []
    return [rec] if isinstance(rec, dict) else rec  # one run (a dict) before issue 14


def _merge(old: list[dict], new: list[dict], key) -> list[dict]:
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    return sorted(merged.values(), key=key)


def markdown(results: dict) -> str:
    def cell(x, fmt="{}"):
        return "" if x is None else fmt.format(x)

    lines = [f"Last run {results.get('machine', {}).get('when', '?')} on "
             f"{results.get('machine', {}).get('cores', '?')} cores ({results.get('machine', {}).get('cpu', '?')}), "
             f"{results.get('machine', {}).get('memory_gb', '?')} GB RAM "
             f"(load average at start {results.get('machine', {}).get('loadavg_at_start')}).", ""]
    lines += ["| triples | mode | threads | load avg | open store (s) | index / embeddings (s) | TTFT (s) "
              "| answer (s, tokens) | peak RSS (MB) | note |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in results.get("measure", []):
        if m.get("mode") == "cold":
            continue
        prep = m.get("index_build_s", m.get("load_embeddings_s"))
        answer = f"{m['answer_s']} ({m['answer_tokens']})" if "answer_s" in m else ""
        note = m.get("index", "")
        if m.get("mode") == "full" and m.get("kb_chunk_size") and m["n"] > m["kb_chunk_size"]:
            note = f"chunked attention ({m['kb_chunk_size']} per chunk)"
        if "error" in m:
            note = f"**failed**: {m['error']}"
        lines.append(f"| {m['n']:,} | {m['mode']} | {cell(m.get('torch_threads'))} | {cell(m.get('loadavg_1min'))} "
                     f"| {cell(m.get('open_store_s'))} | {cell(prep)} "
                     f"| {cell(m.get('ttft_s'))} | {answer} | {cell(m.get('peak_rss_mb'))} | {note} |")
    colds = [m for m in results.get("measure", []) if m.get("mode") == "cold"]
    if colds:
        lines += ["", "A fresh process's first answer (`cold`): load the model, open the store, load its saved "
                      "pre-filter index, answer one question:", "",
                  "| triples | threads | load avg | load model (s) | open store (s) | load index (s) "
                  "| first answer (s, tokens) | open + index + answer (s) | from process start (s) | peak RSS (MB) | note |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for m in colds:
            answer = f"{m['first_answer_s']} ({m['answer_tokens']})" if "first_answer_s" in m else ""
            note = f"**failed**: {m['error']}" if "error" in m else m.get("index", "")
            lines.append(f"| {m['n']:,} | {cell(m.get('torch_threads'))} | {cell(m.get('loadavg_1min'))} "
                         f"| {cell(m.get('load_model_s'))} "
                         f"| {cell(m.get('open_store_s'))} | {cell(m.get('load_index_s'))} | {answer} "
                         f"| {cell(m.get('open_to_answer_s'))} | {cell(m.get('from_process_start_s'))} "
                         f"| {cell(m.get('peak_rss_mb'))} | {note} |")
    enc = results.get("encode") or {}
    lines += ["", "| triples | KB vectors | store on disk (MB) | store build (s) | MiniLM encoding (s) "
                  "| index build, once (s) | index file (MB) |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for b in results.get("build", []):
        if "error" in b:
            lines.append(f"| {b['n']:,} | error: {b['error']} | | | | | |")
            continue
        if b["vectors"] == "MiniLM":
            minilm = f"{b['store_add_s']} (measured)"
        elif enc.get("triples_per_s"):
            minilm = f"~{b['n'] / enc['triples_per_s']:,.0f} (extrapolated)"
        else:
            minilm = ""
        lines.append(f"| {b['n']:,} | {b['vectors']} | {b['disk_mb']} | {b['store_add_s']} | {minilm} "
                     f"| {cell(b.get('index_build_s'))} | {cell(b.get('index_mb'))} |")
    if enc:
        lines += ["", f"MiniLM through `KBStore.add`: {enc['triples_per_s']} triples/s "
                      f"({enc['texts_per_s']} distinct texts/s) on {enc['sample']:,} triples, "
                      f"torch threads: {enc['torch_threads']}."]
    runs = _recall_runs(results)
    if runs:
        lines += ["", "Pre-filter recall, real MiniLM keys of synthetic triples, held-out paraphrased questions "
                      "(`benchmarks/prefilter_recall.py`; with a store, the index a fresh reader loads from it):", "",
                  "| triples | index | questions | recall@1 | recall@10 | recall@k (k) | overlap with exact "
                  "| ms per question | index build (s) | MiniLM key encoding (s) |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for rec in runs:
            if "error" in rec:
                lines.append(f"| {rec.get('n', 0):,} | error: {rec['error']} | | | | | | | | |")
                continue
            saved = "saved, mapped: " if rec.get("store") else ""
            index = f"{saved}{rec['kind']}" + (f" (nlist {rec['nlist']}, nprobe {rec.get('nprobe_used')})"
                                                if rec["kind"] == "ivf" else "")
            encode = (rec.get("keys_cache") or {}).get("encode_s", rec.get("encode_keys_s"))
            lines.append(f"| {rec['n']:,} | {index} | {rec['questions']} | {rec.get('recall@1')} "
                         f"| {rec.get('recall@10')} | {rec.get('recall@' + str(rec['k']))} ({rec['k']}) "
                         f"| {cell(rec.get('overlap_with_exact@' + str(rec['k'])))} "
                         f"| {rec.get('search_ms_per_question')} | {rec.get('build_s')} | {cell(encode)} |")
    if BEFORE.is_file():
        old = {(m["n"], m["mode"]): m for m in json.loads(BEFORE.read_text()).get("measure", [])}
        new = {(m["n"], m["mode"]): m for m in results.get("measure", [])}
        b, cold = old.get((1_000_000, "prefilter")), new.get((1_000_000, "cold"))
        if b and cold and "open_to_answer_s" in cold:
            before = json.loads(BEFORE.read_text()).get("machine", {}).get("loadavg_at_start")
            lines += ["", f"Before issue 14 (main at 17b8824, `{BEFORE.relative_to(ROOT)}`, load average {before}), "
                          f"a process opened the 1M store in {b['open_store_s']} s (every triple parsed) and built the "
                          f"IVF index in {b['index_build_s']} s: "
                          f"{b['open_store_s'] + b['index_build_s'] + b['ttft_s']:.1f} s to its first token, peak "
                          f"{b['peak_rss_mb']} MB. Now a fresh process opens the store, loads the saved index and "
                          f"has a {cold['answer_tokens']}-token answer in {cold['open_to_answer_s']} s, peak "
                          f"{cold['peak_rss_mb']} MB (load average {cold.get('loadavg_1min')})."]
    if results.get("goals"):
        lines += ["", "Goals:", ""] + [f"- {name}: `{json.dumps(v)}`" for name, v in results["goals"].items()]
    return "\n".join(lines)


def write_docs(results: dict, path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from markers import write_between

    write_between(path, BEGIN, END, markdown(results), "Scale")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--modes", nargs="+", default=["prefilter", "full", "cold"],
                        choices=["prefilter", "full", "cold"])
    parser.add_argument("--real-encode-up-to", type=int, default=10_000,
                        help="sizes up to this are encoded with MiniLM; larger get fixed random vectors")
    parser.add_argument("--encode-sample", type=int, default=5000, help="triples for MiniLM throughput (0: skip)")
    parser.add_argument("--repeats", type=int, default=5, help="timed questions after the warm-up")
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--k", type=int, default=256, help="pre-filter candidates per question")
    parser.add_argument("--recall", type=int, nargs="*", default=None,
                        help="run prefilter_recall.py on stores of these sizes (default 100000 if a size >= "
                             "100000; none given: skip)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the stores are built (default: kblam cache)")
    parser.add_argument("--mem-limit-gb", type=float, default=None,
                        help="address-space limit per child (default: 60%% of RAM)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/FAISS threads per child (default: all cores); 1 on a machine shared with "
                             "another job, where OpenMP threads spin-wait for a descheduled sibling")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--markdown-only", action="store_true", help="only redo the tables from --out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child_main(args.child)

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.markdown_only:
        write_docs(results, args.docs)
        return
    import psutil

    from kblam.defaults import cache_dir

    workdir = args.workdir or cache_dir() / "bench-scale"
    workdir.mkdir(parents=True, exist_ok=True)
    limit = args.mem_limit_gb or 0.6 * psutil.virtual_memory().total / 2**30
    results["machine"] = machine_info() | {"mem_limit_gb": round(limit, 1)}
    results["commands"] = sorted(set(results.get("commands", [])) | {" ".join([".venv/bin/python", *sys.argv])})

    def step(task: dict) -> dict:
        task = {**task, "threads": args.threads}
        print(f"[scale] {task}", file=sys.stderr, flush=True)
        out = run_child({k: (str(v) if isinstance(v, Path) else v) for k, v in task.items()}, limit, args.timeout)
        print(f"[scale]   -> {json.dumps(out)}", file=sys.stderr, flush=True)
        return out

    if args.encode_sample:
        results["encode"] = step({"task": "encode", "sample": args.encode_sample})
    builds, measures = [], []
    for n in args.sizes:
        builds.append(step({"task": "build", "n": n, "workdir": workdir, "real": n <= args.real_encode_up_to}))
    common = {"repeats": args.repeats, "answer_tokens": args.answer_tokens, "k": args.k}
    measures.append(step({"task": "measure", "n": 0, "mode": "nokb", "store": None, **common}))
    for n, build in zip(args.sizes, builds, strict=True):
        for mode in args.modes:
            if "error" in build:
                measures.append({"n": n, "mode": mode, "error": "no store: " + build["error"]})
                continue
            measures.append(step({"task": "measure", "n": n, "mode": mode, "store": build["store"], **common}))
    recall_sizes = args.recall if args.recall is not None else ([100_000] if max(args.sizes) >= 100_000 else [])
    recalls = []
    for n in recall_sizes:
        # "auto" is exact up to 200,000 keys: measure IVF there too, which is what larger stores get.
        for kind in ["auto"] + (["ivf"] if n <= 200_000 else []):
            cache = cache_dir() / "bench-recall"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "prefilter_recall.py"), "--n", str(n),
                   "--k", str(args.k), "--kind", kind, "--store", str(cache / f"store-{n}"),
                   "--keys-cache", str(cache / f"keys-{n}-seed0.npy")]
            env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
            print(f"[scale] {' '.join(cmd)}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            try:
                recalls.append(json.loads(proc.stdout))
            except json.JSONDecodeError:
                recalls.append({"n": n, "kind": kind, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]})
    if recalls:
        results["recall"] = _merge(_recall_runs(results), recalls, key=lambda r: (r["n"], r.get("kind_asked", r.get("kind"))))

    results["build"] = _merge(results.get("build", []), builds, key=lambda r: r["n"])
    results["measure"] = _merge(results.get("measure", []), measures, key=lambda r: (r["n"], r["mode"]))
    results["notes"] = [
        f"KBs above {args.real_encode_up_to:,} triples use random-but-fixed vectors (FixedRandomVectors), "
        "not MiniLM: the cost is the same, answers and sources are meaningless. MiniLM encoding time "
        "for them is extrapolated from the measured throughput.",
        "The model is KBLaM.from_pretrained(): the shipped adapter (adapter_trained per setting), or a fresh "
        "untrained one while none ships; the cost is the same.",
        "peak_rss_mb is the whole child process (ru_maxrss), model load included; file pages of the "
        "store's memory maps count while resident.",
    ]
    results["goals"] = goals(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    write_docs(results, args.docs)
    print(markdown(results))


if __name__ == "__main__":
    main()
