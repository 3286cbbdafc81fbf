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
from kblam.display import json_line, printable
from kblam.serve import cli as cli_serve


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
    ask.add_argument("--min-confidence", type=float, default=None,
                     help="refuse below this confidence (default: the adapter's calibrated threshold; 0: never)")

    train = commands.add_parser("train", help="train an adapter from a YAML recipe (train/recipes/)")
    train.add_argument("recipe", help="the YAML recipe")
    train.add_argument("--out", default=None, help="run folder (default: the recipe's); resumes if it has a checkpoint")
    train.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    train.add_argument("--export", default=None, help="after training, save the adapter to this folder")
    train.add_argument("--plan", action="store_true",
                       help="print parameter counts, the peak GPU memory estimate and tokens per step; load nothing")

    evaluate = commands.add_parser(
        "eval", help="measure an adapter's answers on held-out KBs: exact values, refusals (see docs/benchmarks.md)")
    evaluate.add_argument("--adapter", default=None, help="an adapter folder (default: the shipped one)")
    evaluate.add_argument("--datasets", default="synthetic,elements,airports,cities",
                          help="held-out datasets: synthetic (test split) and real-fact KBs (default: all four)")
    evaluate.add_argument("--sizes", default="100,1000", help="KB sizes, comma separated (default 100,1000); "
                          "10,000 and more are read through the pre-filter")
    evaluate.add_argument("--kbs", type=int, default=2, help="KBs per dataset and size (default 2)")
    evaluate.add_argument("--simple", type=int, default=40, help="single-fact questions per KB (default 40)")
    evaluate.add_argument("--unknown", type=int, default=24, help="questions the KB cannot answer, per KB (default 24)")
    evaluate.add_argument("--multi", type=int, default=6, help="multi-fact questions per KB (default 6)")
    evaluate.add_argument("--open", type=int, default=6, help="open-ended questions per KB (default 6)")
    evaluate.add_argument("--counterfactual", type=int, default=20,
                          help="questions per KB over a copy with values swapped among entities (smallest size)")
    evaluate.add_argument("--min-confidence", type=float, default=None, help="default: the adapter's threshold")
    evaluate.add_argument("--tokens", action="store_true",
                          help="answer with the token-level copy mix instead of spans (adapters with a copy gate)")
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument("--json", default=None, help="also write the results to this JSON file")

    calibrate = commands.add_parser(
        "calibrate", help="fit an adapter's answer confidence and refusal threshold on validation KBs")
    calibrate.add_argument("--adapter", default=None, help="an adapter folder (default: the shipped one)")
    calibrate.add_argument("--out", default=None, help="folder for calibration.json (default: the adapter's)")
    calibrate.add_argument("--sizes", default="100,1000,10000",
                           help="KB sizes (default 100,1000,10000; a dataset too small for a size skips it)")
    calibrate.add_argument("--kbs", type=int, default=2, help="KBs per dataset and size (default 2)")
    calibrate.add_argument("--max-false-refusals", type=float, default=0.05,
                           help="the most answerable questions the threshold may refuse on validation (default 0.05)")

    cli_kb.add_parser(commands)
    cli_serve.add_parser(commands)
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
    answers = model.ask(args.questions, kb=kb, max_new_tokens=args.max_new_tokens, max_sources=args.sources,
                        min_confidence=args.min_confidence)
    for answer in answers:  # KB text (and the question) are escaped: see kblam.display
        if args.json:
            sources = [{**t.to_record(), "score": round(s, 4)} for t, s in answer.sources]
            quoted = [t.to_record() for t in answer.quoted]
            confidence = None if answer.confidence is None else round(answer.confidence, 4)
            print(json_line({"question": answer.question, "answer": answer.text, "refused": answer.refused,
                             "confidence": confidence, "quoted": quoted, "sources": sources}))
            continue
        print(f"Q: {printable(answer.question)}\nA: {printable(answer.text)}")
        if answer.confidence is not None:
            print(f"   confidence {answer.confidence:.2f}" + (" (refused)" if answer.refused else ""))
        for triple in answer.quoted:
            print(f"   quoted  {printable(str(triple))}")
        for triple, score in answer.sources:
            print(f"   {score:6.3f}  {printable(str(triple))}")
        print()
    return 0


