"""The `kblam` command: ask questions over a KB file, and inspect KB files.

Exit codes: 0 success, 1 bad input (a file that cannot be read as a KB, an adapter that does not fit),
2 wrong usage (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from kblam import cli_kb
from kblam._version import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kblam", description="Knowledge bases a language model reads directly (KBLaM).")
    parser.add_argument("--version", action="version", version=f"kblam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ask = commands.add_parser("ask", help="answer questions from a KB file (CSV, JSON, JSONL, parquet) or store")
    ask.add_argument("questions", nargs="+", metavar="QUESTION", help="one or more questions, answered as a batch")
    ask.add_argument("--kb", required=True, help="the knowledge base: a file, or a store folder (kblam kb import)")
    ask.add_argument("--adapter", default=None, help="an adapter folder (default: the embedded default model)")
    ask.add_argument("--max-new-tokens", type=int, default=48, help="longest answer in tokens (default 48)")
    ask.add_argument("--sources", type=int, default=3, help="sources to show per answer (default 3)")
    ask.add_argument("--strict", action="store_true", help="refuse a KB with conflicting values")
    ask.add_argument("--json", action="store_true", help="print one JSON object per answer")

    train = commands.add_parser("train", help="train an adapter from a YAML recipe (train/recipes/)")
    train.add_argument("recipe", help="the YAML recipe")
    train.add_argument("--out", default=None, help="run folder (default: the recipe's); resumes if it has a checkpoint")
    train.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    train.add_argument("--export", default=None, help="after training, save the adapter to this folder")

    evaluate = commands.add_parser("eval", help="measure an adapter on held-out synthetic KBs")
    evaluate.add_argument("--adapter", default=None, help="an adapter folder (default: the shipped one)")
    evaluate.add_argument("--sizes", default="100,1000", help="KB sizes, comma separated (default 100,1000)")
    evaluate.add_argument("--kbs", type=int, default=5, help="KBs per size (default 5)")
    evaluate.add_argument("--questions", type=int, default=40, help="questions per KB (default 40)")
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument("--json", default=None, help="also write the results to this JSON file")

    cli_kb.add_parser(commands)
    return parser


def _load_kb(path: str, strict: bool = False):
    from kblam.kb import KnowledgeBase
    from kblam.store import KBStore, is_store

    if is_store(path):  # opened before the model loads, so that a bad store fails at once
        return KBStore.open(path, readonly=True)
    return KnowledgeBase.from_file(path, strict=strict)


def _ask(args) -> int:
    if args.max_new_tokens < 1 or args.sources < 0:
        raise ValueError("--max-new-tokens must be >= 1 and --sources >= 0")
    kb = _load_kb(args.kb, strict=args.strict)
    from transformers.utils import logging as hf_logging

    from kblam.model import KBLaM, UntrainedAdapterWarning

    hf_logging.disable_progress_bar()  # per-tensor loading bars are noise in a shell

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UntrainedAdapterWarning)
        model = KBLaM.from_pretrained(args.adapter)
    if any(issubclass(w.category, UntrainedAdapterWarning) for w in caught):
        print(
            "kblam: WARNING: the adapter is untrained. Answers do not draw on the knowledge base (its\n"
            "       random KB values may even disturb the base model's text) and the sources below are\n"
            "       arbitrary: they show the plumbing, not knowledge-base answers.",
            file=sys.stderr,
        )
    answers = model.ask(args.questions, kb=kb, max_new_tokens=args.max_new_tokens, max_sources=args.sources)
    for answer in answers:
        if args.json:
            sources = [{**t.to_record(), "score": round(s, 4)} for t, s in answer.sources]
            print(json.dumps({"question": answer.question, "answer": answer.text, "sources": sources}, ensure_ascii=False))
            continue
        print(f"Q: {answer.question}\nA: {answer.text}")
        for triple, score in answer.sources:
            print(f"   {score:6.3f}  {triple}")
        print()
    return 0


def _train(args) -> int:
    from transformers.utils import logging as hf_logging

    from kblam.training.loop import TrainConfig, build_model, train

    hf_logging.disable_progress_bar()
    cfg = TrainConfig.from_yaml(args.recipe, out=args.out, steps=args.steps)
    model = build_model(cfg)
    final = train(cfg, model=model)
    print(json.dumps(final))
    if args.export:
        from kblam.training.export import export_adapter

        print(f"adapter saved to {export_adapter(model, cfg, args.export)}")
    return 0


def _eval(args) -> int:
    from dataclasses import asdict

    from transformers.utils import logging as hf_logging

    from kblam.model import KBLaM
    from kblam.training.evaluate import evaluate, format_table

    hf_logging.disable_progress_bar()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.kbs < 1 or args.questions < 1:
        raise ValueError("--sizes, --kbs and --questions must be positive")
    model = KBLaM.from_pretrained(args.adapter)
    results = evaluate(model, sizes, kbs=args.kbs, questions=args.questions, seed=args.seed)
    print(format_table(results))
    from kblam.training.evaluate import no_kb_matches_base

    probes = [e["question"] for r in results for e in r.examples][:6] or ["What is the capital of France?"]
    equal, total = no_kb_matches_base(model, probes)
    print(f"no KB attached: the answer equals the base model's (loaded separately) on {equal}/{total} questions")
    for r in results:
        for example in r.examples:
            print(f"  [{r.size}] Q: {example['question']}\n        A: {example['answer']}  (gold: {example['gold']})")
    if args.json:
        report = {"sizes": [asdict(r) for r in results], "no_kb_equals_base": [equal, total]}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kblam.store import KBStoreError

    try:
        with warnings.catch_warnings():  # restored on return: main() may run inside another program
            warnings.showwarning = _show_warning
            commands = {"ask": _ask, "train": _train, "eval": _eval, "kb": cli_kb.run}
            return commands[args.command](args)
    except KeyboardInterrupt:
        print("kblam: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, ModuleNotFoundError, KBStoreError) as error:
        # KBFormatError is a ValueError; its message already names the file, line and problem.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"kblam: error: {message}", file=sys.stderr)
        return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line a shell user reads (not a source location)."""
    print(f"kblam: warning: {message}", file=sys.stderr if file is None else file)


if __name__ == "__main__":
    sys.exit(main())
