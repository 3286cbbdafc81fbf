"""The memory planner against measured peaks: random-weight models of several sizes, trained on a CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plan_check.py [--json benchmarks/results/plan_check.json]

Each case is a recipe model's stored config with fewer layers (and some narrower or with a smaller
vocabulary), trained for 3 steps by `kblam.training.loop.train` in float32, in a fresh process. The
measured peak is the process's peak resident memory (getrusage) minus its resident memory before
the model was built: weights, adapter, optimizer state, activations, logits and loss. glibc is told
to hand every block of 128 KiB or more straight back to the system (MALLOC_MMAP_THRESHOLD_), so
that freed tensors do not linger in the resident size. The plan is `kblam.training.plan.estimate`
for the same recipe on "cpu", given the longest batch those steps saw.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3

# (label, stored config, shrink arguments or None for the real model, recipe overrides)
CASES = [
    ("SmolLM2-135M, the real embedded model and MiniLM, the spans recipe", "default", None,
     dict(train_entities=300, train_examples=400)),
    ("Qwen2.5-0.5B, 8 of 24 layers, full width and vocabulary", "Qwen/Qwen2.5-0.5B-Instruct",
     dict(layers=8), dict(kb_layers=[4, 6], batch_size=8)),
    ("Llama-3.2-1B family, 6 layers of width 1024, vocabulary 32K", "meta-llama/Llama-3.2-1B-Instruct",
     dict(layers=6, hidden=1024, heads=16, intermediate=4096, vocab=32000),
     dict(kb_layers=[1, 3, 5], batch_size=16)),
    ("the same, with gradient checkpointing", "meta-llama/Llama-3.2-1B-Instruct",
     dict(layers=6, hidden=1024, heads=16, intermediate=4096, vocab=32000),
     dict(kb_layers=[1, 3, 5], batch_size=16, gradient_checkpointing=True)),
    ("Phi-3-mini family, 6 layers of width 1536, the copy path instead of spans", "microsoft/Phi-3-mini-4k-instruct",
     dict(layers=6, hidden=1536, heads=16, intermediate=4096),
     dict(kb_layers=[2, 4], batch_size=8, copy_values=True, span_kinds=None)),
    ("Qwen3-1.7B family, 6 layers of width 1024, checkpointing", "Qwen/Qwen3-1.7B",
     dict(layers=6, hidden=1024, heads=8, head_dim=128, intermediate=3072),
     dict(kb_layers=[2, 4], batch_size=8, gradient_checkpointing=True)),
]


def shared_recipe(hub_id: str, overrides: dict, out: str):
    """The Qwen2.5 recipe's options on another base (SmolLM2's own latest recipe for the default model)."""
    from kblam.training.loop import TrainConfig

    recipe = "smollm2-135m-spans.yaml" if hub_id == "default" else "qwen2.5-0.5b-instruct.yaml"
    run = dict(base_model=hub_id, out=out, steps=STEPS, warmup=1, checkpoint_every=1000, eval_every=0, device="cpu")
    cfg = TrainConfig.from_yaml(ROOT / "train" / "recipes" / recipe, **{**run, **overrides})
    # from_yaml skips None overrides; memory does not depend on where the adapter starts (init_from).
    return replace(cfg, init_from=None, **{k: v for k, v in overrides.items() if v is None})


def one(index: int, out: str) -> dict:
    """Run case `index` in this process and return its measurement and plan."""
    import gc

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from random_models import longest_batches, setup

    from kblam import configs
    from kblam.training.loop import train
    from kblam.training.plan import estimate

    label, hub_id, shrink, overrides = CASES[index]
    real = shrink is None
    config = configs.load_config(hub_id) if real else configs.shrink(configs.load_config(hub_id), **shrink)
    cfg = shared_recipe(hub_id, overrides, out)
    # A warm-up run of a tiny model of the same family loads every lazily imported module (the model
    # code, datasets, Faker) and kernel, so that the baseline below holds all but this run's tensors.
    tiny = configs.shrink(config, layers=2, hidden=64, heads=4, head_dim=16, intermediate=128, vocab=config.vocab_size)
    warm = shared_recipe(hub_id, {**overrides, "kb_layers": [1], "steps": 1, "batch_size": 2}, out + "/warm-up")
    model, data = setup(warm, tiny, device="cpu", dtype=torch.float32, entities=20, examples=20)
    train(warm, model=model, data=data, progress=False, log=lambda *_: None)
    del model, data
    if real:
        from kblam import defaults
        from kblam.training.data import build_examples, prepare
        from kblam.training.loop import build_model

        encoder = defaults.load_default_encoder()  # before the baseline: its weights are not the run's
    gc.collect()
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current size
    if real:
        model = build_model(cfg, encoder=encoder)
        pool, rows = build_examples(cfg.train_entities, cfg.train_examples, seed=cfg.seed, split="train",
                                    kb_size=tuple(cfg.kb_size), mix=cfg.mix, whole_entities=cfg.whole_entities,
                                    variants=cfg.variants)
        data = prepare(model, pool, rows)
    else:
        model, data = setup(cfg, config, device="cpu", dtype=torch.float32)
    built = _rss("VmRSS")
    seq_len, answer_len = longest_batches(cfg, model, data, STEPS)
    final = train(cfg, model=model, data=data, progress=False, log=lambda *_: None)
    peak = _rss("VmHWM")
    plan = estimate(cfg, device="cpu", model_config=config, seq_len=seq_len, answer_len=answer_len,
                    encoder_dim=model.encoder.dim)
    return {
        "case": label, "base_parameters": plan.base_parameters, "batch_size": cfg.batch_size,
        "seq_len": seq_len, "answer_len": answer_len, "gradient_checkpointing": cfg.gradient_checkpointing,
        "copy_values": cfg.copy_values, "measured_weights": built - before, "planned_weights": plan.weights,
        "measured_peak": peak - before, "planned_peak": plan.peak, "ratio": round(plan.peak / (peak - before), 3),
        "planned_activations": plan.layer_activations, "planned_head": plan.head,
        "seconds_per_step": final["seconds"],
    }


def _rss(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def table(results: list[dict]) -> str:
    """Markdown: the whole peak, and the part that is not the base's weights (measured: peak - weights built)."""
    mib = 2**20
    rows = ["| case | parameters | batch x tokens (answer) | measured peak | planned peak | plan / measured "
            "| without weights: measured, planned |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(
            f"| {r['case']} | {r['base_parameters'] / 1e6:.0f}M | {r['batch_size']} x {r['seq_len']} ({r['answer_len']}) "
            f"| {r['measured_peak'] / mib:,.0f} MiB | {r['planned_peak'] / mib:,.0f} MiB | {r['ratio']:.2f} "
            f"| {(r['measured_peak'] - r['measured_weights']) / mib:,.0f}, "
            f"{(r['planned_peak'] - r['planned_weights']) / mib:,.0f} MiB |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        print(json.dumps(one(args.one, args.out)))
        return 0
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results = []
    for index, case in enumerate(CASES):
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([sys.executable, __file__, "--one", str(index), "--out", out], env=env,
                                  capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{case[0]}: plan / measured = {results[-1]['ratio']}", flush=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": STEPS, "threads": 1, "cases": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
