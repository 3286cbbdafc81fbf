"""Does keeping the KB states in bfloat16 change the answers? The grounded-answer evaluation, both ways.

    .venv/bin/python benchmarks/precision.py                       # synthetic + elements, 100 triples, 1 KB
    .venv/bin/python benchmarks/precision.py --datasets synthetic,elements,airports --kbs 2

Asks the same questions (kblam.training.answer_eval: exact values, refusals, near-miss unknowns) with
the default model and its shipped adapter, once per state dtype of the KB cache (`--dtypes`, default
float32,bfloat16), in one process, and reports each run's scores and how many answers are the same
text, with the same top source, as the first dtype's. A kblam without a KB cache (an older checkout:
`PYTHONPATH=/path/to/old/checkout python benchmarks/precision.py --dtypes reference`) is asked once,
as it is, so that today's answers can be compared with another version's (`--compare other.json`).
Writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "precision.json"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="synthetic,elements")
    parser.add_argument("--sizes", default="100")
    parser.add_argument("--kbs", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="KB state dtypes, in order (the first is the reference); 'reference': no cache")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="questions per ask (1: each alone; "
                        "either way a quoted span is read in one pass)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--compare", default=None, help="a JSON this script wrote (another checkout): answers "
                        "with the same text / top source as its first run")
    args = parser.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    from kblam import KBLaM
    from kblam.training import answer_eval

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    model = KBLaM.from_pretrained()
    threshold = model.calibrator.threshold if model.calibrator is not None else 0.0
    names = [n for n in args.datasets.split(",") if n]
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = {}
    for name in args.dtypes.split(","):
        if name != "reference":
            model.kb_cache.clear()
            model.kb_cache.dtype = getattr(torch, name)
        began = time.perf_counter()
        records = answer_eval.evaluate(model, names, sizes, kbs=args.kbs, progress=False, log=lambda *_: None,
                                       batch_size=args.batch_size)
        runs[name] = (records, time.perf_counter() - began)
        print(f"{name}: {len(records)} questions in {runs[name][1]:.0f} s", flush=True)

    first, (reference, _) = next(iter(runs.items()))
    out = {"datasets": names, "sizes": sizes, "kbs": args.kbs, "batch_size": args.batch_size, "threshold": threshold,
           "load_average": list(os.getloadavg()), "torch_threads": args.threads, "runs": {}}
    for name, (records, seconds) in runs.items():
        same_text = sum(a.text == b.text for a, b in zip(records, reference, strict=True))
        same_top = sum(a.top == b.top for a, b in zip(records, reference, strict=True))
        out["runs"][name] = {
            "seconds": round(seconds, 1), "questions": len(records),
            f"same_text_as_{first}": same_text, f"same_top_source_as_{first}": same_top,
            "scores": {k: (round(v, 4) if isinstance(v, float) else v)
                       for k, v in answer_eval.score(records, threshold).items()},
            "differing": [{"question": a.item.question, "kind": a.item.kind, first: b.text, name: a.text}
                          for a, b in zip(records, reference, strict=True) if a.text != b.text][:20],
            "answers": [[a.item.question, a.text, str(a.top)] for a in records],  # to compare with another run
        }
        s = out["runs"][name]["scores"]
        print(f"{name:>9}: same text {same_text}/{len(records)}, same top source {same_top}/{len(records)}; "
              f"exact {s['exact']:.3f}, contains {s['contains']:.3f}, top1 {s['top1']:.3f}, "
              f"refusal recall {s['refusal_recall']:.3f}, false refusals {s['false_refusals']:.3f}")
    if args.compare:
        other = json.loads(Path(args.compare).read_text())["runs"]
        theirs = next(iter(other.values()))["answers"]
        for name, run in out["runs"].items():
            pairs = list(zip(run["answers"], theirs, strict=True))
            run["compared_with"] = {"file": args.compare, "run": next(iter(other)),
                                    "same_text": sum(a[1] == b[1] for a, b in pairs),
                                    "same_top_source": sum(a[2] == b[2] for a, b in pairs), "questions": len(pairs)}
            print(f"{name:>9} vs {args.compare}: {run['compared_with']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