def _train(args) -> int:
    from transformers.utils import logging as hf_logging

    from kblam.training.loop import TrainConfig, build_model, end_distributed, train
    from kblam.training.plan import check_fits, estimate, visible_gpu_memory

    hf_logging.disable_progress_bar()
    cfg = TrainConfig.from_yaml(args.recipe, out=args.out, steps=args.steps)
    gpu = visible_gpu_memory() if cfg.device == "auto" or cfg.device.startswith("cuda") else None
    if args.plan:
        plan = estimate(cfg, device="cuda")
        print(plan.format())
        if gpu is None:
            cpu = estimate(cfg, device="cpu")
            print(f"no GPU is visible here: on this CPU (float32) the run would need about {cpu.peak / 2**30:.1f} GiB")
        else:
            try:
                check_fits(plan, *gpu)
                print(f"fits this GPU: {gpu[0] / 2**30:.1f} GiB free of {gpu[1] / 2**30:.1f} GiB")
            except ValueError as error:
                print(str(error).split("\n")[0])
        return 0
    if gpu is not None:
        check_fits(estimate(cfg, device="cuda"), *gpu)  # refuse before loading any weights
    model = build_model(cfg)
    try:
        final = train(cfg, model=model)
        print(json.dumps(final))
        if args.export:
            from kblam.training.export import export_adapter

            print(f"adapter saved to {export_adapter(model, cfg, args.export)}")
    finally:
        end_distributed()
    return 0


def _positive_sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise ValueError("--sizes must be positive integers, comma separated")
    return sizes


def _eval(args) -> int:
    from transformers.utils import logging as hf_logging

    from kblam.model import KBLaM
    from kblam.training import answer_eval
    from kblam.training.evaluate import no_kb_matches_base

    hf_logging.disable_progress_bar()
    sizes = _positive_sizes(args.sizes)
    if args.kbs < 1 or min(args.simple, args.unknown, args.multi, args.open, args.counterfactual) < 0:
        raise ValueError("--kbs must be positive and the question counts non-negative")
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    model = KBLaM.from_pretrained(args.adapter)
    threshold = args.min_confidence
    if threshold is None:
        threshold = model.calibrator.threshold if model.calibrator is not None else 0.0
    records = answer_eval.evaluate(
        model, names, sizes, kbs=args.kbs, seed=args.seed, simple=args.simple, unknown=args.unknown,
        multi=args.multi, opened=args.open, counterfactual=args.counterfactual, spans=False if args.tokens else None,
    )
    text, rows = answer_eval.table(records, threshold)
    print(f"refusing below confidence {threshold:.2f}\n{text}")
    kinds = answer_eval.score(records, threshold)
    print("refusal recall by kind of unknown: " + ", ".join(
        f"{k} {kinds[f'recall[{k}]']:.2f}" for k in answer_eval.UNKNOWN_KINDS))
    equal, total = no_kb_matches_base(model, [r.item.question for r in records[:6]])
    print(f"no KB attached: the answer equals the base model's (loaded separately) on {equal}/{total} questions")
    wrong = [r for r in records if not answer_eval.correct(r, threshold)][:12]
    for r in wrong:
        gold = r.item.facts[0].value if r.item.facts and r.item.kind != "open" else "(refusal)" \
            if r.item.kind in answer_eval.UNKNOWN_KINDS else ""
        print(f"  miss [{r.dataset} {r.size} {r.item.kind}] Q: {r.item.question}\n       A: {r.text}  (gold: {gold})")
    if args.json:
        report = {"threshold": threshold, "datasets": names, "sizes": sizes, "kbs": args.kbs, "seed": args.seed,
                  "rows": rows, "overall": kinds, "no_kb_equals_base": [equal, total]}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _calibrate(args) -> int:
    from transformers.utils import logging as hf_logging

    from kblam.model import SHIPPED_ADAPTER, KBLaM
    from kblam.training.calibrate import calibrate, plot

    hf_logging.disable_progress_bar()
    model = KBLaM.from_pretrained(args.adapter)
    calibrator, _ = calibrate(model, sizes=_positive_sizes(args.sizes), kbs=args.kbs,
                              max_false_refusals=args.max_false_refusals)
    out = Path(args.out or args.adapter or SHIPPED_ADAPTER)
    out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {calibrator.save(out)} and {plot(calibrator, out / 'calibration.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kblam.store import KBStoreError

    try:
        with warnings.catch_warnings():  # restored on return: main() may run inside another program
            warnings.showwarning = _show_warning
            commands = {"ask": _ask, "train": _train, "eval": _eval, "calibrate": _calibrate, "kb": cli_kb.run,
                        "serve": cli_serve.run}
            return commands[args.command](args)
    except KeyboardInterrupt:
        print("kblam: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, ModuleNotFoundError, KBStoreError) as error:
        # KBFormatError is a ValueError; its message already names the file, line and problem.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        # Messages quote file names and KB text: escape each line (a conflict list has several).
        print("kblam: error: " + "\n".join(map(printable, str(message).split("\n"))), file=sys.stderr)
        return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line a shell user reads (not a source location)."""
    print(f"kblam: warning: {printable(str(message))}", file=sys.stderr if file is None else file)


if __name__ == "__main__":
    sys.exit(main())
