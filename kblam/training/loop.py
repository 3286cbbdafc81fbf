"""The training loop: frozen base, AdamW with warm-up and cosine decay, checkpoints with exact resume.

Plain and linear, nanoGPT style. One step = `grad_accum` micro-batches of `batch_size` examples. The
rows of step s are drawn from a generator seeded by (seed, s), so a resumed run sees exactly the
batches it would have seen. With `accelerate launch`, the step's rows are drawn for all ranks at once
and dealt out round-robin (`shard_rows`): every rank gets every kind of question, unlike the
reference, which sent all refusal questions to the last rank. Checkpoints are safetensors
(kblam.training.checkpoint): nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from kblam.training.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    load_adapter_weights,
    load_checkpoint,
    save_checkpoint,
)


@dataclass
class TrainConfig:
    out: str = "runs/kblam"
    base_model: str = "default"  # "default" (the embedded SmolLM2) or a path transformers can load
    encoder: str | None = None  # None: the default encoder
    # adapter
    kb_layers: list[int] | None = None
    kb_layer_frequency: int = 3
    kb_scale_factor: float | None = 100.0
    query_rank: int | None = None
    retrieval_prior: bool = False
    prior_scale: float = 20.0
    null_slot: bool = False
    copy_values: bool = False
    span_kinds: list[str] | None = None  # answers quote whole spans (kblam.spans), e.g. [value, fact]
    system_prompt: str | None = None
    # losses
    retrieval_loss: float = 0.0
    # data
    train_entities: int = 2000
    train_examples: int = 20000
    kb_size: list[int] = field(default_factory=lambda: [16, 64])
    mix: dict[str, float] = field(
        default_factory=lambda: {"simple": 0.7, "multi": 0.1, "open": 0.1, "unanswerable": 0.1}
    )
    whole_entities: float = 0.0  # share of training KBs made of whole entities (build_examples)
    variants: bool = False  # questions also with synonyms, lower case, no "?", typos
    answers: str = "echo"  # "echo": words echoing the question around value spans; "facts": whole facts
    # optimisation
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # bookkeeping
    checkpoint_every: int = 50
    eval_every: int = 0  # 0: no held-out check during training
    eval_kb_size: int = 100
    eval_questions: int = 32
    device: str = "auto"
    # The base model's weights: "auto" is bfloat16 on a GPU (with bfloat16 autocast) and float32 on a CPU,
    # where bfloat16 is 6 to 30 times slower; a CPU run always uses float32.
    dtype: str = "auto"
    gradient_checkpointing: bool = False  # recompute each layer from the first KB layer on in the backward pass
    cache_dir: str | None = None  # encoder cache; default <out>/cache (runs with the same data can share one)
    # Start from another run (a second stage), unless resuming: an exported adapter folder, a run folder
    # or its checkpoint.safetensors.
    init_from: str | None = None
    # Planning figures for `kblam train --plan` (kblam.training.plan): the longest padded sequence and
    # answer of a batch, in tokens of this model's tokenizer with its chat template.
    plan_seq_len: int = 128
    plan_answer_len: int = 96

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        import yaml

        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown recipe keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def adapter_options(self) -> dict:
        return dict(
            kb_layers=self.kb_layers, kb_layer_frequency=self.kb_layer_frequency,
            kb_scale_factor=self.kb_scale_factor, query_rank=self.query_rank,
            retrieval_prior=self.retrieval_prior, prior_scale=self.prior_scale, null_slot=self.null_slot,
            copy_values=self.copy_values, span_kinds=self.span_kinds, system_prompt=self.system_prompt,
        )


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_rows(n_examples: int, step: int, count: int, seed: int) -> list[int]:
    """The example rows of one step, the same on every rank and after a resume."""
    rng = random.Random(seed * 1_000_003 + step)
    return [rng.randrange(n_examples) for _ in range(count)]


def shard_rows(rows: list[int], rank: int, world: int) -> list[int]:
    """Round-robin: each rank gets an interleaved share of the (shuffled) rows, so every kind reaches it."""
    return rows[rank::world]


def weights_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The base model's dtype for this run: bfloat16 on a GPU unless the recipe says float32; float32 on a CPU."""
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"dtype must be auto, bfloat16 or float32, not {cfg.dtype!r}")
    if device.type != "cuda" or cfg.dtype == "float32":
        return torch.float32
    return torch.bfloat16


