"""Memory planner for a training recipe: `kblam train RECIPE --plan`. No weights are loaded.

The base model is built on the meta device from its config (kblam.configs, or AutoConfig), which
gives exact parameter counts and the layout (fused projections, per-head query norms). The adapter
is built on the meta device too. Memory is then counted tensor by tensor, from what the training
step keeps alive at its peak, the start of the backward pass:

- the frozen base's weights (bfloat16 on a GPU, float32 on a CPU);
- the adapter's float32 weights, gradients and two AdamW moments (16 bytes a parameter);
- what autograd saves for the backward pass. Nothing before the first KB layer needs a gradient, so
  only the layers from there on save anything. Frozen projections save nothing, since their weight
  gradients are never computed. What remains, per token and layer: the two RMSNorm inputs (float32),
  the MLP's gate, activation and up outputs, the attention's query, keys, values and output (keys and
  values repeated to every head when a padding mask is present, as transformers does), and, on KB
  layers, the KB query and the joint softmax over [KB | text] keys. With gradient checkpointing,
  only each layer's input is kept, plus one layer being recomputed;
- the head: the logits (kept by the gather that picks the answer positions), the loss over the
  vocabulary at the answer positions (one float32 log-softmax of that size; the copy path's mix six),
  and the first gradients of the backward pass, which come while all of the above is still held.

`saved_bytes` is checked against the tensors an autograd graph really holds (tests/test_plan.py), and
`benchmarks/plan_check.py` checks the peak against measured CPU peaks of random-weight models.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
CUDA_RESERVE = 1 * GIB  # CUDA context and allocator slack, on top of the tensors, when checking a fit
# Encoder dimensions known without loading the encoder.
ENCODER_DIMS = {
    "sentence-transformers/all-MiniLM-L6-v2": 384,
    "sentence-transformers/all-MiniLM-L12-v2": 384,
    "sentence-transformers/all-mpnet-base-v2": 768,
    "BAAI/bge-small-en-v1.5": 384,
    "BAAI/bge-base-en-v1.5": 768,
    "BAAI/bge-large-en-v1.5": 1024,
}


@dataclass
class Plan:
    model: str
    device: str  # "cuda" or "cpu"
    weights_dtype: str
    base_parameters: int
    adapter_parameters: int
    batch_size: int
    seq_len: int
    answer_len: int
    tokens_per_step: int
    gradient_checkpointing: bool
    # bytes
    weights: int
    adapter_state: int
    activations: int  # saved for the backward pass by the layers, without checkpointing
    activations_checkpointed: int
    head: int  # logits and the loss over the vocabulary: saved, plus the backward pass's first gradients
    head_saved: int  # the part of `head` autograd keeps

    @property
    def layer_activations(self) -> int:
        return self.activations_checkpointed if self.gradient_checkpointing else self.activations

    @property
    def peak(self) -> int:
        return self.weights + self.adapter_state + self.layer_activations + self.head

    def peak_with(self, checkpointing: bool) -> int:
        layers = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.adapter_state + layers + self.head

    @property
    def saved_bytes(self) -> int:
        """What autograd keeps at the end of the forward pass (no weights, no checkpointing)."""
        return self.activations + self.head_saved

    def format(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GIB:.2f} GiB"

        where = "GPU" if self.device == "cuda" else "CPU"
        state = "on" if self.gradient_checkpointing else "off"
        other = "off" if self.gradient_checkpointing else "on"
        rows = [
            ("model", self.model),
            ("base parameters", f"{self.base_parameters / 1e6:,.1f}M (frozen, {self.weights_dtype})"),
            ("adapter parameters", f"{self.adapter_parameters / 1e6:,.2f}M (trained, float32)"),
            ("micro-batch", f"{self.batch_size} x {self.seq_len} tokens, answers up to {self.answer_len}"),
            ("tokens per step", f"{self.tokens_per_step:,} (padded, per {where}, accumulation included)"),
            (f"estimated peak {where} memory", ""),
            ("  weights", gib(self.weights)),
            ("  adapter, grads, AdamW", gib(self.adapter_state)),
            ("  activations", f"{gib(self.activations)} without gradient checkpointing, "
                              f"{gib(self.activations_checkpointed)} with it"),
            ("  logits and loss", gib(self.head)),
            ("  peak", f"{gib(self.peak)} with gradient checkpointing {state} "
                       f"({gib(self.peak_with(not self.gradient_checkpointing))} with it {other})"),
        ]
        return "\n".join(f"{label:<25}{value}".rstrip() for label, value in rows)


def estimate(cfg, *, device: str = "cuda", model_config=None, seq_len: int | None = None,
             answer_len: int | None = None, encoder_dim: int | None = None, world: int = 1) -> Plan:
    """The plan of a TrainConfig on `device` ("cuda": bfloat16 autocast; "cpu": float32).

    seq_len/answer_len default to the recipe's planning figures; the measuring scripts pass the
    lengths of the batches they ran.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from kblam.configs import load_config

    config = model_config if model_config is not None else load_config(cfg.base_model)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    adapter = _meta_adapter(cfg, config, encoder_dim)
    attn = next(m for n, m in base.named_modules() if n.endswith("self_attn"))
    qk_norm = hasattr(attn, "q_norm")

    bf16 = device == "cuda" and cfg.dtype != "float32"
    wb = 2 if bf16 else 4  # bytes of a weight
    s = 2 if device == "cuda" else 4  # bytes of an activation: bfloat16 autocast on a GPU
    b = cfg.batch_size
    t = seq_len or cfg.plan_seq_len
    a = min(answer_len or cfg.plan_answer_len, t)
    kb = cfg.kb_size[1] + int(cfg.null_slot)  # knowledge tokens per example
    h, inter, heads, v = config.hidden_size, config.intermediate_size, config.num_attention_heads, config.vocab_size
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    kb_layers = adapter.config.kb_layers
    grad_layers = config.num_hidden_layers - min(kb_layers)

    # Saved per token, per layer (bytes).
    norms = 2 * 4 * h  # the two RMSNorms keep their input in float32
    mlp = 3 * inter * s  # SiLU input, its output, the up projection
    norm_qk = 4 * (q + kv) if qk_norm else 0  # Qwen3-style per-head norms keep float32 q and k
    plain = s * (q + 2 * q + q) + 4 * heads + t * s + norm_qk  # q, k and v repeated to every head, out, lse, mask
    kb_attn = (
        s * (h + 2 * q + 2 * kv)  # KB query head input; KB query and text query; text keys and values
        + heads * (kb + t) * (4 + (s if s != 4 else 0))  # joint softmax, float32 (+ its cast)
        + norm_qk + (4 * q if qk_norm else 0)  # the KB query goes through q_norm as well
    )
    n_kb = len(kb_layers)
    per_token = (grad_layers - n_kb) * (norms + mlp + plain) + n_kb * (norms + mlp + kb_attn)
    kb_states = n_kb * b * kb * kv * 16  # KB keys and values per layer: projection, LayerNorm, casts
    activations = b * t * per_token + kb_states
    layer_inputs = grad_layers * b * t * h * s
    one_layer = b * t * (norms + mlp + max(plain, kb_attn))
    activations_checkpointed = layer_inputs + one_layer + kb_states

    copy = cfg.copy_values
    gate = copy or bool(getattr(cfg, "span_kinds", None))  # a copy or span gate reads the final hidden state
    vocab_at_answers = b * a * v * 4  # float32 (B, A, V)
    head_saved = (
        b * t * (4 * h + v * s + (h * s if gate else 0) + 3 * 4 * kb)  # final norm, logits, gate input, KB weights
        # the copy mix keeps its log-softmax, copy distribution, log, logaddexp inputs and result; the
        # plain and span losses a log-softmax
        + vocab_at_answers * (6 if copy else 1)
    )
    # The peak comes early in the backward pass, while all of the above is still held: the copy mix's
    # backward (logaddexp, log) holds up to five more float32 (B, A, V) gradients and temporaries at once
    # (measured with a tensor-tracking dispatch mode); a plain log-softmax two; and the logits'
    # gradient is a full (B, T, V) tensor, made while the logits are still kept.
    head = head_saved + max((5 if copy else 2) * vocab_at_answers, b * t * v * s + vocab_at_answers)

    return Plan(
        model=getattr(config, "name_or_path", "") or cfg.base_model,
        device=device,
        weights_dtype="bfloat16" if bf16 else "float32",
        base_parameters=_count(base),
        adapter_parameters=_count(adapter),
        batch_size=b, seq_len=t, answer_len=a,
        tokens_per_step=b * cfg.grad_accum * world * t,
        gradient_checkpointing=cfg.gradient_checkpointing,
        weights=_count(base) * wb,
        adapter_state=_count(adapter) * 16,
        activations=activations,
        activations_checkpointed=activations_checkpointed,
        head=head,
        head_saved=head_saved,
    )


