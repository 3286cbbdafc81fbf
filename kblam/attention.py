"""Rectangular attention: the KBLaM attention, plugged into transformers' AttentionInterface.

On a KB layer, prompt token i attends to all M knowledge tokens and to prompt tokens <= i. Knowledge
tokens issue no queries and do not attend to one another, so a layer costs O(N*M + N^2), not
O((N + M)^2). Their logits come from a separate KB query head, carry no rotary position (the answer
must not depend on the order of the triples) and are shifted by log(C) - log(M) so that the mass the
KB draws does not grow with M. That shift, the padding of a batch of KBs and the optional retrieval
prior all arrive as one additive `bias` per knowledge token. Text-to-text logits are the base model's own.

A large KB can be read in chunks (`KBLayerInputs.chunk_size`): the same joint softmax computed the
flash-attention way, carrying a running max, sum and unnormalised KB output per (batch, head, query)
over chunks of knowledge tokens, then combining them with the text part. Peak memory is then
O(N * chunk) per layer instead of O(N * M), and the result equals the single pass (to float rounding).
Whoever wants the KB attention itself (sources, the copy path) gets it through `record`, one chunk of
normalised probabilities at a time, so nothing of size (B, heads, N, M) is ever materialised.

How it plugs in, without copying any modeling file:
- `register(base)` adds the function under the name "kblam_<base>" to AttentionInterface, and the
  base's mask function under the same name to AttentionMaskInterface (without a mask function of its
  own name, transformers silently hands the attention function attention_mask=None).
- A forward pre-hook on each KB layer's attention module (kblam.model) passes a `KBLayerInputs` in
  the `kblam` keyword, which transformers carries down to the attention function.
- Without that keyword (other layers, or no KB attached) the call goes to the base implementation
  untouched, so the model is the base model bit for bit.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

SUPPORTED_BASES = ("sdpa", "eager")


@dataclass
class KBLayerInputs:
    """What one KB layer needs besides the text attention: handed over per call by the pre-hook."""

    hidden_states: torch.Tensor  # (B, N, hidden): the attention module's input, for the KB query head
    query_head: nn.Module  # hidden -> (B, N, heads * head_dim)
    keys: torch.Tensor  # (B or 1, kv_heads, M, head_dim)
    values: torch.Tensor  # (B or 1, kv_heads, M, head_dim)
    bias: float | torch.Tensor  # added to the KB logits: a float, or (B|1, 1, 1, M) (-inf for padding)
    # Receives the KB attention as (first knowledge token, probs (B, heads, N, chunk)) pairs, normalised
    # jointly with the text; to be iterated (at most once) during the call. Unchunked: one pair, (0, all).
    record: Callable[[Iterable[tuple[int, torch.Tensor]]], None] | None = None
    chunk_size: int | None = None  # knowledge tokens per chunk; None: one pass over the whole KB


def kb_logit_shift(kb_size: int, kb_scale_factor: float | None) -> float:
    """log(C) - log(M); with C=None no shift (the KB's pull then grows with its size)."""
    if kb_scale_factor is None:
        return 0.0
    return math.log(kb_scale_factor) - math.log(max(kb_size, 1))


def _grouped_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """q (B, H, N, D) x k (B|1, Hkv, L, D) -> (B, H, N, L), without repeating k for each query group."""
    b, h, n, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, (h // hkv) * n, d)
    return torch.matmul(q, key.transpose(-1, -2)).reshape(b, h, n, key.shape[2])


def _grouped_mix(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """p (B, H, N, L) x v (B|1, Hkv, L, D) -> (B, H, N, D)."""
    b, h, n, length = probs.shape
    hkv = value.shape[1]
    p = probs.reshape(b, hkv, (h // hkv) * n, length)
    return torch.matmul(p, value).reshape(b, h, n, value.shape[-1])


def _text_bias(attention_mask: torch.Tensor | None, n: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """The text mask as an additive float bias broadcastable to (B, H, N, L)."""
    neg = torch.finfo(like.dtype).min
    if attention_mask is None:
        # transformers skipped a plain causal mask (sdpa's is_causal path): queries are the last n of L.
        i = torch.arange(n, device=like.device)[:, None] + (length - n)
        j = torch.arange(length, device=like.device)[None, :]
        return torch.where(j <= i, 0.0, neg).to(like.dtype)[None, None]
    mask = attention_mask[:, :, -n:, -length:]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, neg).to(like.dtype)
    return mask.to(like.dtype)


def _softcap(logits: torch.Tensor, module: nn.Module) -> torch.Tensor:
    cap = getattr(module, "attn_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def kb_query(module: nn.Module, kb: KBLayerInputs, head_dim: int) -> torch.Tensor:
    """The KB query (B, H, N, D): the KB query head, the module's own q_norm if it has one, no rotary."""
    b, n, _ = kb.hidden_states.shape
    # The adapter may be float32 over a bfloat16 base: compute in the head's dtype.
    hidden = kb.hidden_states.to(next(kb.query_head.parameters()).dtype)
    q = kb.query_head(hidden).view(b, n, -1, head_dim).to(kb.hidden_states.dtype)
    q_norm = getattr(module, "q_norm", None)  # Qwen3, Gemma3 normalise queries per head
    if q_norm is not None:
        q = q_norm(q)
    return q.transpose(1, 2)


def rectangular_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    *,
    kb: KBLayerInputs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Joint softmax over [KB keys | text keys]; returns (B, N, H, D) like every attention function."""
    n, head_dim = query.shape[2], query.shape[3]
    q_kb = kb_query(module, kb, head_dim).to(query.dtype)
    if kb.chunk_size is not None:
        return _chunked_attention(module, q_kb, query, key, value, attention_mask, scaling, dropout, kb)

    kb_logits = _kb_logits(module, q_kb, kb, scaling, 0, kb.keys.shape[2])
    text_logits = _softcap(_grouped_scores(query, key) * scaling, module)
    text_logits = text_logits + _text_bias(attention_mask, n, key.shape[2], text_logits)

    probs = torch.softmax(torch.cat([kb_logits, text_logits], dim=-1), dim=-1, dtype=torch.float32)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training).to(query.dtype)
    m = kb.keys.shape[2]
    kb_probs, text_probs = probs[..., :m], probs[..., m:]
    if kb.record is not None:
        kb.record([(0, kb_probs)])  # with its graph: the copy path trains through it
    out = _grouped_mix(kb_probs, kb.values.to(query.dtype)) + _grouped_mix(text_probs, value)
    return out.transpose(1, 2).contiguous(), None


def _kb_logits(module: nn.Module, q_kb: torch.Tensor, kb: KBLayerInputs, scaling: float, start: int, stop: int):
    """Logits (B, H, N, stop - start) of knowledge tokens start..stop-1, their bias included."""
    logits = _softcap(_grouped_scores(q_kb, kb.keys[:, :, start:stop].to(q_kb.dtype)) * scaling, module)
    if not torch.is_tensor(kb.bias):
        return logits + kb.bias
    return logits + kb.bias[..., start:stop].to(logits.dtype)


def _chunked_attention(module, q_kb, query, key, value, attention_mask, scaling, dropout, kb: KBLayerInputs):
    """The joint softmax of rectangular_attention, reading the KB kb.chunk_size knowledge tokens at a time.

    Per (B, H, N): a running max `top` and sum of exp(logit - top) over the chunks seen so far, and the
    KB output accumulated unnormalised (rescaled whenever `top` grows); then the text part joins the
    same max and sum, and the two outputs are added and divided by the total. Computed in float32.
    """
    m, step = kb.keys.shape[2], kb.chunk_size

    def drop(p):  # dropout on the numerators = dropout on the normalised probabilities
        return nn.functional.dropout(p, p=dropout, training=module.training)

    top = torch.full((*query.shape[:3], 1), float("-inf"), device=query.device)
    total = torch.zeros_like(top)
    kb_out = torch.zeros(query.shape, device=query.device)
    for start in range(0, m, step):
        logits = _kb_logits(module, q_kb, kb, scaling, start, start + step).float()
        new_top = torch.maximum(top, logits.amax(-1, keepdim=True))
        safe = new_top.clamp_min(torch.finfo(torch.float32).min)  # an all-padding (-inf) chunk gives 0, not NaN
        rescale, p = torch.exp(top - safe), torch.exp(logits - safe)
        total = total * rescale + p.sum(-1, keepdim=True)
        kb_out = kb_out * rescale + _grouped_mix(drop(p), kb.values[:, :, start:start + step].float())
        top = new_top

    text_logits = _softcap(_grouped_scores(query, key) * scaling, module)
    text_logits = (text_logits + _text_bias(attention_mask, query.shape[2], key.shape[2], text_logits)).float()
    joint = torch.maximum(top, text_logits.amax(-1, keepdim=True))  # finite: each row sees a token or the KB
    kb_share, text_p = torch.exp(top - joint), torch.exp(text_logits - joint)
    total = total * kb_share + text_p.sum(-1, keepdim=True)
    out = (kb_out * kb_share + _grouped_mix(drop(text_p), value.float())) / total

    def kb_probs() -> Iterator[tuple[int, torch.Tensor]]:  # a second pass, with the final max and sum
        for start in range(0, m, step):
            logits = _kb_logits(module, q_kb, kb, scaling, start, start + step).float()
            yield start, (torch.exp(logits - joint) / total).to(query.dtype)

    if kb.record is not None:
        kb.record(kb_probs())
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _base_function(base: str, module: nn.Module) -> Callable:
    if base == "sdpa":
        return sdpa_attention_forward
    # "eager" is each model file's own function (Gemma's applies soft-capping, for one).
    return sys.modules[type(module).__module__].eager_attention_forward


def attention_name(base: str) -> str:
    return f"kblam_{base}"


def register(base: str) -> str:
    """Register the KBLaM attention that falls back to `base`; returns its name. Idempotent."""
    if base not in SUPPORTED_BASES:
        raise ValueError(f"kblam wraps the {SUPPORTED_BASES} attention implementations, not {base!r}")
    name = attention_name(base)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kblam=None, **kwargs):
        if kblam is None:
            return _base_function(base, module)(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        return rectangular_attention(module, query, key, value, attention_mask, scaling, dropout, kb=kblam)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask if base == "sdpa" else eager_mask)
    return name
