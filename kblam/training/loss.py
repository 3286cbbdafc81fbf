"""The training losses: answer tokens (through the copy mix when the adapter has one) + optional retrieval."""

from __future__ import annotations

import torch

from kblam import copying, spans
from kblam.training.data import Batch


def answer_loss(model, batch: Batch, retrieval_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean negative log-likelihood of the answer tokens, plus retrieval_weight x the retrieval loss.

    The retrieval loss is -log of the KB attention (mean over KB layers and heads, renormalised over
    the KB) on the asked triple (the null slot for an unanswerable question), at every answer position
    of single-fact questions.
    """
    cfg = model.config
    if cfg.span_kinds:
        return span_loss(model, batch, retrieval_weight)
    copy = cfg.copy_values
    with model.attach_embeddings(
        batch.keys, batch.values, batch.kb_mask,
        queries=batch.queries if cfg.retrieval_prior else None,
        value_ids=batch.value_ids if copy else None,
        tap=retrieval_weight > 0,
    ):
        logits = model.base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        weights = model.kb_weights() if (copy or retrieval_weight > 0) else None
        hidden = model._lm_input if copy else None

    b, t, v = logits.shape
    steps = torch.arange(int(batch.answer_length.max()), device=logits.device)
    valid = steps[None] < batch.answer_length[:, None]  # (B, A)
    target_pos = (batch.answer_start[:, None] + steps).clamp_max(t - 1)
    pred_pos = target_pos - 1  # the logits at position p predict token p + 1
    targets = batch.input_ids.gather(1, target_pos).masked_fill(~valid, copying.PAD)

    def at(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, pred_pos[..., None].expand(-1, -1, x.shape[-1]))

    if copy:
        pointer = copying.pointers_along(targets, batch.value_ids)
        log_probs = model.copy_log_probs(at(logits), at(hidden), at(weights), pointer, batch.value_ids)
    else:
        log_probs = torch.log_softmax(at(logits).float(), dim=-1)
    nll = -log_probs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    loss = (nll * valid).sum() / valid.sum()
    metrics = {"answer_loss": float(loss.detach())}
    if retrieval_weight > 0:
        has = (batch.gold >= 0)[:, None] & valid
        gold = batch.gold.clamp_min(0)[:, None, None].expand(-1, pred_pos.shape[1], 1)
        on_gold = at(weights).gather(-1, gold)[..., 0]
        retrieval = -(torch.log(on_gold + 1e-9) * has).sum() / has.sum().clamp_min(1)
        metrics["retrieval_loss"] = float(retrieval.detach())
        loss = loss + retrieval_weight * retrieval
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def span_loss(model, batch: Batch, retrieval_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative log-likelihood of the answer under the span decision of kblam.spans.

    The first token of a span costs -log g_kind - log a_column (the gate chose a span of that kind and
    the KB attention chose its triple); any other answer token -log g_lm - log p_lm(token); tokens
    inside a span cost nothing (they are emitted verbatim). Plus retrieval_weight x the retrieval loss.
    """
    cfg = model.config
    with model.attach_embeddings(
        batch.keys, batch.values, batch.kb_mask,
        queries=batch.queries if cfg.retrieval_prior else None, tap=True,
    ):
        logits = model.base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        weights = model.kb_weights()
        hidden = model._lm_input

    b, t, v = logits.shape
    steps = torch.arange(batch.span_kind.shape[1], device=logits.device)
    valid = steps[None] < batch.answer_length[:, None]  # (B, A)
    target_pos = (batch.answer_start[:, None] + steps).clamp_max(t - 1)
    pred_pos = target_pos - 1  # the logits at position p predict token p + 1
    targets = batch.input_ids.gather(1, target_pos)

    def at(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, pred_pos[..., None].expand(-1, -1, x.shape[-1]))

    w = at(weights).float()  # (B, A, M')
    gate = spans.gate_log_probs(model.adapter, at(hidden), w, batch.quoted)  # (B, A, 1 + K)
    lm = torch.log_softmax(at(logits).float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    lm_lp = gate[..., 0] + lm
    kind = batch.span_kind.clamp_min(1) - 1
    options = spans.candidate_weights(w, batch.quoted, tuple(cfg.span_kinds), cfg.null_slot)  # (B, A, K, M')
    chosen = options.gather(2, kind[..., None, None].expand(-1, -1, 1, options.shape[-1]))[:, :, 0]
    span_a = chosen.gather(-1, batch.span_column.clamp_min(0)[..., None])[..., 0]
    span_lp = gate.gather(-1, (kind + 1)[..., None])[..., 0] + torch.log(span_a + 1e-9)
    log_p = torch.where(batch.span_kind > 0, span_lp, lm_lp)
    counted = valid & ~batch.inside_span
    loss = -(log_p * counted).sum() / counted.sum()
    starts = counted & (batch.span_kind > 0)
    metrics = {"answer_loss": float(loss.detach()),
               "span_loss": float(-(span_lp.detach() * starts).sum() / starts.sum().clamp_min(1))}
    if retrieval_weight > 0:
        has = (batch.gold >= 0)[:, None] & counted
        gold = batch.gold.clamp_min(0)[:, None, None].expand(-1, pred_pos.shape[1], 1)
        on_gold = w.gather(-1, gold)[..., 0]
        retrieval = -(torch.log(on_gold + 1e-9) * has).sum() / has.sum().clamp_min(1)
        metrics["retrieval_loss"] = float(retrieval.detach())
        loss = loss + retrieval_weight * retrieval
    metrics["loss"] = float(loss.detach())
    return loss, metrics
