"""kblam against RAG top-5 and in-context facts (ICL) on the SAME held-out questions, judged the same way.

The KBs and questions are `kblam eval`'s (kblam.training.answer_eval: whole entities, held-out wordings,
typos, near-miss unknowns); every system answers each question once and is scored by answer_eval.score.
RAG and ICL answer with the base model alone (benchmarks/baselines.py): their refusal is the refusal
sentence they were told to reply with; kblam refuses below its calibrated threshold.

    python benchmarks/grounded.py --datasets synthetic,elements,airports,cities --sizes 100,1000 \
        --kbs 1 --out benchmarks/results/grounded.json

ICL puts every triple in the prompt: at 1,000 triples the prompt exceeds the model's 8,192-token context
and ICL is reported as such. Writes a JSON report and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # baselines.py beside this script

from baselines import ContextOverflow, ICLBaseline, RAGBaseline  # noqa: E402

from kblam.training import answer_eval  # noqa: E402

METRICS = ("exact", "contains", "refusal_recall", "false_refusals", "multi_all_values", "counterfactual_follows")


def baseline_records(system, kb, items, dataset: str) -> list[answer_eval.Record]:
    answers = system.answer([it.question for it in items], kb)
    refusal = answer_eval.words(system.refusal)
    records = []
    for it, (text, _) in zip(items, answers, strict=True):
        refused = " ".join(refusal) in " ".join(answer_eval.words(text))
        records.append(answer_eval.Record(it, text, [], None, None, refused, {}, len(kb), dataset))
    return records


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--datasets", default="synthetic,elements,airports,cities")
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--kbs", type=int, default=1)
    parser.add_argument("--simple", type=int, default=30)
    parser.add_argument("--unknown", type=int, default=16)
    parser.add_argument("--multi", type=int, default=4)
    parser.add_argument("--counterfactual", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="benchmarks/results/grounded.json")
    args = parser.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    from kb_builders.real_facts import counterfactual as swap
    from kblam.model import KBLaM

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    model = KBLaM.from_pretrained(args.adapter)
    threshold = model.calibrator.threshold if model.calibrator is not None else 0.0
    systems = {"RAG top-5": RAGBaseline.from_kblam(model, k=5, max_new_tokens=48, batch_size=8,
                                                   refusal=model.config.refusal),
               "ICL": ICLBaseline.from_kblam(model, max_new_tokens=48, batch_size=8, refusal=model.config.refusal)}
    rows = []
    began = time.perf_counter()
    for name in [n.strip() for n in args.datasets.split(",") if n.strip()]:
        data = answer_eval.dataset(name)
        for size in (int(s) for s in args.sizes.split(",")):
            if size > 0.9 * len(data.triples):
                continue
            for k in range(args.kbs):
                kb, absent, left_out = answer_eval.draw_kb(data, size, args.seed + k)
                items = answer_eval.build_items(data, kb, absent, left_out, seed=args.seed + k, simple=args.simple,
                                                unknown=args.unknown, multi=args.multi, opened=0)
                cf_kb, cf_items = None, []
                if args.counterfactual:
                    import random

                    swapped = swap(kb, seed=args.seed + k, strict=False)
                    changed = {(t.name, t.property): t for t in swapped}
                    cf_kb = [changed.get((t.name, t.property), t) for t in kb]
                    rng = random.Random(f"cf:{name}:{args.seed + k}")
                    for t in rng.sample(swapped, min(args.counterfactual, len(swapped))):
                        cf_items.append(answer_eval.Item(data.wording(t, rng).format(name=t.name), "counterfactual",
                                                         (t,), t.name))
                results = {"kblam": answer_eval.run(model, kb, items, dataset_name=name)
                           + (answer_eval.run(model, cf_kb, cf_items, dataset_name=name) if cf_items else [])}
                for label, system in systems.items():
                    try:
                        got = baseline_records(system, kb, items, name)
                        if cf_items:
                            got += baseline_records(system, cf_kb, cf_items, name)
                        results[label] = got
                    except ContextOverflow as overflow:
                        results[label] = overflow.status
                for label, records in results.items():
                    row = {"dataset": name, "size": size, "kb": k, "system": label}
                    if isinstance(records, str):
                        row["status"] = records
                    else:
                        row.update(answer_eval.score(records, threshold if label == "kblam" else 0.0))
                    rows.append(row)
                print(f"{name} {size} #{k} done ({time.perf_counter() - began:.0f} s)", flush=True)
    header = "| dataset | triples | system | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (3 + len(METRICS))]
    for row in rows:
        cells = [row.get("status", "-") if "status" in row else
                 ("-" if row[m] != row[m] else f"{row[m]:.2f}") for m in METRICS]
        lines.append(f"| {row['dataset']} | {row['size']:,} | {row['system']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    report = {"command": "python benchmarks/grounded.py " + " ".join(argv or sys.argv[1:]), "threshold": threshold,
              "rows": rows, "seconds": round(time.perf_counter() - began)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
