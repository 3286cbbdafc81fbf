"""Seconds per training step on this machine: the paper-faithful setup against the shipped recipe.

    .venv/bin/python benchmarks/train_step.py [--steps 12] [--json benchmarks/results/train_step.json]

Same data (synthetic, batch 8, KBs of 16 to 64 triples), same machine, float32. The first 2 steps are
warm-up and not counted. What differs is what the recipe cuts:
- paper: KB layers every 3rd from 0 (the gradient reaches layer 0), full-rank KB query heads, the chat
  template's default system prompt (longer sequences), answer loss only;
- recipe: KB layers 15..27 (the gradient stops at 15), rank-16 heads, an empty system prompt, plus the
  prior, null slot, copy path and retrieval loss (which cost a little).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]


def time_steps(cfg, steps: int) -> dict:
    from kblam.training.data import build_examples, collate, prepare
    from kblam.training.loop import build_model, step_rows
    from kblam.training.loss import answer_loss

    model = build_model(cfg)
    pool, examples = build_examples(300, 400, seed=0, split="train", kb_size=tuple(cfg.kb_size), mix=cfg.mix)
    data = prepare(model, pool, examples)
    params = [p for p in model.adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, tokens = [], []
    for step in range(steps + 2):
        batch = collate(model, data, step_rows(len(examples), step, cfg.batch_size, 0))
        began = time.perf_counter()
        loss, _ = answer_loss(model, batch, cfg.retrieval_loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:
            times.append(time.perf_counter() - began)
            tokens.append(int(batch.attention_mask.sum()) / cfg.batch_size)
    return {"seconds_per_step": round(statistics.median(times), 3), "mean_tokens_per_sequence": round(
        statistics.mean(tokens), 1), "adapter_parameters": sum(p.numel() for p in params)}


def main() -> None:
    from transformers.utils import logging as hf_logging

    from kblam.training.loop import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    recipe = TrainConfig.from_yaml(ROOT / "train" / "recipes" / "smollm2-135m.yaml")
    paper = TrainConfig(kb_layer_frequency=3, batch_size=recipe.batch_size, kb_size=recipe.kb_size)
    results = {"paper": time_steps(paper, args.steps), "recipe": time_steps(recipe, args.steps),
               "threads": torch.get_num_threads()}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
