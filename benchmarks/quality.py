"""Answer quality of kblam against in-context facts (ICL), FAISS RAG and zero-shot, on the same base model.

    .venv/bin/python benchmarks/quality.py --quick     # 2 KBs x 20 questions per size (1 KB at 10,000)
    .venv/bin/python benchmarks/quality.py             # 5 KBs x 40 questions per size
    .venv/bin/python benchmarks/quality.py --adapter /path/to/adapter   # not the shipped adapter

Datasets (every system sees the same KBs and the same questions):
- synthetic: held-out test-split KBs of 10, 100, 1,000 and 10,000 triples (`kblam.training.evaluate._test_kb`,
  the KBs and question seeds of `kblam eval`), questions in held-out phrasings;
- real: ISO country and currency codes from pycountry (`kb_builders.real_facts.countries_kb`), 10% of the
  triples held out of the KB for the unanswerable questions;
- counterfactual: the real KB with each property's values swapped among its entities, to see whether answers
  follow the KB or the base model's memory ("contains original" counts answers giving the true value).

About 20% of the questions ask for triples absent from the KB, whose right answer is the refusal sentence.
Metrics per (dataset, method, size), over the answerable questions unless said otherwise:
- top1 / top5: the asked triple is the first / among the first five retrieved (kblam: `answer.sources`
  by KB attention; RAG: the FAISS ranking; ICL and zero-shot retrieve nothing: null);
- contains: the answer contains the gold value (case, spaces and punctuation normalised);
- rouge_l: ROUGE-L F1 against the reference answer "The {property} of {name} is {value}.";
- refusal precision / recall: over all questions, with the unanswerable ones as positives.
ICL puts all triples in the prompt as far as the context window allows; beyond it the cell's status is
"exceeds context N" (nothing is dropped). Results go to benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kb_builders.questions import REFUSAL, question_for, simple_answer  # noqa: E402
from kblam.kb import Triple  # noqa: E402
from kblam.training.evaluate import contains, is_refusal, normalise  # noqa: E402

METHODS = ("kblam", "icl", "rag", "zero-shot")
SIZES = (10, 100, 1000, 10000)
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality.json"


# --------------------------------------------------------------------------- metrics

def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) on normalised word tokens: LCS-based precision and recall."""
    c, r = normalise(candidate).split(), normalise(reference).split()
    if not c or not r:
        return 0.0
    previous = [0] * (len(r) + 1)
    for word in c:
        row = [0]
        for j, ref_word in enumerate(r):
            row.append(previous[j] + 1 if word == ref_word else max(previous[j + 1], row[j]))
        previous = row
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@dataclass
class Item:
    question: str
    triple: Triple  # the asked triple (the KB's version of it for the counterfactual set)
    answerable: bool
    original: Triple | None = None  # counterfactual: the true triple


@dataclass
class Cell:
    """The running tally of one (dataset, method, size)."""

    dataset: str
    method: str
    size: int
    status: str = "ok"
    kbs: int = 0
    questions: int = 0
    answerable: int = 0
    top1_hits: int = 0
    top5_hits: int = 0
    retrieves: bool = False
    contains_hits: int = 0
    original_hits: int = 0
    rouge_sum: float = 0.0
    refused: int = 0
    refused_right: int = 0
    should_refuse: int = 0
    seconds: float = 0.0
    prompt_tokens: list = field(default_factory=list)
    examples: list = field(default_factory=list)

    def add(self, item: Item, text: str, retrieved, refusal: str, keep_examples: int = 2) -> None:
        self.questions += 1
        refusal_said = is_refusal(text, refusal)
        self.refused += refusal_said
        if item.answerable:
            self.answerable += 1
            if retrieved is not None:
                self.retrieves = True
                self.top1_hits += bool(retrieved) and retrieved[0] == item.triple
                self.top5_hits += item.triple in retrieved[:5]
            self.contains_hits += contains(text, item.triple.value)
            self.rouge_sum += rouge_l(text, simple_answer(item.triple))
            if item.original is not None:
                self.original_hits += contains(text, item.original.value)
        else:
            self.should_refuse += 1
            self.refused_right += refusal_said
        if len(self.examples) < keep_examples:
            self.examples.append({"question": item.question, "answer": text,
                                  "gold": item.triple.value if item.answerable else refusal})

    def row(self) -> dict:
        n = self.answerable
        ok = self.status == "ok" and self.questions > 0

        def ratio(a, b):
            return round(a / b, 4) if ok and b else None

        out = {
            "dataset": self.dataset, "method": self.method, "size": self.size, "status": self.status,
            "kbs": self.kbs, "questions": self.questions, "answerable": n, "unanswerable": self.should_refuse,
            "top1": ratio(self.top1_hits, n) if self.retrieves else None,
            "top5": ratio(self.top5_hits, n) if self.retrieves else None,
            "contains": ratio(self.contains_hits, n),
            "rouge_l": ratio(self.rouge_sum, n),
            "refusal_precision": ratio(self.refused_right, self.refused),
            "refusal_recall": ratio(self.refused_right, self.should_refuse),
            "seconds": round(self.seconds, 1),
        }
        if self.dataset == "counterfactual":
            out["contains_original"] = ratio(self.original_hits, n)
        if self.prompt_tokens:
            out["prompt_tokens"] = round(sum(self.prompt_tokens) / len(self.prompt_tokens))
        out["examples"] = self.examples
        return out