def build_model(cfg: TrainConfig, dtype: torch.dtype | None = None, *, encoder=None):
    """The frozen base (in `dtype`, default: weights_dtype for this machine) with a fresh adapter."""
    from kblam import defaults
    from kblam.model import KBLaM

    dtype = dtype or weights_dtype(cfg, _device(cfg, None))
    if cfg.base_model == "default":
        base, tokenizer = defaults.load_default_base(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    options = {k: v for k, v in cfg.adapter_options().items() if v is not None or k == "system_prompt"}
    return KBLaM.from_base(base, tokenizer, encoder or cfg.encoder, seed=cfg.seed, **options)


def train(cfg: TrainConfig, *, model=None, data=None, progress: bool = True, log=print,
          until: int | None = None, on_step=None) -> dict:
    """Train (or resume) the run in cfg.out; returns the last step's metrics.

    `model`/`data` skip building the defaults; `until` stops after that step (with a checkpoint), to
    split a long run into sessions: the schedule is still the one of cfg.steps. `on_step(step, model,
    metrics)` is called after every optimizer step, on every rank.
    """
    from tqdm.auto import tqdm

    from kblam.training.data import build_examples, collate, prepare
    from kblam.training.loss import answer_loss

    accelerator = _accelerator(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
    torch.manual_seed(cfg.seed)
    device = _device(cfg, accelerator)
    if model is None:
        model = build_model(cfg, weights_dtype(cfg, device))
    model.to(device)
    if data is None:
        pool, examples = build_examples(
            cfg.train_entities, cfg.train_examples, seed=cfg.seed, split="train",
            kb_size=tuple(cfg.kb_size), mix=cfg.mix, whole_entities=cfg.whole_entities, variants=cfg.variants,
            answers=cfg.answers,
        )
        data = prepare(model, pool, examples, cache=Path(cfg.cache_dir) if cfg.cache_dir else out / "cache")
    params = [p for p in model.adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    checkpoint = out / CHECKPOINT
    if checkpoint.is_file():
        start = load_checkpoint(checkpoint, model, optimizer)
        log(f"resumed {out} at step {start}")
    elif (out / "checkpoint.pt").is_file():
        raise CheckpointError(
            f"{out} holds a pickled checkpoint.pt from an older kblam: it is not read (unpickling can run "
            "code). Move it away to start this run over."
        )
    elif cfg.init_from:
        log(f"started from {load_adapter_weights(cfg.init_from, model)}")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    metrics: dict = {}
    log_path = out / "log.jsonl"
    stop = cfg.steps if until is None else min(until, cfg.steps)
    bar = tqdm(range(start, stop), initial=start, total=cfg.steps, disable=not progress or rank != 0)
    n = len(data.examples)
    with _training_mode(model, cfg.gradient_checkpointing):
        for step in bar:
            began = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            optimizer.zero_grad(set_to_none=True)
            totals: dict[str, float] = {}
            rows = step_rows(n, step, cfg.batch_size * cfg.grad_accum * world, cfg.seed)
            mine = shard_rows(rows, rank, world)
            for micro in range(cfg.grad_accum):
                batch = collate(model, data, mine[micro * cfg.batch_size:(micro + 1) * cfg.batch_size]).to(device)
                with _autocast(device):
                    loss, parts = answer_loss(model, batch, cfg.retrieval_loss)
                (loss / cfg.grad_accum).backward()
                for k, v in parts.items():
                    totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
            if world > 1:
                for p in params:  # the adapter is driven by hooks, not DDP's forward: average by hand
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            metrics = {"step": step + 1, **{k: round(v, 4) for k, v in totals.items()},
                       "grad_norm": round(float(grad_norm), 4), "lr": learning_rate(cfg, step),
                       "seconds": round(time.perf_counter() - began, 3)}
            if cfg.retrieval_prior:
                metrics["prior_scale"] = round(float(model.adapter.prior_scale.detach()), 3)
            bar.set_postfix(loss=f"{totals['loss']:.3f}", s_per_step=f"{metrics['seconds']:.2f}")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and rank == 0:
                from kblam.training.evaluate import quick_check

                metrics.update(quick_check(model, cfg))
            if on_step is not None:
                on_step(step + 1, model, metrics)
            if rank == 0:
                with log_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == stop:
                    save_checkpoint(checkpoint, model, optimizer, step + 1)
    bar.close()
    return metrics


@contextmanager
def _training_mode(model, checkpointing: bool):
    """The frozen base in eval mode (no dropout) and without a KV cache; optionally with checkpointed layers.

    The cache is off because nothing reads it in training (it would hold every layer's keys and
    values), and a recomputed layer would append to it a second time.
    """
    base = model.base
    was_training, use_cache = base.training, base.config.use_cache
    base.eval()
    base.config.use_cache = False
    wrapped = _checkpoint_layers(model) if checkpointing else []
    try:
        yield
    finally:
        for layer in wrapped:
            del layer.forward  # back to the class's forward
        base.config.use_cache = use_cache
        base.train(was_training)


def _checkpoint_layers(model) -> list[torch.nn.Module]:
    """Recompute the decoder layers from the first KB layer on in the backward pass, keeping only their inputs.

    The layers before the first KB layer keep nothing for the backward pass (nothing there needs a
    gradient), so they are left alone. transformers' own gradient checkpointing does not fit: it runs
    in train mode only, and its recomputation would call the KB layers' hooks after the KB was
    detached (kblam.training.loss attaches it around the forward pass only). Here each recomputation
    re-attaches the KB that the layer's forward pass saw, on the thread that runs it (on a GPU,
    autograd's device thread; the attached KB is per thread).
    """
    from torch.utils.checkpoint import checkpoint

    from kblam.model import attention_modules

    first = min(model.config.kb_layers)
    names = {id(m): name for name, m in model.base.named_modules()}
    wrapped = []
    for index, attn in attention_modules(model.base).items():
        if index < first:
            continue
        layer = model.base.get_submodule(names[id(attn)].rsplit(".", 1)[0])
        forward = layer.forward

        def run(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            attached = model._attached

            def again(*a, **k):
                previous, model._attached = model._attached, attached
                try:
                    return _forward(*a, **k)
                finally:
                    model._attached = previous

            return checkpoint(again, *args, use_reentrant=False, **kwargs)

        layer.forward = run
        wrapped.append(layer)
    return wrapped


def _accelerator(cfg: TrainConfig):
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    # Without cpu=True, accelerate on a machine with no GPU runs every process on its own, silently.
    return Accelerator(cpu=cfg.device == "cpu" or not torch.cuda.is_available())


def end_distributed() -> None:
    """End the process group a distributed `train` joined (through accelerate), if any: once, at the end
    of the process, as accelerate asks of a script (`Accelerator.end_training`). A group left to the
    interpreter's exit tears gloo's threads down unordered; `train` itself leaves it open, since the
    caller may still gather across ranks (and accelerate's state is one per process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device(cfg: TrainConfig, accelerator) -> torch.device:
    if accelerator is not None:
        return accelerator.device
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    # bfloat16 autocast on CUDA; float32 on CPU, where bfloat16 is 6 to 30 times slower.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
