"""Every recipe's model family trains on a CPU through the code path of `kblam train`, at reduced size.

The base is the recipe's stored config (kblam.configs) with depth and width cut down and random
weights, saved to a folder that build_model loads as it would a downloaded model.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer

from kblam import configs
from kblam.training.data import build_examples, prepare
from kblam.training.export import read_log
from kblam.training.loop import TrainConfig, build_model, train

RECIPES = Path(__file__).parents[1] / "train" / "recipes"
GPU_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if not p.name.startswith("smollm2"))


def small_base(folder: Path, hub_id: str, layers: int = 4, seed: int = 0) -> Path:
    """A random-weight copy of `hub_id`'s architecture, 4 layers of width 32, saved with a tokenizer."""
    from transformers import AutoModelForCausalLM

    config = configs.shrink(configs.load_config(hub_id), layers=layers, hidden=32, heads=4, vocab=128)
    config.pad_token_id = 0
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def scaled_layers(kb_layers: list[int], full: int, layers: int) -> list[int]:
    """The recipe's KB layers at the same relative depth in a model of `layers` layers."""
    return sorted({min(layers - 1, round(i * layers / full)) for i in kb_layers})


def _recipe(path: Path, tmp_path: Path, **overrides) -> TrainConfig:
    cfg = TrainConfig.from_yaml(path)
    full = configs.load_config(cfg.base_model).num_hidden_layers
    folder = small_base(tmp_path / "base", cfg.base_model)
    small = dict(out=str(tmp_path / "run"), base_model=str(folder), kb_layers=scaled_layers(cfg.kb_layers, full, 4),
                 steps=2, batch_size=2, warmup=1, train_entities=12, train_examples=24, kb_size=[4, 8],
                 eval_every=0, device="cpu")
    return TrainConfig.from_yaml(path, **{**small, **overrides})


def test_the_five_recipes_are_there():
    names = {TrainConfig.from_yaml(p).base_model for p in GPU_RECIPES}
    assert names == {"Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", "Qwen/Qwen3-1.7B",
                     "microsoft/Phi-3-mini-4k-instruct", "meta-llama/Llama-3.1-8B-Instruct"}
    latest = TrainConfig.from_yaml(RECIPES / "smollm2-135m-spans.yaml")  # the SmolLM2 adapter's latest stage
    for path in GPU_RECIPES:
        cfg = TrainConfig.from_yaml(path)
        assert configs.stored(cfg.base_model) is not None
        assert cfg.dtype == "bfloat16" and cfg.init_from is None
        # What the SmolLM2 runs learned carries over.
        for key in ("retrieval_prior", "null_slot", "copy_values", "span_kinds", "query_rank", "system_prompt",
                    "retrieval_loss", "whole_entities", "variants", "mix", "kb_size"):
            assert getattr(cfg, key) == getattr(latest, key), (path.name, key)


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.stem)
def test_a_small_model_of_the_recipes_family_trains_on_cpu(recipe, tmp_path, hash_encoder):
    cfg = _recipe(recipe, tmp_path)
    model = build_model(cfg, encoder=hash_encoder)  # loads the folder as `kblam train` would
    assert next(model.base.parameters()).dtype == torch.float32  # bfloat16 recipes run float32 on a CPU
    pool, examples = build_examples(12, 24, seed=0, split="train", kb_size=(4, 8), mix=cfg.mix,
                                    whole_entities=cfg.whole_entities, variants=cfg.variants)
    final = train(cfg, model=model, data=prepare(model, pool, examples), progress=False, log=lambda *_: None)
    assert [r["step"] for r in read_log(cfg.out)] == [1, 2]
    assert math.isfinite(final["loss"]) and final["grad_norm"] > 0
    assert (Path(cfg.out) / "checkpoint.safetensors").is_file()


def test_gradient_checkpointing_changes_memory_not_results(tmp_path, hash_encoder):
    """Recomputed layers re-attach the KB their forward saw: the adapter after training is the same."""
    recipe = RECIPES / "llama-3.1-8b-instruct.yaml"  # the recipe that checkpoints
    adapters = {}
    for checkpointing in (False, True):
        cfg = _recipe(recipe, tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, steps=3)
        model = build_model(cfg, encoder=hash_encoder)
        pool, examples = build_examples(12, 24, seed=0, split="train", kb_size=(4, 8), mix=cfg.mix,
                                    whole_entities=cfg.whole_entities, variants=cfg.variants)
        train(cfg, model=model, data=prepare(model, pool, examples), progress=False, log=lambda *_: None)
        adapters[checkpointing] = model.adapter.state_dict()
        assert "forward" not in vars(model.base.model.layers[-1])  # the wrapping is undone after training
    for name, value in adapters[False].items():
        torch.testing.assert_close(adapters[True][name], value, rtol=1e-5, atol=1e-6)
