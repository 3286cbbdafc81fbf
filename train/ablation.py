"""Train the ablation recipes (resuming any half-done run) and measure each on held-out KBs of 100 triples.

    .venv/bin/python train/ablation.py [--kbs 2] [--questions 30] [recipes ...]

Writes train/recipes/ablations/results.json and results.md (the table in the shipped model card).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent / "recipes" / "ablations"
ORDER = ["paper", "retrieval-loss", "prior", "copy"]


def main(argv=None) -> int:
    from transformers.utils import logging as hf_logging

    from kblam.training.evaluate import evaluate_size
    from kblam.training.export import read_log
    from kblam.training.loop import TrainConfig, build_model, train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=ORDER)
    parser.add_argument("--kbs", type=int, default=2)
    parser.add_argument("--questions", type=int, default=30)
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    results_path = HERE / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.recipes:
        cfg = TrainConfig.from_yaml(HERE / f"{name}.yaml")
        model = build_model(cfg)
        train(cfg, model=model)
        model.eval()
        r = evaluate_size(model, 100, kbs=args.kbs, questions=args.questions, seed=4321)
        log = read_log(cfg.out)
        tail = log[-25:]
        results[name] = {
            "steps": cfg.steps,
            "answer_loss_last25": round(sum(x["answer_loss"] for x in tail) / len(tail), 3),
            "seconds_per_step": round(sum(x["seconds"] for x in log) / len(log), 2),
            "top1": r.top1, "contains": r.contains,
            "refusal_precision": r.refusal_precision, "refusal_recall": r.refusal_recall,
            "questions": r.questions, "kbs": args.kbs, "examples": r.examples,
        }
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "examples"}), flush=True)
    (HERE / "results.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    def f(x):
        return "-" if x is None or x != x else f"{x:.2f}"

    lines = ["| recipe | steps | answer loss (last 25 steps) | top-1 | answer contains gold | refusal P | refusal R |",
             "|---|---|---|---|---|---|---|"]
    for name in [n for n in ORDER if n in results] + [n for n in results if n not in ORDER]:
        r = results[name]
        lines.append(f"| {name} | {r['steps']} | {r['answer_loss_last25']:.3f} | {f(r['top1'])} | {f(r['contains'])} | "
                     f"{f(r['refusal_precision'])} | {f(r['refusal_recall'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
