"""Launched by tests/test_distributed.py with `accelerate launch` (2 CPU processes, gloo).

Each rank trains the same tiny model on its share of every step's rows; after every step the ranks
gather their adapters and record whether they are equal, with each rank's own loss.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for conftest's tiny models

from conftest import HashEncoder, tiny_model, tiny_tokenizer  # noqa: E402

from kblam import KBLaM  # noqa: E402
from kblam.encoder import KBEncoder  # noqa: E402
from kblam.training.data import build_examples, prepare  # noqa: E402
from kblam.training.loop import TrainConfig, end_distributed, train  # noqa: E402


def main(out: str) -> None:
    cfg = TrainConfig(
        out=out, steps=4, batch_size=2, lr=3e-2, warmup=1, checkpoint_every=2, query_rank=4,
        retrieval_prior=True, null_slot=True, copy_values=True, retrieval_loss=0.1,
        train_entities=12, train_examples=40, kb_size=[4, 8], device="cpu",
    )
    encoder = KBEncoder(HashEncoder(), name="test/hash-encoder")
    model = KBLaM.from_base(tiny_model("llama"), tiny_tokenizer(), encoder=encoder, seed=0,
                            **{**cfg.adapter_options(), "max_value_tokens": 64})
    pool, examples = build_examples(12, 40, seed=0, split="train", kb_size=(4, 8), mix=cfg.mix)
    data = prepare(model, pool, examples)
    start = torch.cat([p.detach().flatten() for p in model.adapter.parameters()])
    record = []

    def after_step(step, model, metrics):
        flat = torch.cat([p.detach().flatten() for p in model.adapter.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        record.append({
            "step": step, "loss": metrics["loss"], "world": dist.get_world_size(),
            "max_difference": max(float((g - flat).abs().max()) for g in gathered),
            "moved": float((flat - start).abs().max()),
        })

    train(cfg, model=model, data=data, progress=False, log=lambda *_: None, on_step=after_step)
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    end_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