# --------------------------------------------------------------------------- datasets

def synthetic_items(kb, absent, n: int, rng: random.Random, unanswerable: float) -> list[Item]:
    """Questions drawn as `kblam.training.evaluate.evaluate_size` draws them (same seeds, same questions)."""
    items = []
    for _ in range(n):
        if rng.random() < unanswerable and absent:
            triple = rng.choice(absent)
            items.append(Item(question_for(triple, rng, heldout=True), triple, False))
        else:
            triple = rng.choice(kb)
            items.append(Item(question_for(triple, rng, heldout=True), triple, True))
    return items


def synthetic_kbs(size: int, kbs: int, questions: int, seed: int, unanswerable: float):
    from kblam.training.evaluate import _test_kb

    for k in range(kbs):
        kb, absent = _test_kb(size, seed + 7919 * k + size)
        yield kb, synthetic_items(kb, absent, questions, random.Random(seed + k), unanswerable)


def real_sets(questions: int, seed: int, unanswerable: float, held_out: float = 0.1):
    """(real KB, its items), (counterfactual KB, its items): the same entities, properties and questions."""
    from kb_builders.real_facts import counterfactual, country_triples

    triples = country_triples()
    swapped = counterfactual(triples, seed=seed)
    assert [(t.name, t.property) for t in swapped] == [(t.name, t.property) for t in triples]
    rng = random.Random(seed)
    absent_rows = set(rng.sample(range(len(triples)), round(held_out * len(triples))))
    keep = [i for i in range(len(triples)) if i not in absent_rows]
    absent = sorted(absent_rows)
    real_kb, cf_kb = [triples[i] for i in keep], [swapped[i] for i in keep]
    rng = random.Random(seed + 1)
    real_items, cf_items = [], []
    for _ in range(questions):
        answerable = not (rng.random() < unanswerable)
        i = rng.choice(keep if answerable else absent)
        q = question_for(triples[i], rng, heldout=True)
        real_items.append(Item(q, triples[i], answerable))
        cf_items.append(Item(q, swapped[i], answerable, original=triples[i] if answerable else None))
    return (real_kb, real_items), (cf_kb, cf_items)


# --------------------------------------------------------------------------- running

def build_systems(model, methods, max_new_tokens: int, batch_size: int) -> dict:
    from baselines import ICLBaseline, KBLaMSystem, RAGBaseline, ZeroShotBaseline

    makers = {
        "kblam": lambda: KBLaMSystem(model, max_new_tokens=max_new_tokens, batch_size=batch_size),
        "icl": lambda: ICLBaseline.from_kblam(model, max_new_tokens=max_new_tokens, batch_size=batch_size),
        "rag": lambda: RAGBaseline.from_kblam(model, max_new_tokens=max_new_tokens, batch_size=batch_size),
        "zero-shot": lambda: ZeroShotBaseline.from_kblam(model, max_new_tokens=max_new_tokens,
                                                         batch_size=batch_size),
    }
    return {m: makers[m]() for m in methods}


def run_kb(cells: dict, dataset: str, size: int, kb, items: list[Item], systems: dict, log) -> None:
    from baselines import ContextOverflow

    questions = [it.question for it in items]
    for method, system in systems.items():
        cell = cells.setdefault((dataset, method, size), Cell(dataset, method, size))
        if cell.status != "ok":
            continue  # e.g. ICL already overflowed on a KB of this size
        began = time.perf_counter()
        try:
            if method == "icl":
                prefix, rests = system.check(questions, kb)
                cell.prompt_tokens += [len(prefix) + len(r) for r in rests]
            results = system.answer(questions, kb)
        except ContextOverflow as err:
            cell.status = err.status
            cell.prompt_tokens.append(err.tokens - system.max_new_tokens)
            log(f"  {dataset:>14} {size:>6} {method:>9}: {err}")
            continue
        cell.kbs += 1
        refusal = getattr(system, "refusal", REFUSAL)
        for item, (text, retrieved) in zip(items, results, strict=True):
            cell.add(item, text, retrieved, refusal)
        cell.seconds += time.perf_counter() - began
        log(f"  {dataset:>14} {size:>6} {method:>9}: {len(items)} questions in {time.perf_counter() - began:.1f} s")


