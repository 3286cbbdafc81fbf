"""The recipes on a GPU: 50 training steps of random-weight models at the recipes' real sizes, against the plan.

    python benchmarks/gpu_check.py                 # on a machine with a CUDA GPU: measure, write docs/gpu.md
    python benchmarks/gpu_check.py --plan-only     # anywhere: write docs/gpu.md with the plan, marked not measured
    python benchmarks/gpu_check.py --smoke --doc /tmp/gpu.md   # CPU, tiny models, 2 steps: the script itself works

Each recipe in train/recipes/ (but the CPU-sized SmolLM2 ones) runs with its own settings (batch,
accumulation, bfloat16, gradient checkpointing, adapter options) through `kblam.training.loop.train`,
on a base built from its stored config (kblam.configs) with random weights, directly on the GPU;
nothing is downloaded (benchmarks/random_models.py: a word-level tokenizer over the training data,
so sequences are somewhat shorter than with the model's own tokenizer). Reported per recipe: steps
per second and tokens per second (padded tokens through the model, after 5 warm-up steps), and peak
memory (torch.cuda.max_memory_allocated: tensors, not the CUDA context) against the plan for the
batches the run saw and against the plan for the recipe's own planning figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DOC = ROOT / "docs" / "gpu.md"
RESULTS = ROOT / "benchmarks" / "results" / "gpu_check.json"
WARMUP = 5


def recipes() -> list[Path]:
    return sorted(p for p in (ROOT / "train" / "recipes").glob("*.yaml") if not p.name.startswith("smollm2"))


def measure(recipe: Path, steps: int, device: str, smoke: bool, out: Path) -> dict:
    from random_models import setup

    from kblam import configs
    from kblam.training.data import collate
    from kblam.training.loop import TrainConfig, shard_rows, step_rows, train, weights_dtype
    from kblam.training.plan import estimate

    cfg = TrainConfig.from_yaml(recipe, out=str(out / recipe.stem), steps=steps, warmup=min(steps, 5),
                                checkpoint_every=10**6, eval_every=0, device=device)
    config = configs.load_config(cfg.base_model)
    if smoke:
        full = config.num_hidden_layers
        config = configs.shrink(config, layers=4, hidden=64, heads=4, head_dim=16, intermediate=128)
        cfg.kb_layers = sorted({min(3, round(i * 4 / full)) for i in cfg.kb_layers})
        cfg.batch_size = 2
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, data = setup(cfg, config, device=device, dtype=weights_dtype(cfg, torch.device(device)),
                        entities=30 if smoke else 300,
                        examples=40 if smoke else max(400, steps * cfg.batch_size * cfg.grad_accum))
    padded, real, longest, answer = [], [], 0, 0
    for step in range(steps):
        rows = shard_rows(step_rows(len(data.examples), step, cfg.batch_size * cfg.grad_accum, cfg.seed), 0, 1)
        tokens = [0, 0]
        for micro in range(cfg.grad_accum):
            batch = collate(model, data, rows[micro * cfg.batch_size:(micro + 1) * cfg.batch_size])
            tokens[0] += batch.input_ids.numel()
            tokens[1] += int(batch.attention_mask.sum())
            longest = max(longest, batch.input_ids.shape[1])
            answer = max(answer, int(batch.answer_length.max()))
        padded.append(tokens[0])
        real.append(tokens[1])
    seconds: list[float] = []

    def timed(step, model, metrics):
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter())

    began = time.perf_counter()
    train(cfg, model=model, data=data, progress=False, log=lambda *_: None, on_step=timed)
    span = [b - a for a, b in zip([began, *seconds[:-1]], seconds, strict=True)][min(WARMUP, steps - 1):]
    kept = slice(len(seconds) - len(span), None)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    run_plan = estimate(cfg, device=device, model_config=config, seq_len=longest, answer_len=answer,
                        encoder_dim=model.encoder.dim)
    recipe_plan = estimate(cfg, device=device, model_config=config, encoder_dim=model.encoder.dim)
    del model, data
    return {
        "recipe": recipe.name, "model": cfg.base_model, "base_parameters": run_plan.base_parameters,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "gradient_checkpointing": cfg.gradient_checkpointing,
        "steps": steps, "longest_batch": longest, "longest_answer": answer,
        "steps_per_second": round(len(span) / sum(span), 3),
        "tokens_per_second": round(sum(padded[kept]) / sum(span)),
        "real_tokens_per_second": round(sum(real[kept]) / sum(span)),
        "median_step_seconds": round(statistics.median(span), 4),
        "peak_bytes": peak, "plan_for_run_bytes": run_plan.peak, "plan_for_recipe_bytes": recipe_plan.peak,
    }


def plan_rows() -> list[dict]:
    from kblam.training.loop import TrainConfig
    from kblam.training.plan import estimate

    rows = []
    for recipe in recipes():
        cfg = TrainConfig.from_yaml(recipe)
        plan = estimate(cfg)
        rows.append({"recipe": recipe.name, "model": cfg.base_model, "base_parameters": plan.base_parameters,
                     "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                     "gradient_checkpointing": cfg.gradient_checkpointing, "plan_for_recipe_bytes": plan.peak,
                     "peak_bytes": None})
    return rows


def write_doc(rows: list[dict], path: Path, machine: str | None) -> None:
    gib = 2**30
    measured = machine is not None
    lines = [
        "# Training on one GPU: measured against the plan",
        "",
        "Written by `benchmarks/gpu_check.py`: 50 training steps per recipe in `train/recipes/`, random",
        "weights at the models' real sizes (from `kblam/configs/`), each recipe's own batch, bfloat16 and",
        "gradient checkpointing, through `kblam.training.loop.train`. Peak memory is",
        "`torch.cuda.max_memory_allocated` (tensors; the CUDA context adds about a gigabyte on top). The",
        "plan is `kblam train RECIPE --plan` for the recipe's planning figures (its longest batch), and for",
        "the longest batch the run saw.",
        "",
    ]
    if measured:
        lines += [f"Machine: {machine}.", "",
                  "| recipe | parameters | batch x accumulation | steps/s | tokens/s | peak measured | "
                  "plan (batches run) | measured / plan | plan (recipe figures) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            peak, plan = r["peak_bytes"], r["plan_for_run_bytes"]  # peak is None in a smoke test on the CPU
            measured_peak = "n/a" if peak is None else f"{peak / gib:.1f} GiB"
            ratio = "n/a" if peak is None else f"{peak / plan:.2f}"
            lines.append(
                f"| {r['recipe']} | {r['base_parameters'] / 1e9:.2f}B | {r['batch_size']} x {r['grad_accum']} "
                f"| {r['steps_per_second']:.2f} | {r['tokens_per_second']:,} | {measured_peak} | {plan / gib:.1f} GiB "
                f"| {ratio} | {r['plan_for_recipe_bytes'] / gib:.1f} GiB |"
            )
    else:
        lines += [
            "**Not measured yet.** No GPU has run this script so far; the table holds the plan only (estimates",
            "from `kblam train RECIPE --plan`, checked against measured CPU peaks in `benchmarks/plan_check.py`).",
            "Steps and tokens per second are unknown until then.",
            "",
            "| recipe | parameters | batch x accumulation | gradient checkpointing | planned peak (estimate) |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['recipe']} | {r['base_parameters'] / 1e9:.2f}B | {r['batch_size']} x {r['grad_accum']} "
                         f"| {'on' if r['gradient_checkpointing'] else 'off'} | {r['plan_for_recipe_bytes'] / gib:.1f} GiB |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--plan-only", action="store_true", help="write the doc with the plan, marked not measured")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, to test this script")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--json", type=Path, default=None, help=f"results (default with a GPU: {RESULTS})")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="scratch folder for the runs")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.plan_only:
        write_doc(plan_rows(), args.doc, None)
        return 0
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: use --plan-only or --smoke", file=sys.stderr)
        return 1
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)  # fresh runs: train() would resume from a checkpoint
    rows = []
    for recipe in recipes():
        rows.append(measure(recipe, args.steps, device, args.smoke, args.out))
        print(json.dumps(rows[-1]), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        machine = "smoke test on a CPU with tiny models (not a measurement)"
    write_doc(rows, args.doc, machine)
    target = args.json or (None if args.smoke else RESULTS)
    if target:
        target.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
