"""Training checkpoints are safetensors + JSON: nothing is unpickled, and init_from reads adapters and checkpoints."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors import safe_open

from kblam import KBLaM
from kblam.training.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
from kblam.training.data import build_examples, prepare
from kblam.training.loop import TrainConfig, train


def _run(out, encoder, steps=3, seed=0, **overrides):
    options = dict(out=str(out), steps=steps, batch_size=4, lr=3e-2, warmup=1, checkpoint_every=2, query_rank=4,
                   retrieval_prior=True, null_slot=True, copy_values=True, train_entities=12, train_examples=40,
                   kb_size=[4, 8], device="cpu")
    cfg = TrainConfig(**{**options, **overrides})
    model = KBLaM.from_base(tiny_model("llama", seed), tiny_tokenizer(), encoder=encoder, seed=0,
                            **{**cfg.adapter_options(), "max_value_tokens": 64})
    pool, examples = build_examples(12, 40, seed=0, split="train", kb_size=(4, 8), mix=cfg.mix)
    return cfg, model, prepare(model, pool, examples)


def _train(out, encoder, **overrides):
    cfg, model, data = _run(out, encoder, **overrides)
    messages: list[str] = []
    train(cfg, model=model, data=data, progress=False, log=messages.append)
    return model, messages


def _same(a, b):
    for (name, x), y in zip(a.adapter.state_dict().items(), b.adapter.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


class _Payload:
    """Unpickling this creates a file: proof that a loader ran code from the file it read."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoint_is_safetensors_with_its_optimizer_state(tmp_path, hash_encoder):
    model, _ = _train(tmp_path / "run", hash_encoder)
    path = tmp_path / "run" / CHECKPOINT
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle (b"\x80") nor a zip (b"PK")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["kblam"])
        keys = set(f.keys())
    assert header["step"] == 3 and header["format"] == "kblam-training-checkpoint"
    assert {f"adapter.{k}" for k in model.adapter.state_dict()} <= keys
    assert any(k.endswith(".exp_avg_sq") for k in keys) and "rng.torch" in keys
    assert header["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]


def test_a_pickle_carrying_code_is_refused_without_running_it(tmp_path, hash_encoder):
    marker = tmp_path / "code-ran"
    evil = pickle.dumps({"adapter": _Payload(marker)})
    pickled = tmp_path / "evil.pt"
    pickled.write_bytes(evil)
    torch_zip = tmp_path / "evil-zip.pt"
    torch.save({"adapter": _Payload(marker)}, torch_zip)  # torch's own zip format, a pickle inside

    # As init_from, as a run's own checkpoint (resume), and as an old checkpoint.pt: refused, unread.
    for source in (pickled, torch_zip):
        with pytest.raises(CheckpointError, match="unpickling can run"):
            _train(tmp_path / f"from-{source.stem}", hash_encoder, init_from=str(source))
    disguised = tmp_path / "disguised"
    disguised.mkdir()
    (disguised / CHECKPOINT).write_bytes(evil)
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        _train(disguised, hash_encoder)
    old = tmp_path / "old"
    old.mkdir()
    (old / "checkpoint.pt").write_bytes(evil)
    with pytest.raises(CheckpointError, match="pickled checkpoint.pt"):
        _train(old, hash_encoder)
    assert not marker.exists()

    pickle.loads(evil)  # the control: an unpickler does run it
    assert marker.exists()


def test_init_from_reads_an_adapter_folder_a_checkpoint_or_a_run(tmp_path, hash_encoder):
    first, _ = _train(tmp_path / "stage1", hash_encoder)
    first.save_pretrained(tmp_path / "exported")  # float32: the same weights exactly
    sources = {
        "exported": tmp_path / "exported",
        "file": tmp_path / "stage1" / CHECKPOINT,
        "run": tmp_path / "stage1",
    }
    for name, source in sources.items():
        cfg, model, data = _run(tmp_path / f"stage2-{name}", hash_encoder, init_from=str(source))
        messages: list[str] = []
        train(cfg, model=model, data=data, progress=False, log=messages.append, until=0)
        assert messages and str(source) in messages[0], messages
        _same(first, model)


def test_init_from_another_base_is_refused(tmp_path, hash_encoder):
    _train(tmp_path / "stage1", hash_encoder)
    cfg, model, data = _run(tmp_path / "other", hash_encoder, seed=7, init_from=str(tmp_path / "stage1"))
    with pytest.raises(CheckpointError, match="fingerprint"):
        train(cfg, model=model, data=data, progress=False, log=lambda *_: None)


def test_load_checkpoint_restores_the_step_and_the_adapter(tmp_path, hash_encoder):
    first, _ = _train(tmp_path / "run", hash_encoder)
    _, model, _ = _run(tmp_path / "unused", hash_encoder)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT, model) == 3
    _same(first, model)


def test_a_second_stage_may_add_parts_to_the_first_stages_adapter(tmp_path, hash_encoder):
    """init_from reads the parts both adapters share: a spans stage on top of a copy-path stage."""
    first, _ = _train(tmp_path / "stage1", hash_encoder)
    cfg, model, data = _run(tmp_path / "spans", hash_encoder, init_from=str(tmp_path / "stage1"),
                            copy_values=False, span_kinds=["value", "fact"])
    messages: list[str] = []
    train(cfg, model=model, data=data, progress=False, log=messages.append, until=0)
    assert "new: ['span_gate.bias', 'span_gate.weight']" in messages[0], messages
    shared = model.adapter.state_dict()
    for name, value in first.adapter.state_dict().items():
        if name in shared:
            torch.testing.assert_close(shared[name], value, rtol=0, atol=0)