def attention_map(model, seed: int, n_triples: int = 16, n_questions: int = 8) -> dict:
    """kblam's sources scores of 8 questions over a 16-triple held-out KB (for the heat map)."""
    from kblam.training.evaluate import _test_kb

    kb, _ = _test_kb(n_triples, seed)
    rng = random.Random(seed)
    asked = sorted(rng.sample(range(len(kb)), n_questions))
    questions = [question_for(kb[i], rng, heldout=True) for i in asked]
    answers = model.ask(questions, kb=kb, max_new_tokens=32, max_sources=len(kb))
    scores = []
    for a in answers:
        by_triple = {t: s for t, s in a.sources}
        scores.append([round(by_triple.get(t, 0.0), 5) for t in kb])
    return {"triples": [str(t) for t in kb], "questions": questions, "asked": asked,
            "answers": [a.text for a in answers], "scores": scores}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import os

    import torch

    return {"platform": platform.platform(), "processor": cpu_name(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": "cpu", "dtype": "float32", "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}  # other jobs on the machine slow every timing


def adapter_info(model, path) -> dict:
    cfg = model.config
    extra = cfg.extra or {}
    return {"path": str(path) if path else "shipped (kblam/adapters/smollm2-135m-instruct)",
            "trained": cfg.trained, "steps": extra.get("steps"), "base_model": cfg.base_model,
            "encoder": cfg.encoder, "kb_layers": cfg.kb_layers}


def format_rows(rows: list[dict]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [f"{'dataset':>14} {'size':>6} {'method':>9}  top1  top5  cont  rouge ref_p ref_r  status"]
    for r in rows:
        lines.append(f"{r['dataset']:>14} {r['size']:>6} {r['method']:>9}  {f(r['top1']):>4}  {f(r['top5']):>4}  "
                     f"{f(r['contains']):>4}  {f(r['rouge_l']):>4}  {f(r['refusal_precision']):>4}  "
                     f"{f(r['refusal_recall']):>4}  {r['status']}"
                     + (f" (original {f(r['contains_original'])})" if r.get("contains_original") is not None else ""))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 KBs x 20 questions per size (1 KB at 10,000), 20 real questions")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: the one shipped in kblam)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--kbs", type=int, default=None, help="KBs per size (quick 2, full 5)")
    parser.add_argument("--kbs-large", type=int, default=None,
                        help="KBs per size for sizes >= 10,000 (quick 1, full as --kbs)")
    parser.add_argument("--questions", type=int, default=None, help="questions per KB (quick 20, full 40)")
    parser.add_argument("--real-questions", type=int, default=None, help="questions on the real KB (quick 20, full 100)")
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "real", "counterfactual"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--unanswerable", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-attention-map", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own; 1 on a machine busy with other jobs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    kbs = args.kbs or (2 if args.quick else 5)
    kbs_large = args.kbs_large or (1 if args.quick else kbs)
    questions = args.questions or (20 if args.quick else 40)
    real_questions = args.real_questions or (20 if args.quick else 100)

    import torch

    from kblam import KBLaM

    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - began:6.0f} s] {msg}", flush=True)

    model = KBLaM.from_pretrained(args.adapter).eval()
    model.encoder.progress = False
    log(f"loaded model (adapter {args.adapter or 'shipped'}), torch threads {torch.get_num_threads()}")
    systems = build_systems(model, args.methods, args.max_new_tokens, args.batch_size)
    cells: dict = {}
    if "synthetic" in args.datasets:
        for size in args.sizes:
            n_kbs = kbs_large if size >= 10000 else kbs
            for kb, items in synthetic_kbs(size, n_kbs, questions, args.seed, args.unanswerable):
                run_kb(cells, "synthetic", size, kb, items, systems, log)
    wanted = [d for d in ("real", "counterfactual") if d in args.datasets]
    if wanted:
        sets = dict(zip(("real", "counterfactual"), real_sets(real_questions, args.seed, args.unanswerable),
                        strict=True))
        for name in wanted:
            kb, items = sets[name]
            run_kb(cells, name, len(kb), kb, items, systems, log)
    attention = None
    if "kblam" in args.methods and not args.no_attention_map:
        attention = attention_map(model, args.seed)
        log("attention map: 8 questions x 16 triples")
    rows = [c.row() for c in cells.values()]
    result = {
        "meta": {
            "command": " ".join(["benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
            "quick": args.quick, "wall_seconds": round(time.perf_counter() - began, 1),
            "adapter": adapter_info(model, args.adapter), "machine": machine_info(),
            "settings": {"sizes": args.sizes, "kbs": kbs, "kbs_at_10000_plus": kbs_large,
                         "questions_per_kb": questions, "real_questions": real_questions,
                         "unanswerable": args.unanswerable, "max_new_tokens": args.max_new_tokens,
                         "rag_k": 5, "seed": args.seed, "greedy": True,
                         "context_window": getattr(model.base.config, "max_position_embeddings", None),
                         "kblam_prefilter_above": getattr(model, "prefilter_above", None)},
            "refusal": model.config.refusal,
        },
        "results": rows,
        "attention_map": attention,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(format_rows(rows))
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
