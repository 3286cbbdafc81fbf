"""The memory planner: exact parameter counts from stored configs, activations that match autograd, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer

from kblam import KBLaM, configs
from kblam.cli import main
from kblam.training.data import build_examples, collate, prepare
from kblam.training.loop import TrainConfig
from kblam.training.loss import answer_loss
from kblam.training.plan import GIB, estimate

RECIPES = Path(__file__).parents[1] / "train" / "recipes"

# Parameter counts the model cards publish.
PUBLISHED = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": 135e6,
    "Qwen/Qwen2.5-0.5B-Instruct": 0.49e9,
    "meta-llama/Llama-3.2-1B-Instruct": 1.24e9,
    "Qwen/Qwen3-1.7B": 1.7e9,
    "microsoft/Phi-3-mini-4k-instruct": 3.8e9,
    "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_stored_configs_have_the_published_sizes(hub_id):
    plan = estimate(TrainConfig(base_model=hub_id, kb_layers=[1]))
    assert plan.base_parameters == pytest.approx(PUBLISHED[hub_id], rel=0.02)
    assert plan.weights == 2 * plan.base_parameters  # bfloat16 on a GPU


def test_every_recipe_plans_from_the_command_line(capsys):
    for recipe in sorted(RECIPES.glob("*.yaml")):
        assert main(["train", str(recipe), "--plan"]) == 0
        out = capsys.readouterr().out
        assert "base parameters" in out and "peak" in out and "tokens per step" in out, recipe


def _saved_bytes(loss: torch.Tensor, params: set[int]) -> int:
    """Bytes of the distinct tensors the autograd graph of `loss` keeps for the backward pass."""
    storages: dict[int, int] = {}
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            value = getattr(node, name)
            for tensor in value if isinstance(value, tuple) else (value,):
                if torch.is_tensor(tensor):
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() not in params:
                        storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


@pytest.mark.parametrize(("hub_id", "answers"), [
    ("meta-llama/Llama-3.2-1B-Instruct", "copy"), ("meta-llama/Llama-3.2-1B-Instruct", "spans"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "spans"), ("Qwen/Qwen3-1.7B", "copy"), ("microsoft/Phi-3-mini-4k-instruct", "spans"),
])
def test_saved_activations_match_the_autograd_graph(hub_id, answers, hash_encoder):
    """The planner's count of what the backward pass keeps, against a real graph (float32, CPU)."""
    from transformers import AutoModelForCausalLM

    config = configs.shrink(configs.load_config(hub_id), layers=6, hidden=128, heads=8, vocab=128)
    config.pad_token_id = 0
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    base.config.use_cache = False
    cfg = TrainConfig(base_model=hub_id, kb_layers=[2, 4], query_rank=4, retrieval_prior=True, null_slot=True,
                      copy_values=answers == "copy", span_kinds=["value", "fact"] if answers == "spans" else None,
                      batch_size=4)
    model = KBLaM.from_base(base, tiny_tokenizer(), encoder=hash_encoder, **{**cfg.adapter_options(), "max_value_tokens": 64})
    pool, examples = build_examples(12, 40, seed=0, split="train", kb_size=(4, 8), mix=cfg.mix)
    batch = collate(model, prepare(model, pool, examples), list(range(4)))
    loss, _ = answer_loss(model, batch, 0.1)
    measured = _saved_bytes(loss, {p.untyped_storage().data_ptr() for p in model.parameters()})
    cfg.kb_size = [batch.keys.shape[1]] * 2
    plan = estimate(cfg, device="cpu", model_config=config, seq_len=batch.input_ids.shape[1],
                    answer_len=int(batch.answer_length.max()), encoder_dim=hash_encoder.dim)
    assert plan.saved_bytes == pytest.approx(measured, rel=0.08), (plan.saved_bytes, measured)


def test_checkpointing_and_batch_move_the_estimate_the_right_way():
    cfg = TrainConfig.from_yaml(RECIPES / "llama-3.1-8b-instruct.yaml")
    plan = estimate(cfg)
    assert plan.activations_checkpointed < plan.activations / 4
    half = estimate(TrainConfig.from_yaml(RECIPES / "llama-3.1-8b-instruct.yaml", batch_size=cfg.batch_size // 2))
    assert half.activations == pytest.approx(plan.activations / 2, rel=0.05)
    assert half.weights == plan.weights and half.tokens_per_step == plan.tokens_per_step // 2


def test_a_recipe_that_does_not_fit_the_gpu_is_refused_before_loading(monkeypatch, capsys):
    import kblam.training.loop as loop
    import kblam.training.plan as plan

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(loop, "build_model", no_loading)
    monkeypatch.setattr(plan, "visible_gpu_memory", lambda: (10 * GIB, 16 * GIB))
    recipe = str(RECIPES / "llama-3.1-8b-instruct.yaml")
    assert main(["train", recipe]) == 1
    err = capsys.readouterr().err
    need = (estimate(TrainConfig.from_yaml(recipe)).peak + plan.CUDA_RESERVE) / GIB
    assert f"needs about {need:.1f} GiB" in err and "10.0 GiB free of 16.0 GiB" in err and "weights" in err, err

    assert main(["train", recipe, "--plan"]) == 0
    assert "needs about" in capsys.readouterr().out
    monkeypatch.setattr(plan, "visible_gpu_memory", lambda: (80 * GIB, 80 * GIB))
    assert main(["train", recipe, "--plan"]) == 0
    assert "fits this GPU: 80.0 GiB free" in capsys.readouterr().out


def test_the_gpu_check_script_runs_in_smoke_mode(tmp_path):
    """benchmarks/gpu_check.py runs where no GPU is lent, on tiny models: it must not rot until one is."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import gpu_check

    doc = tmp_path / "gpu.md"
    assert gpu_check.main(["--smoke", "--steps", "2", "--doc", str(doc), "--out", str(tmp_path / "runs")]) == 0
    text = doc.read_text()
    assert "smoke test on a CPU" in text
    for recipe in gpu_check.recipes():
        assert recipe.name in text