def visible_gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes of this process's GPU, or None without one."""
    import os

    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")))


def check_fits(plan: Plan, free: int, total: int) -> None:
    """Refuse a plan that does not fit the GPU, with the estimate in the message."""
    need = plan.peak + CUDA_RESERVE
    if need <= free:
        return
    other = "" if plan.gradient_checkpointing else (
        f"; with gradient_checkpointing: true it would need {(plan.peak_with(True) + CUDA_RESERVE) / GIB:.1f} GiB"
    )
    raise ValueError(
        f"this recipe needs about {need / GIB:.1f} GiB of GPU memory ({plan.peak / GIB:.1f} GiB estimated "
        f"peak + {CUDA_RESERVE / GIB:.0f} GiB for CUDA itself), but the GPU has {free / GIB:.1f} GiB free of "
        f"{total / GIB:.1f} GiB{other}. Lower batch_size (raise grad_accum to keep the tokens per step) or "
        f"pick a smaller model. The estimate, from `kblam train RECIPE --plan`:\n{plan.format()}"
    )


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied weight once


def _meta_adapter(cfg, config, encoder_dim: int | None):
    import torch

    from kblam import defaults
    from kblam.adapter import KBAdapter, KBLaMConfig

    n_layers = config.num_hidden_layers
    kb_layers = sorted(set(cfg.kb_layers)) if cfg.kb_layers else list(range(0, n_layers, cfg.kb_layer_frequency))
    if not kb_layers or kb_layers[0] < 0 or kb_layers[-1] >= n_layers:
        raise ValueError(f"kb_layers must be a non-empty subset of 0..{n_layers - 1}, got {kb_layers}")
    encoder = cfg.encoder or defaults.DEFAULT_ENCODER
    heads = config.num_attention_heads
    options = {k: v for k, v in cfg.adapter_options().items()
               if k not in ("kb_layers", "kb_layer_frequency") and (v is not None or k == "system_prompt")}
    adapter_config = KBLaMConfig(
        base_model=cfg.base_model, base_fingerprint="", encoder=encoder,
        encoder_dim=encoder_dim or _encoder_dim(encoder), kb_layers=kb_layers, hidden_size=config.hidden_size,
        num_attention_heads=heads, num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, num_hidden_layers=n_layers,
        **options,
    )
    with torch.device("meta"):
        return KBAdapter(adapter_config)


def _encoder_dim(name: str) -> int:
    if name in ENCODER_DIMS:
        return ENCODER_DIMS[name]
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name).hidden_size
    except (OSError, ValueError, AttributeError):
        return 1024  # unknown offline: an upper bound for common sentence encoders (the adapter is small anyway)
