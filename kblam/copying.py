"""The copy path: a pointer-generator mix that lets the decoder copy the tokens of KB values.

A frozen small LM cannot turn a value *vector* back into exact value text (the reference's issue #82:
the right triple is attended, the number generated is wrong). So, as in pointer-generator networks,
the next-token distribution becomes

    p(w) = (1 - g) * p_lm(w) + g * sum_i a_i [next token of value i == w]

where a_i is the KB attention at this position (averaged over KB layers and heads, renormalised over
the knowledge tokens) and g a small learned gate. Each value keeps a pointer into its own tokens:
after emitting value i's k-th token the pointer moves to k+1, otherwise it falls back to 0 (or 1 if the
token just emitted starts the value). A value already emitted in full proposes nothing. The null slot's
"value" is the refusal sentence, so refusing is copying too. Once a value has been copied for
`copy_commit_after` tokens, the gate is held open until it is complete (`commit`).
"""

from __future__ import annotations

import torch

PAD = -1


def value_token_ids(tokenizer, texts: list[str], max_tokens: int, *, leading_space: bool = True) -> torch.Tensor:
    """(M, L) token ids of each value as it reads after a space in an answer, padded with PAD."""
    prefix = " " if leading_space else ""
    encoded = tokenizer([prefix + t for t in texts], add_special_tokens=False)["input_ids"]
    length = max(1, min(max_tokens, max((len(e) for e in encoded), default=1)))
    ids = torch.full((len(texts), length), PAD, dtype=torch.long)
    for row, tokens in enumerate(encoded):
        tokens = tokens[:length]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


def advance(pointer: torch.Tensor, token: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Move each value's pointer after `token` was emitted. pointer (B, M), token (B,), ids (B|1, M, L)."""
    ids = ids.expand(pointer.shape[0], -1, -1)
    lengths = (ids != PAD).sum(-1)
    expected = ids.gather(-1, pointer.clamp_max(ids.shape[-1] - 1)[..., None])[..., 0]
    continues = (pointer < lengths) & (expected == token[:, None])
    restarts = ids[..., 0] == token[:, None]
    return torch.where(continues, pointer + 1, torch.where(restarts, 1, 0))


def pointers_along(targets: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Pointers before each target token, for teacher forcing. targets (B, T) -> (B, T, M)."""
    b, t = targets.shape
    pointer = torch.zeros(b, ids.shape[1], dtype=torch.long, device=targets.device)
    out = []
    for step in range(t):
        out.append(pointer)
        pointer = advance(pointer, targets[:, step], ids)
    return torch.stack(out, dim=1)


def candidates(pointer: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The token each value proposes next (PAD when it has been emitted in full). (B, [T,] M)."""
    ids = ids if pointer.dim() == 2 else ids[:, None]
    ids = ids.expand(*pointer.shape, ids.shape[-1])
    lengths = (ids != PAD).sum(-1)
    token = ids.gather(-1, pointer.clamp_max(ids.shape[-1] - 1)[..., None])[..., 0]
    return torch.where(pointer < lengths, token, PAD)


def gate_features(weights: torch.Tensor, pointer: torch.Tensor, null_slot: bool) -> torch.Tensor:
    """(.., 2): KB mass on values whose copy is under way, and on the null slot."""
    in_progress = (weights * (pointer > 0)).sum(-1)
    null = weights[..., -1] if null_slot else torch.zeros_like(in_progress)
    return torch.stack([in_progress, null], dim=-1)


def commit(gate: torch.Tensor, weights: torch.Tensor, pointer: torch.Tensor, tokens: torch.Tensor,
           after: int) -> torch.Tensor:
    """A value copied for `after` tokens is finished: the gate stays at least at the KB weight of such values.

    The learned gate reads the LM's hidden state, which after "is 4" may well believe a number has
    ended; a copy that far along is no coincidence, so it is completed (gate (.., 1)).
    """
    committed = (weights * ((pointer >= after) & (tokens != PAD))).sum(-1, keepdim=True)
    return torch.maximum(gate, committed.to(gate.dtype))


def mix(logits: torch.Tensor, gate: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p of the pointer-generator mix. logits (.., V), gate (.., 1) in [0, 1], weights/tokens (.., M)."""
    log_lm = torch.log_softmax(logits.float(), dim=-1)
    valid = tokens != PAD
    weights = weights.float() * valid
    mass = weights.sum(-1, keepdim=True)
    # Nothing to copy (all values emitted, or no KB mass): the gate has nothing to mix in.
    gate = torch.where(mass > 1e-9, gate.float(), torch.zeros_like(gate.float()))
    copy = torch.zeros_like(log_lm).scatter_add_(-1, tokens.clamp_min(0), weights / mass.clamp_min(1e-9))
    return torch.logaddexp(torch.log1p(-gate.clamp_max(1 - 1e-6)) + log_lm, torch.log(gate * copy + 1e-30))
