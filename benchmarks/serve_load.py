"""Load on `kblam serve` (issue 11): concurrent clients asking while one client edits the KB.

    .venv/bin/python benchmarks/serve_load.py                      # 32 clients + 5 edits/s, 120 s, batched and one at a time
    .venv/bin/python benchmarks/serve_load.py --seconds 30 --modes batched

For each mode a fresh `kblam serve` process (the default model, OMP_NUM_THREADS=1) serves a store made
from examples/elements.csv: "batched" with micro-batching (--max-batch 32), "single" with --max-batch 1
(one question at a time, the same server otherwise). During --seconds, --clients clients each ask one
question after another (POST /v1/ask, a question about a random element and property) while a writer
changes a "year of discovery" value --edits-per-second times a second (PATCH, a new value each time).

Reported: latency p50/p99 of the answered questions, answers per second (questions answered within the
window / the window), and the counts that must be zero:
- errors: any answer or write that is not a 200;
- lost writes: after the run, through the API and then in the store on disk after the server stopped
  (with KBStore.verify()), each edited triple holds the value of the last acknowledged write;
- torn reads: every answer names the KB version it read; the writer is the only one, so each version's
  values are known (a write's response gives its version). A source or quoted triple whose value is not
  the one its answer's version held is a torn read. `checked` counts the answers with an edited triple
  among their sources (the others cannot show one).
Also the server's batches (from /metrics) and the load average before and after.

Writes benchmarks/results/serve_load.json; docs/serving.md quotes the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ELEMENTS = ROOT / "examples" / "elements.csv"
EDITED = "year of discovery"
ASKED = {"symbol": "What is the symbol of {}?", "atomic number": "What is the atomic number of {}?",
         "discoverer": "Who discovered {}?", EDITED: "What is the year of discovery of {}?",
         "category": "What is the category of {}?"}


def start_server(store: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "kblam.cli", "serve", str(store), "--create", "--port", "0",
                             "--max-batch", str(max_batch), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1)
    raise RuntimeError(f"the server did not start (exit {proc.wait()})")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1] if len(values) > 1 else \
        (values[0] if values else float("nan"))


async def run_mode(mode: str, clients: int, seconds: float, edits_per_second: float, seed: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"serve-load-{mode}-"))
    store = workdir / "kb.kbstore"
    proc, url = start_server(store, 32 if mode == "batched" else 1)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     limits=httpx.Limits(max_connections=clients + 8)) as http:
            while True:
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.2)
            got = await http.post("/v1/kb/import", files={"file": ("elements.csv", ELEMENTS.read_bytes())})
            got.raise_for_status()
            triples = (await http.get("/v1/kb/triples", params={"limit": 1000})).json()
            start_version = triples["version"]
            original = {(t["name"], t["property"]): t["value"] for t in triples["triples"]}
            names = sorted({name for name, _ in original})
            edited = sorted(key for key in original if key[1] == EDITED)
            questions = [ASKED[p].format(n) for n, p in original if p in ASKED]
            for q in questions[:3]:  # warm up: the first batch loads and caches what later ones reuse
                (await http.post("/v1/ask", json={"question": q})).raise_for_status()
            return await measure(http, mode, clients, seconds, edits_per_second, seed, questions, original, edited,
                                 start_version, names, store, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)


async def measure(http, mode, clients, seconds, edits_per_second, seed, questions, original, edited,
                  start_version, names, store, proc) -> dict:
    rng = random.Random(seed)
    load_before = os.getloadavg()
    t0 = time.monotonic()
    deadline = t0 + seconds
    latencies, in_window, answers, errors = [], 0, [], []
    history: list[tuple[int, tuple[str, str], str]] = []  # (version, pair, value) of each acknowledged write
    last_acked: dict[tuple[str, str], str] = {}

    async def client(i: int) -> None:
        nonlocal in_window
        local = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            question = local.choice(questions)
            sent = time.monotonic()
            try:
                got = await http.post("/v1/ask", json={"question": question, "max_sources": 5})
            except httpx.HTTPError as err:
                errors.append(f"ask: {type(err).__name__} {err}")
                continue
            done = time.monotonic()
            if got.status_code != 200:
                errors.append(f"ask: {got.status_code} {got.text[:200]}")
                continue
            latencies.append(done - sent)
            in_window += done <= deadline
            answers.append(got.json()["answers"][0])

    async def writer() -> None:
        k = 0
        while time.monotonic() < deadline:
            tick = time.monotonic()
            k += 1
            pair = rng.choice(edited)
            value = str(1000 + k)  # a new value every time: each write is a new version
            try:
                got = await http.patch("/v1/kb/triples", json={"name": pair[0], "property": pair[1], "value": value})
            except httpx.HTTPError as err:
                errors.append(f"write: {type(err).__name__} {err}")
                continue
            if got.status_code != 200:
                errors.append(f"write: {got.status_code} {got.text[:200]}")
            else:
                history.append((got.json()["version"], pair, value))
                last_acked[pair] = value
            await asyncio.sleep(max(0.0, 1 / edits_per_second - (time.monotonic() - tick)))

    await asyncio.gather(writer(), *(client(i) for i in range(clients)))
    elapsed = time.monotonic() - t0
    load_after = os.getloadavg()

    # Torn reads: the value each edited pair held at each version.
    history.sort()
    versions = [v for v, _, _ in history]
    consecutive = versions == list(range(start_version + 1, start_version + 1 + len(versions)))

    def value_at(version: int, pair) -> str:
        value = original[pair]
        for v, p, val in history:
            if v > version:
                break
            if p == pair:
                value = val
        return value

    torn, checked = 0, 0
    for a in answers:
        triples = [(s["name"], s["property"], s["value"]) for s in a["sources"] + a["quoted"]]
        seen = [(n, p, v) for n, p, v in triples if (n, p) in set(edited)]
        if seen:
            checked += 1
            torn += any(v != value_at(a["kb_version"], (n, p)) for n, p, v in seen)

    # Lost writes: through the API, then on disk once the server has stopped.
    lost_api = 0
    for pair, value in last_acked.items():
        got = (await http.get("/v1/kb/triples", params={"name": pair[0], "property": pair[1]})).json()
        lost_api += [t["value"] for t in got["triples"]] != [value]
    metrics = (await http.get("/metrics")).text
    batches = _sample(metrics, "kblam_batch_questions_count")
    batched_questions = _sample(metrics, "kblam_batch_questions_sum")
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    from kblam.store import KBStore

    with KBStore.open(store, readonly=True) as s:
        s.verify()
        on_disk = {(t.name, t.property): t.value for t in s.triples()}
    lost_disk = sum(on_disk.get(pair) != value for pair, value in last_acked.items())

    return {
        "mode": mode, "clients": clients, "seconds": round(elapsed, 1), "edits_per_second": edits_per_second,
        "answers": len(latencies), "answers_per_second": round(in_window / seconds, 2),
        "p50_s": round(percentile(latencies, 0.50), 3), "p99_s": round(percentile(latencies, 0.99), 3),
        "writes_acknowledged": len(history), "versions_consecutive": consecutive,
        "errors": len(errors), "error_examples": errors[:5], "lost_writes_api": lost_api,
        "lost_writes_disk": lost_disk, "torn_reads": torn, "answers_checked_for_torn_reads": checked,
        "batches": int(batches), "mean_batch": round(batched_questions / batches, 2) if batches else None,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }


def _sample(metrics: str, name: str) -> float:
    found = re.search(rf"^{name} ([0-9.e+]+)$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


def table(results: list[dict]) -> str:
    rows = ["| mode | clients | answers/s | p50 | p99 | mean batch | errors | lost writes (API / disk) | torn reads "
            "(answers checked) | writes acknowledged | load average (1 min) before / after |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['mode']} | {r['clients']} | {r['answers_per_second']} | {r['p50_s']} s | {r['p99_s']} s | "
                    f"{r['mean_batch']} | {r['errors']} | {r['lost_writes_api']} / {r['lost_writes_disk']} | "
                    f"{r['torn_reads']} ({r['answers_checked_for_torn_reads']}) | {r['writes_acknowledged']} | "
                    f"{r['load_average_before'][0]} / {r['load_average_after'][0]} |")
    by_mode = {r["mode"]: r for r in results}
    if {"batched", "single"} <= set(by_mode) and by_mode["single"]["answers_per_second"]:
        speedup = by_mode["batched"]["answers_per_second"] / by_mode["single"]["answers_per_second"]
        rows.append(f"\nMicro-batching: {speedup:.2f}x the answers per second of one question at a time "
                    f"(goal: at least 3x).")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--edits-per-second", type=float, default=5.0)
    parser.add_argument("--modes", default="batched,single")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = parser.parse_args()
    results = []
    for mode in args.modes.split(","):
        print(f"{mode}: {args.clients} clients, {args.edits_per_second} edits/s, {args.seconds:.0f} s ...", flush=True)
        result = asyncio.run(run_mode(mode, args.clients, args.seconds, args.edits_per_second, args.seed))
        print(json.dumps(result), flush=True)
        results.append(result)
    report = {"command": " ".join(["benchmarks/serve_load.py", *sys.argv[1:]]), "cpus": os.cpu_count(),
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(results))


if __name__ == "__main__":
    main()
