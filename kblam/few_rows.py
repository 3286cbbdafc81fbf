"""A product of a few float32 query rows with bfloat16 KB states, at the memory's rate, on one CPU thread.

A decoding step asks the KB with a handful of rows per KV head (3 for SmolLM2: 9 query heads over 3 KV
heads, one token), and a product that small is bound by reading the KB, not by arithmetic. oneDNN's
bfloat16 products (torch.bmm) reach half that rate for so few rows, whatever the layout (issue 10 tried
keys x queries, oneDNN's prepacked layout, the keys transposed, chunks, a product per row, float32
states and torch's fused attention; `benchmarks/kb_products.py`). The kernels (kblam._few_rows_kernel)
read each bfloat16 element once, widen it (the top half of a float32) and use it for 3 rows at a time
in float32: the scores (keys), the mix (values, token by token), each reading the KB in 4 streams
(`benchmarks/kb_products.py` times them beside torch.bmm; `benchmarks/decode_parts.py`, what they save a
decoding pass; docs/performance.md). A third, `shifted_exp2`, turns a prompt's recorded rows' scores into
probabilities in one pass (kblam.attention._recorded_shared).

numba compiles them (a well-kept JIT: no C compiler needed at the user's, and the machine code is cached
on disk after the first process). It is optional (the `fast` extra): without numba, or with
`KBLAM_FEW_ROWS=0` in the environment, or `kblam.few_rows.ENABLED = False`, the attention multiplies
with torch as before; a kernel that fails to compile says so once (a RuntimeWarning) and torch serves.
It runs on one thread: with more torch threads oneDNN splits its products between them and is as fast
(measured on two), so it is used only with one.

The products are computed in float32 from float32 rows; torch's path rounds the rows to bfloat16 and
its result to bfloat16. The answers are compared in docs/performance.md.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

# Rows per KV head up to which this beats torch.bmm on one thread: at 7 they were about even over 10,000
# triples, at 12 torch was faster (benchmarks/kb_products.py's rows).
MOST_ROWS = 6
ENABLED = os.environ.get("KBLAM_FEW_ROWS", "1") != "0"

_NO_BIAS = np.zeros(0, np.float32)
_kernel = None  # the compiled function, once imported; False when numba is missing or fails


def _load():
    global _kernel
    if _kernel is None:
        try:
            from kblam._few_rows_kernel import rows_dot, rows_mix, shifted_exp2

            # Compiled (or loaded from numba's cache) here, on tiny products, so that a failure to compile
            # leaves torch's products in place instead of failing a question.
            rows_dot(np.zeros((1, 4, 2), np.uint16), np.zeros((1, 1, 2), np.float32), np.zeros((1, 1, 4), np.float32),
                     _NO_BIAS)
            rows_mix(np.zeros((1, 4, 2), np.uint16), np.zeros((1, 1, 4), np.float32), np.zeros((1, 1, 2), np.float32))
            shifted_exp2(np.zeros((1, 1, 2), np.uint16), np.zeros((1, 2), np.float32), np.zeros(1, np.int32),
                         np.zeros((1, 1), np.float32), np.zeros((1, 1, 2), np.float32))
        except Exception as error:  # numba missing, not importable with this numpy, or failing to compile
            _kernel = False
            if not isinstance(error, ImportError):
                warnings.warn(f"kblam.few_rows: the numba kernel failed ({error!r}); torch's products serve",
                              RuntimeWarning, stacklevel=2)
        else:
            _kernel = _Kernels(rows_dot, rows_mix, shifted_exp2)
    return _kernel


class _Kernels(NamedTuple):
    dot: Callable  # rows x (keys: token by token), plus a bias
    mix: Callable  # rows x (values: token by token)
    exp2: Callable  # 2 ** (scores + bias - shift), in one pass


def fits(rows: int, kb_part: torch.Tensor) -> bool:
    """Whether a product of `rows` query rows per KV head with this KB part (keys or values, bfloat16,
    shared by the batch) goes through the kernel."""
    return (
        ENABLED
        and rows <= MOST_ROWS
        and kb_part.dtype == torch.bfloat16
        and kb_part.device.type == "cpu"
        and kb_part.shape[0] == 1
        and not torch.is_grad_enabled()
        and torch.get_num_threads() == 1
        and bool(_load())
    )


def product(rows: torch.Tensor, kb: torch.Tensor, *, bias: float | torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """(Hkv, R, X) float32 x (Hkv, X, Y) bfloat16 -> (Hkv, R, Y) float32, as torch.bmm would, plus `bias`
    (a number, or Y numbers: the KB logits' bias) when given.

    `out`: (Hkv, R, S) float32, contiguous, S >= Y: the result is written into its first Y columns (the KB's
    part of a joint softmax's logits) and that slice returned. The kernels read kb as the cache keeps a KB
    layer, token by token: the keys transposed (kb.transpose(-1, -2) contiguous: the scores, sums along
    each key) or the values as they are (kb contiguous: the mix, without a bias); another layout is
    multiplied by torch."""
    kernel = _load()
    heads, count, _ = rows.shape
    width = kb.shape[2]
    by_key = kb.transpose(-1, -2).is_contiguous()
    if not kernel or not (by_key or (kb.is_contiguous() and bias is None)):
        result = torch.bmm(rows.to(kb.dtype), kb).float()
        result = result if bias is None else result + (bias.reshape(-1) if torch.is_tensor(bias) else bias)
        return result if out is None else out[..., :width].copy_(result)
    if out is None:
        out = torch.empty(heads, count, width)
    if not by_key:
        result = out if out.shape[2] == width else torch.empty(heads, count, width)
        kernel.mix(_bits(kb), _row_array(rows.float()), result.numpy())
        return result if result is out else out[..., :width].copy_(result)
    if bias is None:
        add = _NO_BIAS
    elif torch.is_tensor(bias):
        add = bias.float().reshape(-1).numpy()
    else:
        add = np.full(1, bias, np.float32)
    kernel.dot(_bits(kb.transpose(-1, -2)), _row_array(rows.float()), out.numpy(), add)
    return out[..., :width]


def shifted_exp2(scores: torch.Tensor, bias: torch.Tensor | None, which: torch.Tensor, shift: torch.Tensor,
                 out: torch.Tensor) -> bool:
    """out = 2 ** (scores + bias[which] - shift) in one pass, when the kernel serves (True), else nothing done.

    scores (H, R, n) bfloat16, contiguous; bias (B, n) float32 or None (0); which (R,) the bias row of each
    of the R rows; shift (H, R, 1) float32; out (H, R, n) float32, contiguous. The recorded rows' probabilities
    (kblam.attention._recorded_shared), on one thread as the products above."""
    kernel = _load()
    if not (ENABLED and kernel and torch.get_num_threads() == 1 and scores.dtype == torch.bfloat16
            and scores.is_contiguous() and out.is_contiguous()):
        return False
    if bias is None:
        bias, which = torch.zeros(1, scores.shape[2]), torch.zeros(scores.shape[1])
    kernel.exp2(_bits(scores), bias.float().contiguous().numpy(), which.to(torch.int32).contiguous().numpy(),
                shift.float().reshape(shift.shape[0], -1).contiguous().numpy(), out.numpy())
    return True


def _bits(kb: torch.Tensor):
    """A contiguous bfloat16 tensor as numpy's uint16 (numba has no bfloat16), no copy."""
    return kb.view(torch.int16).numpy().view("uint16")


def _row_array(x: torch.Tensor):
    """x (H, R, K) as a C-contiguous numpy array (H, R, S), S >= K, of which the kernel reads the first K
    columns: a slice of the softmax's columns (the KB's probabilities beside the text's) is read where it
    lies when its rows are evenly spaced, anything else is copied."""
    h, r, k = x.shape
    s = x.stride(1)
    if x.stride(2) == 1 and s >= k and x.stride(0) == r * s \
            and x.storage_offset() + h * r * s <= x.untyped_storage().nbytes() // x.element_size():
        return torch.as_strided(x, (h, r, s), (r * s, s, 1)).numpy()
    return x.contiguous().numpy()
