"""Write docs/benchmarks.md from benchmarks/results/{quality,cost}.json (the tables, the machine, the commands).

    .venv/bin/python benchmarks/report.py [--results benchmarks/results] [--out docs/benchmarks.md] [--note TEXT]

Run benchmarks/plots.py first for the figures it links (docs/img/*.png).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABEL = {"kblam": "kblam", "kblam-prefilter": "kblam + pre-filter", "icl": "ICL", "rag": "RAG top-5",
         "zero-shot": "zero-shot"}
ORDER = {"kblam": 0, "kblam-prefilter": 1, "icl": 2, "rag": 3, "zero-shot": 4}

COMMANDS = """```bash
# full (the numbers below unless the header says --quick); about an hour or more on two cores
.venv/bin/python benchmarks/quality.py            # -> benchmarks/results/quality.json
.venv/bin/python benchmarks/cost.py               # -> benchmarks/results/cost.json
.venv/bin/python benchmarks/plots.py              # -> docs/img/*.png
.venv/bin/python benchmarks/grounded.py --kbs 1   # -> benchmarks/results/grounded.json (the same questions as kblam eval)
.venv/bin/python benchmarks/report.py             # -> docs/benchmarks.md (this file)

# quick: the same four steps, under ten minutes on two cores
.venv/bin/python benchmarks/quality.py --quick && .venv/bin/python benchmarks/cost.py --quick \\
  && .venv/bin/python benchmarks/plots.py && .venv/bin/python benchmarks/report.py
```

