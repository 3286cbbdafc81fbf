"""Rectangular attention: the KBLaM attention, plugged into transformers' AttentionInterface.

On a KB layer, prompt token i attends to all M knowledge tokens and to prompt tokens <= i. Knowledge
tokens issue no queries and do not attend to one another, so a layer costs O(N*M + N^2), not
O((N + M)^2). Their logits come from a separate KB query head, carry no rotary position (the answer
must not depend on the order of the triples) and are shifted by log(C) - log(M) so that the mass the
KB draws does not grow with M. That shift, the padding of a batch of KBs and the optional retrieval
prior all arrive as one additive `bias` per knowledge token. Text-to-text logits are the base model's own.

At inference on the CPU, a call the model reads in chunks hands the KB part to torch's fused (flash)
attention kernel for the CPU, which returns each row's log-sum-exp for the text part to join
(`_fused_attention`); training and other devices keep the loop below.

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
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from kblam import few_rows

SUPPORTED_BASES = ("sdpa", "eager")
# Batch x heads x recorded rows x knowledge tokens kept from the first chunked pass (134 MB of float32 at most,
# for one layer): 16 questions over 10,000 triples fit, and keeping is cheaper than a second pass's products.
KEEP_PROBS = 1 << 25
# Probabilities per chunk of the recorded rows' second pass (8 MB of float32): the question's tokens over
# 10,000 triples in one product (_recorded_probs).
RECORD_CHUNK = 1 << 21
# exp(x) = exp2(x * log2(e)): torch's CPU exp2 kernel runs 4.5x faster than its exp (0.12 against 0.56 ms for
# 884,736 float32 logits, one thread, measured for issue 10), and the KB's logits are the attention's widest pass.
LOG2E = 1.0 / math.log(2.0)


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
    # The query positions whose KB attention `record` needs (None: all N): the probabilities it receives
    # are then (B, heads, len(record_rows), chunk). A chunked call recomputes the KB logits of these rows
    # only, in its second pass (the question's tokens and the last position, not the whole prompt).
    record_rows: torch.Tensor | None = None
    # The base's own q_proj output for hidden_states, when it was caught on its way (kblam.model): a
    # low-rank query head adds its delta to it instead of multiplying by q_proj a second time.
    base_query: torch.Tensor | None = None
    # A core is free for kblam (kblam.second_thread): a one-question decoding step's products over a large
    # KB may read it on two threads (kblam.few_rows).
    halves: bool = False


def kb_logit_shift(kb_size: int, kb_scale_factor: float | None) -> float:
    """log(C) - log(M); with C=None no shift (the KB's pull then grows with its size)."""
    if kb_scale_factor is None:
        return 0.0
    return math.log(kb_scale_factor) - math.log(max(kb_size, 1))


def _grouped_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """q (B, H, N, D) x k (B|1, Hkv, L, D) -> (B, H, N, L), without repeating k for each query group."""
    b, h, n, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    if key.shape[0] == 1:  # a KB shared by the batch: see _shared_rows
        return _unshared(_per_head(_shared_rows(query, hkv), key[0].transpose(-1, -2)), b, h, n)
    q = query.reshape(b, hkv, (h // hkv) * n, d)
    return torch.matmul(q, key.transpose(-1, -2)).reshape(b, h, n, length)


def _grouped_mix(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """p (B, H, N, L) x v (B|1, Hkv, L, D) -> (B, H, N, D)."""
    b, h, n, length = probs.shape
    hkv = value.shape[1]
    if value.shape[0] == 1:
        return _unshared(_per_head(_shared_rows(probs, hkv), value[0]), b, h, n).contiguous()
    p = probs.reshape(b, hkv, (h // hkv) * n, length)
    return torch.matmul(p, value).reshape(b, h, n, value.shape[-1])


def _shared_rows(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, H, N, X) -> (Hkv, group * B * N, X): the batch folded into the rows of one product per KV head.

    torch.matmul broadcasts a KB shared by the batch, (1, Hkv, L, D), by copying it once per question:
    at a decoding step that copy dwarfs the product (measured while developing, one thread: 130 ms
    against 3 ms for 16 questions over 10,000 triples). Folded instead, the rows are laid out (KV head, group, batch, token), an
    order in which the (B, H, N, L) result is a view (_unshared), and so is that result when it
    comes back here to be mixed with the values: neither the KB nor the logits are copied.
    """
    b, h, n, cols = x.shape
    g = h // hkv
    return x.reshape(b, hkv, g, n, cols).permute(1, 2, 0, 3, 4).reshape(hkv, g * b * n, cols)


def _per_head(rows: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """(Hkv, R, X) x (Hkv, X, Y) -> (Hkv, R, Y), one 2-D product per KV head.

    A chunk of the KB, kb.keys[:, :, start:stop], is a strided batch of contiguous matrices; bfloat16
    batched products copy such a batch first (2.0 ms against 0.85 ms for 8,192 knowledge tokens,
    measured while developing), 2-D products read each head's block where it lies. Autograd has no out= products:
    training keeps the batched one.
    """
    if torch.is_grad_enabled():
        return torch.matmul(rows, kb)
    if rows.dtype == torch.float32 and kb.dtype == torch.bfloat16:  # _with_kb chose the few-rows kernel
        return few_rows.product(rows, kb)
    if kb.is_contiguous() or kb.transpose(-1, -2).is_contiguous():
        # The whole KB (no chunk): a batched product reads it without a copy, and streams it from memory
        # faster than three 2-D products (a decoding step over 10,000 triples: 3.3 against 4.0 ms for the
        # five KB layers' scores and mix, caches cold; measured for issue 10).
        return torch.bmm(rows, kb)
    out = rows.new_empty(rows.shape[0], rows.shape[1], kb.shape[2], dtype=torch.promote_types(rows.dtype, kb.dtype))
    for head in range(rows.shape[0]):
        torch.mm(rows[head], kb[head], out=out[head])
    return out


def _unshared(out: torch.Tensor, b: int, h: int, n: int) -> torch.Tensor:
    """(Hkv, group * B * N, X) -> (B, H, N, X), a view."""
    hkv, _, cols = out.shape
    return out.view(hkv, h // hkv, b, n, cols).permute(2, 0, 1, 3, 4).reshape(b, h, n, cols)


def _with_kb(product: Callable, x: torch.Tensor, kb_part: torch.Tensor) -> torch.Tensor:
    """product(x, KB keys or values), whatever dtype the KB states are kept in.

    bfloat16 states are multiplied as they are, x rounded to bfloat16, and the product is returned in
    bfloat16 for the caller's next operation (bias, accumulation) to widen: this CPU's AVX512-BF16
    products run up to 5x faster than float32 ones, and nothing of the KB's size is converted
    (docs/performance.md measures what it costs in answers). float16 states are widened to x's dtype
    (CPUs lack fast float16 products). A few query rows on one thread (a decoding step) keep float32 and go
    through kblam.few_rows, which reads the bfloat16 states at the memory's rate; its result is float32.
    """
    if kb_part.dtype == torch.bfloat16 and x.dtype != torch.bfloat16:
        if few_rows.fits(x.shape[0] * x.shape[1] * x.shape[2] // kb_part.shape[1], kb_part):
            return product(x.float(), kb_part)
        return product(x.to(torch.bfloat16), kb_part)
    return product(x, kb_part.to(x.dtype))


def _text_bias(attention_mask: torch.Tensor | None, n: int, length: int, like: torch.Tensor) -> torch.Tensor | None:
    """The text mask as an additive float bias broadcastable to (B, H, N, L); None when it masks nothing."""
    neg = torch.finfo(like.dtype).min
    if attention_mask is None:
        if n == 1:  # a decoding step without padding: the last position sees every text token
            return None
        # transformers skipped a plain causal mask (sdpa's is_causal path): queries are the last n of L.
        i = torch.arange(n, device=like.device)[:, None] + (length - n)
        j = torch.arange(length, device=like.device)[None, :]
        return torch.where(j <= i, 0.0, neg).to(like.dtype)[None, None]
    mask = attention_mask[:, :, -n:, -length:]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, neg).to(like.dtype)
    return mask.to(like.dtype)


def _masked(text_logits: torch.Tensor, attention_mask: torch.Tensor | None, n: int, length: int) -> torch.Tensor:
    bias = _text_bias(attention_mask, n, length, text_logits)
    return text_logits if bias is None else text_logits + bias


def _softcap(logits: torch.Tensor, module: nn.Module) -> torch.Tensor:
    cap = getattr(module, "attn_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def kb_query(module: nn.Module, kb: KBLayerInputs, head_dim: int) -> torch.Tensor:
    """The KB query (B, H, N, D): the KB query head, the module's own q_norm if it has one, no rotary."""
    b, n, _ = kb.hidden_states.shape
    # The adapter may be float32 over a bfloat16 base: compute in the head's dtype.
    hidden = kb.hidden_states.to(next(kb.query_head.parameters()).dtype)
    q = kb.query_head(hidden) if kb.base_query is None else kb.query_head(hidden, base=kb.base_query)
    q = q.view(b, n, -1, head_dim).to(kb.hidden_states.dtype)
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
    # Scaled here, (B, H, N, D), rather than the logits, (B, H, N, M): one pass over the KB's logits less.
    q_kb = kb_query(module, kb, head_dim).to(query.dtype) * scaling
    if kb.chunk_size is not None and _fused_fits(module, query, kb):
        return _fused_attention(module, q_kb, query, key, value, attention_mask, scaling, kb)
    if kb.chunk_size is not None:
        return _chunked_attention(module, q_kb, query, key, value, attention_mask, scaling, dropout, kb)
    if _is_one_question_step(module, query, key, attention_mask, kb):
        return _one_question_step(q_kb, query, key, value, scaling, kb), None

    kb_logits = _kb_logits(module, q_kb, kb, 0, kb.keys.shape[2]).to(query.dtype)
    text_logits = _softcap(_grouped_scores(query, key) * scaling, module)
    text_logits = _masked(text_logits, attention_mask, n, key.shape[2])

    probs = torch.softmax(torch.cat([kb_logits, text_logits], dim=-1), dim=-1, dtype=torch.float32)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training).to(query.dtype)
    m = kb.keys.shape[2]
    kb_probs, text_probs = probs[..., :m], probs[..., m:]
    if kb.record is not None:  # with its graph: the copy path trains through it
        kb.record([(0, kb_probs if kb.record_rows is None else kb_probs[:, :, kb.record_rows])])
    out = _grouped_mix(text_probs, value) + _with_kb(_grouped_mix, kb_probs, kb.values)
    return out.transpose(1, 2).contiguous(), None


def _is_one_question_step(module, query, key, attention_mask, kb: KBLayerInputs) -> bool:
    """A decoding step of one question (one token, no padding mask, no autograd, no soft-capping) over a KB
    that kblam.few_rows multiplies."""
    b, h, n, _ = query.shape
    return (b == 1 and n == 1 and attention_mask is None and key.shape[0] == 1 and query.dtype == torch.float32
            and getattr(module, "attn_logit_softcapping", None) is None and not module.training
            and few_rows.fits(h // key.shape[1], kb.keys))


def _one_question_step(q_kb, query, key, value, scaling, kb: KBLayerInputs) -> torch.Tensor:
    """rectangular_attention's joint softmax for _is_one_question_step in one kernel call (kblam.few_rows.attend:
    the scores, the softmax with the text's logits, both mixes; split between two threads where a core is
    free). A decoding step's operations each cost several microseconds whatever their size, with the caches
    cold after the base's weights went through them. States the kernel does not read as they lie (not
    token by token) take the previous way: the kernel's KB logits with their bias and the text's in one
    buffer, one softmax, the two mixes."""
    _, h, _, d = query.shape
    hkv, m = key.shape[1], kb.keys.shape[2]
    g = h // hkv
    q_text = query.reshape(hkv, g, d) * scaling
    done = few_rows.attend(q_kb.reshape(hkv, g, d), q_text, kb.keys[0], kb.values[0], kb.bias, key[0], value[0],
                           probs=kb.record is not None, halves=kb.halves)
    if done is not None:  # the whole step in one kernel call
        out, kb_probs = done
        if kb.record is not None:
            kb.record([(0, kb_probs.reshape(1, h, 1, m))])
        return out.view(1, 1, h, d)
    logits = query.new_empty(hkv, g, m + key.shape[2])  # (KV head, group, KB | text): (1, H, 1, M + L) for one token
    few_rows.product(q_kb.reshape(hkv, g, d), kb.keys[0].transpose(-1, -2), bias=kb.bias, out=logits)
    torch.bmm(q_text, key[0].transpose(-1, -2), out=logits[..., m:])
    probs = torch.softmax(logits, dim=-1)
    if kb.record is not None:
        kb.record([(0, probs[..., :m].reshape(1, h, 1, m))])
    out = few_rows.product(probs[..., :m], kb.values[0]) + torch.bmm(probs[..., m:], value[0])
    return out.view(1, 1, h, d)


def _kb_logits(module: nn.Module, q_kb: torch.Tensor, kb: KBLayerInputs, start: int, stop: int):
    """Float32 logits (B, H, N, stop - start) of knowledge tokens start..stop-1 (q_kb already scaled), bias
    included (the bias, float32, widens bfloat16 scores in the same pass)."""
    scores = _with_kb(_grouped_scores, q_kb, kb.keys[:, :, start:stop])
    logits = _softcap(scores.float() if getattr(module, "attn_logit_softcapping", None) else scores, module)
    bias = kb.bias[..., start:stop].float() if torch.is_tensor(kb.bias) else kb.bias
    if torch.is_grad_enabled():
        return logits.float() + bias
    # Widened first, then the bias added in place: a float32 + float32 pass runs 2x faster than adding a
    # float32 bias to bfloat16 scores (logits is this call's own temporary: nothing else reads it).
    return logits.float().add_(bias)


def _chunked_attention(module, q_kb, query, key, value, attention_mask, scaling, dropout, kb: KBLayerInputs):
    """The joint softmax of rectangular_attention, reading the KB kb.chunk_size knowledge tokens at a time.

    Per (B, H, N): a running max `top` and sum of exp(logit - top) over the chunks seen so far, and the
    KB output accumulated unnormalised (rescaled whenever `top` grows); then the text part joins the
    same max and sum, and the two outputs are added and divided by the total. Computed in float32.
    """
    m, step = kb.keys.shape[2], kb.chunk_size
    # Without autograd, the chunk's logits are turned into probabilities in place: a (B, H, N, chunk)
    # tensor less to allocate and fill per chunk.
    in_place = not torch.is_grad_enabled()

    def drop(p):  # dropout on the numerators = dropout on the normalised probabilities
        return nn.functional.dropout(p, p=dropout, training=module.training)

    rows = slice(None) if kb.record_rows is None else kb.record_rows
    n_rows = query.shape[2] if kb.record_rows is None else len(kb.record_rows)
    # The recorded rows' probabilities are kept from this pass when small (a decoding step, the question's
    # tokens over a mid-sized KB), not recomputed in a second pass over the KB.
    kept = [] if in_place and kb.record is not None and query.shape[0] * query.shape[1] * n_rows * m <= KEEP_PROBS \
        else None
    top = torch.full((*query.shape[:3], 1), float("-inf"), device=query.device)
    total = torch.zeros_like(top)
    kb_out = torch.zeros(query.shape, device=query.device)
    for start in range(0, m, step):
        logits = _kb_logits(module, q_kb, kb, start, start + step).float()
        new_top = torch.maximum(top, logits.amax(-1, keepdim=True))
        safe = new_top.clamp_min(torch.finfo(torch.float32).min)  # an all-padding (-inf) chunk gives 0, not NaN
        rescale = torch.exp(top - safe)
        p = torch.exp(logits - safe) if not in_place else logits.sub_(safe).mul_(LOG2E).exp2_()
        total = total * rescale + p.sum(-1, keepdim=True, dtype=torch.float32)
        if kept is not None:
            kept.append((start, p[:, :, rows], safe[:, :, rows]))
        kb_out = kb_out * rescale + _with_kb(_grouped_mix, drop(p), kb.values[:, :, start:start + step])
        top = new_top

    out, log_z = _join_text(module, kb_out, top, total, query, key, value, attention_mask, scaling, drop)
    if kb.record is not None:
        if kept is None:
            kb.record(_recorded_probs(module, q_kb, kb, log_z, query.dtype))
        else:  # exp(logit - safe) * exp(safe - log_z) = exp(logit - log_z)
            kb.record((start, (p.float() * torch.exp(safe - log_z[:, :, rows])).to(query.dtype))
                      for start, p, safe in kept)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _join_text(module, kb_out, top, kb_sum, query, key, value, attention_mask, scaling, drop=None):
    """The joint softmax's text part joined to its KB part: (output (B, H, N, D) float32, the joint softmax's
    log-normaliser log_z (B, H, N, 1)). The KB part is its output kb_out (B, H, N, D) and sum kb_sum of
    exp(logit - top) over the knowledge tokens, both relative to exp(top) (B, H, N, 1); `drop`: dropout on
    the text's numerators."""
    text_logits = _softcap(_grouped_scores(query, key) * scaling, module)
    text_logits = _masked(text_logits, attention_mask, query.shape[2], key.shape[2]).float()
    joint = torch.maximum(top, text_logits.amax(-1, keepdim=True))  # finite: each row sees a token or the KB
    kb_share, text_p = torch.exp(top - joint), torch.exp(text_logits - joint)
    total = kb_sum * kb_share + text_p.sum(-1, keepdim=True)
    out = (kb_out * kb_share + _grouped_mix(text_p if drop is None else drop(text_p), value.float())) / total
    return out, joint + torch.log(total)


# torch's CPU flash-attention kernel, which also returns each row's log-sum-exp (the public
# scaled_dot_product_attention does not, and the KB part's must join the text part's softmax).
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


# False: every KB call through the chunked loop (_chunked_attention), the reference the fused paths are tested
# against; a torch whose flash kernel fails loses that kernel only (_FLASH set to None), not _looped_kb.
ENABLE_FUSED = True


def _has_amx() -> bool:
    """Whether the CPU has AMX (Linux's /proc/cpuinfo flags); True where that cannot be read (today's choice)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            flags = next((line for line in info if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or "amx_bf16" in flags.split()


# bfloat16 states through the fused kernel only where the CPU multiplies them in AMX tiles. Without AMX (an AMD
# EPYC with AVX512-BF16) torch's flash kernel for the CPU ran slower than the chunked loop's oneDNN products,
# which multiply bfloat16 natively there: time to first token 0.82 against 0.63 s at 100,000 triples, 0.218
# against 0.191 at 10,000 (float32 states: 0.217 against 0.211, so they keep the kernel); with AMX (an Intel
# Xeon) the kernel took 44 against 71 ms a layer at 100,000 (issue 10).
FUSED_BFLOAT16 = _has_amx()
# A batch over a shared KB that each question biases goes through the fused kernel question by question
# from this many tokens a call (a prompt), through the chunked loop below it (_fused_fits).
FUSED_BIASED_BATCH_TOKENS = 8
# Knowledge tokens per call of the fused kernel (_flash_kb): a KV head's keys and values of a chunk, 1 MB in
# bfloat16, stay in a core's cache while the kernel reads them once per block of query rows.
FUSED_CHUNK = 4096
# Knowledge tokens per chunk of _looped_kb: a 24-token prompt's scores and probabilities of a chunk, 1.7 MB each
# in bfloat16, stay in the caches between the products and the softmax kernel.
LOOP_CHUNK = 4096
# Tokens a call from which bfloat16 states go through _looped_kb without AMX (a prompt, not a decoding step).
LOOPED_LEAST_TOKENS = 8
# Knowledge tokens from which _looped_kb reads its KB in halves on two threads, where a core is free.
LOOP_HALVES_TOKENS = 2 * LOOP_CHUNK


def _fused_fits(module: nn.Module, query: torch.Tensor, kb: KBLayerInputs) -> bool:
    """Whether _fused_attention serves this call: inference on the CPU, states torch's kernel multiplies as
    they are (and fast: bfloat16 where FUSED_BFLOAT16), no soft-capping (Gemma 2 caps the logits before the softmax), a KB of at least one token, and
    not a few tokens of a batch whose questions each bias a KB they share (the retrieval prior).

    The kernel's mask has one stride for all the rows, so such a batch is asked question by question, each
    reading the KB, where the chunked loop folds the questions into the rows of one product: for 16
    questions over 10,000 triples, a decoding step's layer took 12.3 ms question by question against 4.4 in
    the loop, a 24-token prompt's 49 against 99 (measured for issue 10)."""
    per_question_bias = torch.is_tensor(kb.bias) and kb.bias.shape[0] > 1
    if _looped(kb.keys):  # oneDNN's products and kblam's kernel: torch's private flash kernel not needed
        kernel = query.shape[2] >= LOOPED_LEAST_TOKENS and few_rows.softmax_ready()
    else:
        kernel = _FLASH is not None and kb.keys.dtype in (torch.float32, torch.bfloat16)
    return (ENABLE_FUSED and kernel and not torch.is_grad_enabled() and not module.training and query.device.type == "cpu"
            and kb.keys.shape[2] > 0 and getattr(module, "attn_logit_softcapping", None) is None
            and not (kb.keys.shape[0] == 1 and query.shape[0] > 1 and per_question_bias
                     and query.shape[2] < FUSED_BIASED_BATCH_TOKENS))


def _fused_attention(module, q_kb, query, key, value, attention_mask, scaling, kb: KBLayerInputs):
    """The joint softmax of rectangular_attention with the KB part computed by torch's fused CPU kernel.

    The kernel (oneDNN's products, the softmax block by block in its caches, the flash-attention way) gives
    the KB part's normalised output and log-sum-exp per query row; the text part joins them here as in
    _chunked_attention. It replaces the chunked loop at inference: on the Intel machine of issue 10 that
    loop's passes over the KB logits (widen, bias, max, exp2, sum, round for the mix) cost 12 ms a layer for
    a 24-token prompt over 10,000 triples, the kernel 3 (docs/performance.md). The probabilities `record`
    reads are recomputed for its rows only (_recorded_probs).
    """
    b, h, n, d = query.shape
    hkv = kb.keys.shape[1]
    keys, values = kb.keys, kb.values
    if values.stride(-1) != 1:  # the kernel misreads other layouts (torch 2.13); the cache's values are contiguous
        values = values.contiguous()
    mask = kb.bias if torch.is_tensor(kb.bias) else None  # (B|1, 1, 1, M), broadcast by the kernel
    if keys.shape[0] == 1 and b > 1 and (mask is None or mask.shape[0] == 1):
        rows = _shared_rows(q_kb, hkv)[None]  # a shared KB: the batch folded into the rows, as _grouped_scores

        def unfold(t):
            return _unshared(t[0], b, h, n)
    else:  # query heads grouped by KV head: (B, Hkv, group * N, D), a view
        rows = q_kb.reshape(b, hkv, (h // hkv) * n, d)

        def unfold(t):
            return t.reshape(b, h, n, t.shape[-1])

    if _looped(keys):
        kb_out, kb_lse = _looped_kb(rows.to(keys.dtype), keys, values, mask, halves=kb.halves)
    else:
        try:
            kb_out, kb_lse = _flash_kb(rows.to(keys.dtype), keys, values, mask)
        except (RuntimeError, TypeError) as error:  # a torch whose private kernel differs: not used from now on
            global _FLASH
            _FLASH = None
            warnings.warn(f"kblam: torch's fused CPU attention failed ({error!r}); the chunked KB attention serves",
                          RuntimeWarning, stacklevel=2)
            return _chunked_attention(module, q_kb, query, key, value, attention_mask, scaling, 0.0, kb)
    kb_lse = unfold(kb_lse[..., None]) + (0.0 if mask is not None else float(kb.bias))
    # the kernel's output is normalised: relative to exp(its log-sum-exp), its sum is 1
    out, log_z = _join_text(module, unfold(kb_out), kb_lse, 1.0, query, key, value, attention_mask, scaling)
    if kb.record is not None:
        kb.record(_recorded_probs(module, q_kb, kb, log_z, query.dtype))
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _looped(keys: torch.Tensor) -> bool:
    """Whether _fused_attention reads this KB through _looped_kb rather than torch's fused kernel: bfloat16
    states where the CPU has no AMX (a prompt's; a decoding step without AMX takes the chunked loop, which keeps
    the recorded probabilities from its one pass: _fused_fits)."""
    return keys.dtype == torch.bfloat16 and not FUSED_BFLOAT16


def _looped_kb(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               halves: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """_flash_kb's result for bfloat16 states on a CPU without AMX: LOOP_CHUNK knowledge tokens at a time, the
    scores and the mix by oneDNN's bfloat16 products (native there), the softmax between them by
    kblam.few_rows.chunk_softmax (two passes over a chunk where _chunked_attention makes nine: 47 against 63 ms
    a layer for a 24-token prompt over 100,000 triples, one thread, measured for issue 10).

    `halves` (a core free for kblam, kblam.second_thread): a KB of LOOP_HALVES_TOKENS or more is read half on a
    worker thread, half here, the halves joined by their softmax sums (flash decoding's join); torch's products
    and the kernel release the GIL, and a hand-over (~0.1 ms) is small beside a half (over 2 ms)."""
    m = keys.shape[2]
    mid = (m // 2 + LOOP_CHUNK - 1) // LOOP_CHUNK * LOOP_CHUNK  # whole chunks in the first half
    if not halves or m < LOOP_HALVES_TOKENS or mid >= m:
        return _normalised(*_looped_part(rows, keys, values, mask))
    from kblam import second_thread  # kblam.second_thread imports kblam.model, which imports this module

    def half(part: slice):
        return _looped_part(rows, keys[:, :, part], values[:, :, part], None if mask is None else mask[..., part])

    other = second_thread.start(lambda: (half(slice(mid, None)), None))
    try:
        first = half(slice(None, mid))
    finally:
        second = other.result()  # waited for whatever happens here: its buffers are this call's
    top = torch.maximum(first[1], second[1])
    safe = top.clamp_min(torch.finfo(torch.float32).min)
    acc, total = 0.0, 0.0
    for part_acc, part_top, part_total in (first, second):
        scale = torch.exp2(part_top - safe)  # 0 for a half that saw no knowledge token (-inf)
        acc, total = acc + part_acc * scale[..., None], total + part_total * scale
    return _normalised(acc, top, total)


def _looped_part(rows, keys, values, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_looped_kb over these knowledge tokens: (unnormalised output (B, Hkv, R, D), each row's largest logit in
    base 2 (B, Hkv, R), the sum of 2 ** (logit - that largest)). Into buffers the calling thread keeps (_scratch;
    see _recorded_shared)."""
    b, hkv, r, d = rows.shape
    m = keys.shape[2]
    width = min(LOOP_CHUNK, m)
    scores_buffer = _scratch("loop_scores", hkv * r * width, torch.bfloat16)
    probs_buffer = _scratch("loop_probs", hkv * r * width, torch.bfloat16)
    mix = rows.new_empty(hkv, r, d)
    acc = torch.zeros(b, hkv, r, d)
    top = torch.full((b, hkv * r), float("-inf"))
    total, rescale = torch.zeros(b, hkv * r), torch.empty(hkv * r)
    for i in range(b):
        k, v = keys[i if keys.shape[0] > 1 else 0], values[i if values.shape[0] > 1 else 0]
        bias = None if mask is None else mask[i if mask.shape[0] > 1 else 0, 0, 0].float()
        for start in range(0, m, width):
            size = min(width, m - start)
            scores = scores_buffer[:hkv * r * size].view(hkv, r, size)
            probs = probs_buffer[:hkv * r * size].view(hkv, r, size)
            part = k[:, start:start + size].transpose(-1, -2)
            for head in range(hkv):  # each head's chunk where it lies (see _per_head)
                torch.mm(rows[i, head], part[head], out=scores[head])
            few_rows.chunk_softmax(scores.view(-1, size), None if bias is None else bias[start:start + size],
                                   top[i], total[i], rescale, probs.view(-1, size))
            for head in range(hkv):
                torch.mm(probs[head], v[head, start:start + size], out=mix[head])
            acc[i].mul_(rescale.view(hkv, r, 1)).add_(mix)
    return acc, top.view(b, hkv, r), total.view(b, hkv, r)


def _normalised(acc: torch.Tensor, top: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, natural log-sum-exp) from _looped_part's result; a row that saw no knowledge token: 0, -inf."""
    seen = total > 0
    total = torch.where(seen, total, 1.0)
    return acc / total[..., None], torch.where(seen, (top + torch.log2(total)) / LOG2E, float("-inf"))


def _flash_kb(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of rows (B, Hkv, R, D) over the KB alone: (output (B, Hkv, R, D) float32, log-sum-exp
    (B, Hkv, R)), -inf where a row sees no knowledge token.

    The kernel is called FUSED_CHUNK knowledge tokens at a time and the parts combined by their
    log-sum-exps: it reads a head's keys and values once per block of 32 query rows, and a chunk's stay in
    the core's cache for the next block (a 24-token prompt over 100,000 triples: 34 against 64 ms a layer,
    measured for issue 10). A KB shared by questions that each bias it is read question by question (given
    the KB expanded to the batch, the kernel took 93 ms where this takes 49 for 16 questions' 24-token
    prompts over 10,000 triples)."""
    outs, lses = [], []
    for start in range(0, keys.shape[2], FUSED_CHUNK):
        part = slice(start, start + FUSED_CHUNK)
        k, v, m = keys[:, :, part], values[:, :, part], None if mask is None else mask[..., part]
        if k.shape[0] == rows.shape[0]:
            out, lse = _FLASH(rows, k, v, 0.0, False, attn_mask=m, scale=1.0)
        else:
            out, lse = (torch.cat(x) for x in zip(*(_FLASH(rows[i:i + 1], k, v, 0.0, False, attn_mask=m[i:i + 1],
                                                             scale=1.0) for i in range(rows.shape[0])), strict=True))
        if m is not None:  # the kernel gives a row that sees no knowledge token (all padding) 0, not -inf
            lse = lse.masked_fill(torch.isneginf(m).all(-1), float("-inf"))
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0].float(), lses[0]
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    safe = lse.masked_fill(torch.isneginf(lse), 0.0)  # no knowledge token at all: every weight below is 0
    out = sum(o.float() * torch.exp(part_lse - safe)[..., None] for o, part_lse in zip(outs, lses, strict=True))
    return out, lse


def _recorded_probs(module, q_kb: torch.Tensor, kb: KBLayerInputs, log_z: torch.Tensor, dtype: torch.dtype
                    ) -> Iterator[tuple[int, torch.Tensor]]:
    """A second pass over the KB, chunk by chunk, for the rows `record` reads: p = exp(logit - log_z),
    log_z (B, H, N, 1) the log of the joint softmax's normaliser (KB and text).

    Chunks hold RECORD_CHUNK probabilities or more (kb.chunk_size knowledge tokens at least): a few rows
    read in one product each are cheaper than in many. Without autograd or soft-capping the logits are
    computed in base 2 (the query, bias and log_z times log2(e), then exp2): three passes over a chunk
    after its product."""
    rows = slice(None) if kb.record_rows is None else kb.record_rows
    q, log_z = q_kb[:, :, rows], log_z[:, :, rows]
    step = max(kb.chunk_size, RECORD_CHUNK // max(q.shape[0] * q.shape[1] * q.shape[2], 1))
    if torch.is_grad_enabled() or getattr(module, "attn_logit_softcapping", None) is not None:
        for start in range(0, kb.keys.shape[2], step):
            logits = _kb_logits(module, q, kb, start, start + step)
            yield start, torch.exp(logits - log_z).to(dtype)
        return
    q, log_z = q * LOG2E, log_z * LOG2E
    bias = kb.bias.float() * LOG2E if torch.is_tensor(kb.bias) else kb.bias * LOG2E
    if not torch.is_tensor(bias):  # one number for every knowledge token: part of the row's shift
        log_z, bias = log_z - bias, None
    if kb.keys.shape[0] == 1 and kb.keys.device.type == "cpu":
        yield from _recorded_shared(q, kb.keys, bias, log_z, step, dtype)
        return
    for start in range(0, kb.keys.shape[2], step):  # a KB per question
        scores = _with_kb(_grouped_scores, q, kb.keys[:, :, start:start + step])
        logits = scores.float() if bias is None else scores.float().add_(bias[..., start:start + step])  # see _kb_logits
        yield start, logits.sub_(log_z).exp2_().to(dtype)


def _recorded_shared(q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None, log_z: torch.Tensor, step: int,
                     dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """_recorded_probs over a KB shared by the batch (q, bias and log_z in base 2), in two buffers kept by the
    thread (_scratch): each chunk's probabilities are overwritten by the next chunk's, or the next call's.

    Fresh buffers of this size are new pages of memory each time, and the kernel's first write to each page
    costs more than the pass itself: a 24-token prompt's recorded rows over 100,000 triples took 34 ms a
    layer in fresh tensors, 21 with glibc told to keep its freed memory (MALLOC_MMAP_THRESHOLD_; measured for
    issue 10), which a library cannot ask of the process it runs in."""
    b, h, r, _ = q.shape
    hkv, m = keys.shape[1], keys.shape[2]
    rows, z = _shared_rows(q.to(keys.dtype), hkv), _shared_rows(log_z, hkv)  # (KV head, group x batch x row, ...)
    count, width = rows.shape[1], min(step, m)
    # each row's question, whose bias it reads: rows are ordered (group, question, position)
    which = (torch.arange(count) // r % b) if torch.is_tensor(bias) and bias.shape[0] > 1 else torch.zeros(count)
    logits_buffer = _scratch("logits", hkv * count * width, torch.float32)
    scores_buffer = None if keys.dtype == torch.float32 else _scratch("scores", hkv * count * width, keys.dtype)
    for start in range(0, m, step):
        size = min(step, m - start)
        logits = logits_buffer[:hkv * count * size].view(hkv, count, size)
        scores = logits if scores_buffer is None else scores_buffer[:hkv * count * size].view(hkv, count, size)
        part = keys[0, :, start:start + size].transpose(-1, -2)
        for head in range(hkv):  # each head's chunk where it lies (see _per_head)
            torch.mm(rows[head], part[head], out=scores[head])
        part_bias = None if bias is None else bias[:, 0, 0, start:start + size]  # (B|1, size)
        if scores is logits or not few_rows.shifted_exp2(scores, part_bias, which, z, logits):
            if scores is not logits:
                logits.copy_(scores)
            if part_bias is not None:  # in the rows' order the bias varies with the question only
                logits.view(hkv, h // hkv, b, r, size).add_(part_bias[None, None, :, None])
            logits.sub_(z).exp2_()
        yield start, _unshared(logits, b, h, r).to(dtype)


_THREAD = threading.local()


def _scratch(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of at least `numel` elements that this thread keeps for `name` (the largest asked for)."""
    buffers = _THREAD.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        buffer = buffers[name] = torch.empty(numel, dtype=dtype)
    return buffer


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