`--adapter PATH` (quality.py, cost.py) evaluates another adapter than the one shipped in
`kblam/adapters/smollm2-135m-instruct/`. On a machine busy with other jobs, add `--threads 1` (or set
`OMP_NUM_THREADS=1`): two torch threads competing with other processes for two cores can run ten times
slower than one. The real-facts KB needs `pycountry` (`pip install -e .[bench]`,
pinned in requirements.txt)."""

SYSTEMS = """| system | what the base model sees |
|---|---|
| kblam | the question; the KB as one key/value knowledge token per triple, read by the trained adapter's rectangular attention on the KB layers (`model.ask`) |
| ICL | every triple as a line "The {property} of {name} is {value}." in the user message, with the instruction to answer from the facts or reply with the refusal sentence; a KB whose prompt (plus the answer's tokens) exceeds the context window is recorded as "exceeds context", never truncated |
| RAG top-5 | the 5 triples whose key sentence "The {property} of {name}" is nearest to the question (all-MiniLM-L6-v2 cosine, exact FAISS index), as text lines, same instruction |
| zero-shot | the question alone, with the instruction to reply with the refusal sentence when it does not know |

All four use the same base model (SmolLM2-135M-Instruct, float32), its chat template and greedy decoding with
the same `max_new_tokens`; the baselines (`benchmarks/baselines.py`) use the base model alone, never the
kblam adapter."""


def _f(value, digits: int = 2) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def _sort(rows):
    return sorted(rows, key=lambda r: (r["size"], ORDER.get(r["method"], 9)))


def machine_line(meta: dict) -> str:
    m = meta.get("machine", {})
    load = m.get("loadavg")
    return (f"{m.get('processor', '?')}, {m.get('cpus', '?')} CPUs, torch {m.get('torch', '?')} on CPU "
            f"({m.get('torch_threads', '?')} threads), {m.get('dtype', 'float32')}, Python {m.get('python', '?')}, "
            f"{m.get('platform', '?')}" + (f"; load average {load[0]:.1f} when the run started" if load else ""))


def quality_section(q: dict) -> list[str]:
    meta, rows = q["meta"], q["results"]
    s = meta["settings"]
    adapter = meta["adapter"]
    lines = [
        "## Quality",
        "",
        f"Command: `{meta['command']}` ({'quick' if meta['quick'] else 'full'}; {meta['wall_seconds']:.0f} s). "
        f"Adapter: {adapter['path']} (trained: {adapter['trained']}, steps: {adapter.get('steps')}), "
        f"KB layers {adapter.get('kb_layers')}.",
        "",
        f"Synthetic: {s['kbs']} held-out test-split KBs per size ({s['kbs_at_10000_plus']} at 10,000 and more) x "
        f"{s['questions_per_kb']} questions in held-out phrasings; real and counterfactual: {s['real_questions']} "
        f"questions. About {s['unanswerable']:.0%} of the questions ask for triples absent from the KB (the right "
        f"answer is the refusal sentence). Greedy, {s['max_new_tokens']} new tokens at most.",
        "",
        "Columns: top-1 / top-5 retrieval of the asked triple (kblam: `answer.sources`, by KB attention; RAG: the "
        "FAISS ranking; ICL and zero-shot retrieve nothing), the answer contains the gold value, ROUGE-L F1 "
        "against \"The {property} of {name} is {value}.\" (these three over answerable questions), refusal "
        "precision and recall (unanswerable questions as positives).",
        "",
        "### Held-out synthetic KBs",
        "",
        "| triples | system | questions | top-1 | top-5 | contains | ROUGE-L | refusal P | refusal R | s | status |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in _sort([r for r in rows if r["dataset"] == "synthetic"]):
        lines.append(_quality_row(r))
    lines += ["", "![quality against KB size](img/quality_vs_size.png)", ""]
    real = [r for r in rows if r["dataset"] in ("real", "counterfactual")]
    if real:
        size = real[0]["size"]
        lines += [
            "### Real facts and a counterfactual copy",
            "",
            f"One KB of {size} real triples built from `pycountry` (`kb_builders.real_facts.countries_kb`: ISO 3166 "
            "alpha-2, alpha-3 and numeric codes and official names of countries, ISO 4217 codes and numbers of "
            "currencies; 10% of the triples held out for the unanswerable questions). The counterfactual KB has "
            "each property's values swapped among its entities (a seeded derangement), so an answer that "
            "follows the KB gives the swapped value; \"contains original\" counts answers that give the true "
            "value instead, i.e. the base model's memory overriding the KB.",
            "",
            "| KB | system | questions | top-1 | top-5 | contains | contains original | ROUGE-L | refusal P | "
            "refusal R | status |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in sorted(real, key=lambda r: (r["dataset"] != "real", ORDER.get(r["method"], 9))):
            lines.append(
                f"| {r['dataset']} | {LABEL.get(r['method'], r['method'])} | {r['questions']} | {_f(r['top1'])} | "
                f"{_f(r['top5'])} | {_f(r['contains'])} | {_f(r.get('contains_original'))} | {_f(r['rouge_l'])} | "
                f"{_f(r['refusal_precision'])} | {_f(r['refusal_recall'])} | {_status(r)} |")
        lines += ["", "![real and counterfactual facts](img/quality_real.png)", ""]
    examples = [(r, e) for r in _sort(rows) for e in r.get("examples", [])[:1] if r["status"] == "ok"]
    if examples:
        lines += ["<details><summary>One example answer per cell</summary>", "",
                  "| KB | system | question | answer | gold |", "|---|---|---|---|---|"]
        for r, e in examples:
            cells = [f"{r['dataset']} {r['size']}", LABEL.get(r["method"], r["method"]), e["question"], e["answer"],
                     e["gold"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
        lines += ["", "</details>", ""]
    if q.get("attention_map"):
        lines += [
            "### Where kblam looks",
            "",
            "kblam's share of KB attention (`answer.sources` with all triples) for 8 questions over a 16-triple "
            "held-out KB; the red squares are the triples asked about.",
            "",
            "![KB attention heat map](img/attention_heatmap.png)",
            "",
        ]
    return lines


def _status(r: dict) -> str:
    return "ok" if r["status"] == "ok" else r["status"] + (f" ({r['prompt_tokens']} prompt tokens)"
                                                          if r.get("prompt_tokens") else "")


def _quality_row(r: dict) -> str:
    return (f"| {r['size']:,} | {LABEL.get(r['method'], r['method'])} | {r['questions']} | {_f(r['top1'])} | "
            f"{_f(r['top5'])} | {_f(r['contains'])} | {_f(r['rouge_l'])} | {_f(r['refusal_precision'])} | "
            f"{_f(r['refusal_recall'])} | {r['seconds']:.0f} | {_status(r)} |")


def cost_section(c: dict) -> list[str]:
    meta = c["meta"]
    s = meta["settings"]
    lines = [
        "## Cost",
        "",
        f"Command: `{meta['command']}` ({'quick' if meta['quick'] else 'full'}; {meta['wall_seconds']:.0f} s). "
        f"Each (system, KB size) ran in a fresh process (peak memory is its own), capped at {s['timeout_s']:.0f} s; "
        f"median of {s['repeats']} question(s) (one for ICL prompts over 2,000 tokens), {s['new_tokens']} new "
        "tokens (end of text suppressed). KB embeddings are fixed random vectors: cost does not depend on them.",
        "",
        "- TTFT: from the call to the first token's logits, for one question: kblam's `ask` (the first question "
        "over a KB projects it through the adapter, later ones reuse the cached states: kblam.kb_cache; a "
        "quick run's one question pays the projection), RAG's question embedding + search + prompt, ICL's whole prefill "
        "(no prefix cache);",
        "- kblam reads the whole KB at every size (`prefilter=False`); \"kblam + pre-filter\" (measured from "
        "10,000 triples) is what `ask` does by default beyond 20,000: a FAISS search narrows each question to "
        "its `prefilter_k` nearest triples, which the rectangular attention then reads;",
        "- peak RSS: the process's peak resident memory (base model, encoder where used, KB, activations); "
        "loading alone peaks above what stays resident, which hides small KBs, so \"peak after load\" is the peak "
        "from the end of loading on (the kernel's mark reset), starting from \"loaded\"; the memory slopes use it;",
        "- KB prep: per KB, once: the FAISS index (RAG), the prompt's tokenization (ICL); KB encode: the sentence "
        "encoder over the KB's texts (kblam: keys and values; RAG: keys), measured up to "
        f"{s['encode_cap']:,} triples and extrapolated linearly beyond (marked *).",
        "",
        "| system | triples | TTFT s | tokens/s | peak RSS MB | loaded MB | peak after load MB | KB prep s | "
        "KB encode s | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(c["runs"], key=lambda r: (ORDER.get(r["method"], 9), r["size"])):
        encode = r.get("kb_encode_s")
        encode_text = "–" if encode is None else f"{encode:.1f}" + ("*" if r.get("encode_extrapolated") else "")
        status = r["status"] + (" (not run)" if r.get("skipped") else "")
        if r.get("prompt_tokens") and r["method"] == "icl":
            status += f", {r['prompt_tokens']:,} prompt tokens"
        size = "– (no KB)" if r["method"] == "zero-shot" else f"{r['size']:,}"
        lines.append(
            f"| {LABEL.get(r['method'], r['method'])} | {size} | {_f(r.get('ttft_s'), 3)} | "
            f"{_f(r.get('tokens_per_s'), 1)} | {_f(r.get('peak_rss_mb'), 0)} | {_f(r.get('rss_loaded_mb'), 0)} | "
            f"{_f(r.get('peak_after_load_mb'), 0)} | {_f(r.get('kb_prep_s'), 3)} | "
            f"{encode_text} | {status} |")
    lines += ["", "![cost against KB size](img/cost_vs_size.png)", ""]
    if c.get("slopes"):
        lines += [
            "### Growth per added triple",
            "",
            "Least-squares slopes of peak memory after loading and of TTFT on the KB size, over the sizes that "
            "ran (r² of the linear fit in brackets). ICL only runs up to its context window, so its slope covers "
            "a few hundred triples at most.",
            "",
            "| system | sizes | memory per added triple | TTFT per added triple |",
            "|---|---|---:|---:|",
        ]
        for method, sl in sorted(c["slopes"].items(), key=lambda kv: ORDER.get(kv[0], 9)):
            lines.append(f"| {LABEL.get(method, method)} | {', '.join(f'{x:,}' for x in sl['sizes'])} | "
                         f"{sl['rss_kb_per_triple']:+.1f} KB ({sl['rss_r2']:.3f}) | "
                         f"{sl['ttft_ms_per_triple']:+.4f} ms ({sl['ttft_r2']:.3f}) |")
        lines.append("")
    if c.get("icl_fits_up_to_triples"):
        lines += [f"ICL fits about {c['icl_fits_up_to_triples']:,} triples in the {s['context_window']:,}-token "
                  "context window (linear fit of prompt tokens on KB size).", ""]
    enc = c.get("encoding", {}).get("measured")
    if enc:
        lines += ["Sentence encoder (all-MiniLM-L6-v2) on the KB texts, measured:", "",
                  "| triples | keys s | values s | triples/s (keys + values) |", "|---:|---:|---:|---:|"]
        lines += [f"| {e['triples']:,} | {e['keys_s']:.2f} | {e['values_s']:.2f} | {e['triples_per_s']:.0f} |"
                  for e in enc]
        lines.append("")
    return lines


GROUNDED_METRICS = ("exact", "contains", "refusal_recall", "false_refusals", "multi_all_values",
                    "counterfactual_follows")


def grounded_section(g: dict) -> list[str]:
    """kblam, RAG top-5 and ICL on the same held-out questions, judged alike (benchmarks/grounded.py)."""
    lines = [
        "## Grounded answers: the exact value or an honest refusal, on the same questions",
        "",
        f"Command: `{g['command']}` ({g['seconds']} s). The KBs and questions are `kblam eval`'s "
        "(kblam/training/answer_eval.py): whole entities, wordings never trained on, typos and lower case, "
        "near-miss unknowns (absent entity, absent property, both, near-duplicate name), and a counterfactual "
        "copy with values swapped among entities. Every system answers each question once and is scored by the "
        "same code. \"exact\": the value and nothing else new (the question's words, function words and the asked "
        "triple's own name and property aside). RAG and ICL refuse by replying the refusal sentence they were "
        f"told to; kblam refuses below its calibrated confidence threshold ({g['threshold']:.2f}).",
        "",
        "| dataset | triples | system | " + " | ".join(GROUNDED_METRICS) + " |",
        "|---|---:|---|" + "---:|" * len(GROUNDED_METRICS),
    ]
    for r in g["rows"]:
        if "status" in r:
            cells = [r["status"]] + ["–"] * (len(GROUNDED_METRICS) - 1)
        else:
            cells = [_f(r.get(m)) for m in GROUNDED_METRICS]
        lines.append(f"| {r['dataset']} | {r['size']:,} | {r['system']} | " + " | ".join(cells) + " |")
    return lines + [""]


def build(results: Path, note: str | None = None) -> str:
    quality_file, cost_file = results / "quality.json", results / "cost.json"
    grounded_file = results / "grounded.json"
    g = json.loads(grounded_file.read_text()) if grounded_file.is_file() else None
    q = json.loads(quality_file.read_text()) if quality_file.is_file() else None
    c = json.loads(cost_file.read_text()) if cost_file.is_file() else None
    meta = (q or c or {}).get("meta", {})
    lines = [
        "# Benchmarks: kblam against in-context facts, RAG and zero-shot",
        "",
        "<!-- Generated by benchmarks/report.py from benchmarks/results/*.json; edit the scripts, not this file. -->",
        "",
        f"Machine: {machine_line(meta)}." if meta else "No results yet: run the commands below.",
        "",
    ]
    if note:
        lines += [f"> {note}", ""]
    lines += ["## Commands", "", COMMANDS, "", "## Systems", "", SYSTEMS, ""]
    if g:
        lines += grounded_section(g)
    if q:
        lines += quality_section(q)
    if c:
        lines += cost_section(c)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--note", default=None, help="a line quoted under the machine (e.g. what else was running)")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(build(args.results, args.note))
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
