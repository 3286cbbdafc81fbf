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
probabilities in one pass (kblam.attention._recorded_shared); a fourth, `chunk_softmax`, a prompt's chunk of
KB scores into the probabilities of a running softmax in two, between oneDNN's products on a CPU without AMX
(kblam.attention._looped_kb).

`attend` runs a one-question decoding step's whole KB attention in one call: the scores, the softmax
joint with the text's, both mixes (a step's operations cost microseconds each whatever their size, the
caches cold after the base's weights went through them). Where a core is free for kblam
(`KBLaM.second_thread`, kblam.second_thread), a KB of more than MOST_TOKENS_ALONE tokens is read on two
threads, half each, joined by their softmax sums as flash decoding joins its splits. numba's own threads
serve (its OpenMP layer starts a region in microseconds; Python threads hand over in about 100 us).

numba compiles them (a well-kept JIT: no C compiler needed at the user's, and the machine code is cached
on disk after the first process). It is optional (the `fast` extra): without numba, or with
`KBLAM_FEW_ROWS=0` in the environment, or `kblam.few_rows.ENABLED = False`, the attention multiplies
with torch as before; a kernel that fails to compile says so once (a RuntimeWarning) and torch serves.
It runs with torch on one thread: with more torch threads oneDNN splits its products between them and is
as fast (measured on two), so it is used only with one.

The products are computed in float32 from float32 rows; torch's path rounds the rows to bfloat16 and
its result to bfloat16. The answers are compared in docs/performance.md.
"""

from __future__ import annotations

import contextlib
import os
import threading
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


_load_lock = threading.Lock()  # a question's first use may come while preload's thread is still loading


def _load():
    global _kernel
    if _kernel is None:
        with _load_lock:
            if _kernel is None:
                _kernel = _compiled()
    return _kernel


def preload() -> threading.Thread | None:
    """Load the kernels on a thread of their own, now (KBLaM.from_pretrained, in a process of one torch
    thread: the one that uses them). Loaded at a first large-KB question instead, numba's import (~0.6 s and
    ~100 MB here, measured for issue 10) lands on that question's time and on its memory peak, while the KB's
    projection is still held."""
    if not ENABLED or _kernel is not None:
        return None
    thread = threading.Thread(target=_load, name="kblam-few-rows-load", daemon=True)
    thread.start()
    return thread


def _compiled():
    """The kernels (_Kernels), or False where numba is missing or they fail to compile."""
    try:
        from kblam._few_rows_kernel import (
            chunk_softmax,
            rows_attend,
            rows_attend_halves,
            rows_dot,
            rows_mix,
            shifted_exp2,
        )

        # Compiled (or loaded from numba's cache) here, on tiny products, so that a failure to compile
        # leaves torch's products in place instead of failing a question.
        rows_dot(np.zeros((1, 4, 2), np.uint16), np.zeros((1, 1, 2), np.float32), np.zeros((1, 1, 4), np.float32),
                 _NO_BIAS)
        rows_mix(np.zeros((1, 4, 2), np.uint16), np.zeros((1, 1, 4), np.float32), np.zeros((1, 1, 2), np.float32))
        shifted_exp2(np.zeros((1, 1, 2), np.uint16), np.zeros((1, 2), np.float32), np.zeros(1, np.int32),
                     np.zeros((1, 1), np.float32), np.zeros((1, 1, 2), np.float32))
        _tiny_attend(rows_attend)
        chunk_softmax(np.zeros((1, 2), np.uint16), _NO_BIAS, np.full(1, -np.inf, np.float32),
                      np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros((1, 2), np.uint16))
    except Exception as error:  # numba missing, not importable with this numpy, or failing to compile
        if not isinstance(error, ImportError):
            warnings.warn(f"kblam.few_rows: the numba kernel failed ({error!r}); torch's products serve",
                          RuntimeWarning, stacklevel=3)
        return False
    return _Kernels(rows_dot, rows_mix, shifted_exp2, rows_attend, rows_attend_halves, chunk_softmax)


class _Kernels(NamedTuple):
    dot: Callable  # rows x (keys: token by token), plus a bias
    mix: Callable  # rows x (values: token by token)
    exp2: Callable  # 2 ** (scores + bias - shift), in one pass
    attend: Callable  # a one-question decoding step's joint softmax and mixes, in one call
    attend_halves: Callable  # the same, the KB's tokens split between two threads
    softmax: Callable  # a prompt's chunk of KB scores to probabilities, flash-attention style (chunk_softmax)


# Knowledge tokens from which a decoding step's KB goes on two threads, when a core is free and numba's
# threads start in microseconds: waking the second thread after a decoding pass's milliseconds of base
# layers costs about as much as reading a few thousand tokens (`benchmarks/kb_products.py --triples N`,
# few_rows_attend_halves_cold against few_rows_attend_cold: 0.80 against 0.53 ms at 2,000 triples, even at
# 6,000, 1.06 against 1.21 at 10,000, 5.2 against 8.8 at 100,000).
MOST_TOKENS_ALONE = 6144
# numba's threading layers that start a parallel region in microseconds; its own "workqueue" takes about
# 140 us each time (and is not safe to enter from two threads), so it leaves the KB on one thread.
_QUICK_LAYERS = ("omp", "tbb")
_halves_state: bool | None = None  # None: not tried yet in this process
_halves_lock = threading.Lock()  # one step on two threads at a time: two would ask for four cores


def _halves_ready() -> bool:
    """Whether numba's parallel regions serve here: at least 2 threads and a quick threading layer (tried
    once, on a tiny product, which also compiles the two-thread kernels)."""
    global _halves_state
    if _halves_state is None:
        _halves_state = False
        kernel = _load()
        try:
            import numba

            torch_threads = torch.get_num_threads()  # before numba starts its threads (below)
            if kernel and numba.config.NUMBA_NUM_THREADS >= 2:
                try:
                    with _two_numba_threads():
                        _tiny_attend(kernel.attend_halves)
                finally:
                    # numba's OpenMP layer starts (_two_numba_threads) by setting this thread's OpenMP threads
                    # to its own count; torch shares that runtime (one libgomp.so.1) and reads its thread
                    # count there: set it back.
                    torch.set_num_threads(torch_threads)
                _halves_state = numba.threading_layer() in _QUICK_LAYERS
        except Exception as error:  # no threading layer, or one that fails to start
            warnings.warn(f"kblam.few_rows: two-thread products unavailable ({error!r}); one thread serves",
                          RuntimeWarning, stacklevel=2)
    return _halves_state


def _after_fork() -> None:
    # GNU OpenMP does not survive a fork: numba stops a child that enters a parallel region its parent
    # used. A forked child multiplies on one thread.
    global _halves_state
    if _halves_state:
        _halves_state = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


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


def attend(q_kb: torch.Tensor, q_text: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           bias: float | torch.Tensor, text_keys: torch.Tensor, text_values: torch.Tensor, *, probs: bool,
           halves: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A one-question decoding step's rectangular attention in one kernel call: the joint softmax over
    [KB | text] of (Hkv, R, D) query rows (q_kb for the KB, q_text for the text, both scaled) and both
    mixes. keys, values (Hkv, M, D) bfloat16 token by token (the cache's layout); text_keys, text_values
    (Hkv, L, D) float32. Returns (out (Hkv, R, D), the KB's probabilities (Hkv, R, M) when `probs`, else
    scratch), or None where the kernel does not serve these tensors (torch's operations then do).

    One call instead of about ten torch operations: a decoding step's operations each cost microseconds
    whatever their size, the caches being cold after the base's weights went through them. `halves`: a core
    is free for kblam (kblam.second_thread): a KB of more than MOST_TOKENS_ALONE tokens is then read on two
    threads, half each, joined by the softmax's sums (as flash decoding joins its splits), where numba's
    threads start quickly and no other step holds them."""
    kernel = _load()
    if not (kernel and keys.is_contiguous() and values.is_contiguous() and text_keys.dtype == torch.float32
            and text_values.dtype == torch.float32):
        return None
    two = halves and keys.shape[1] > MOST_TOKENS_ALONE and _halves_ready() and _halves_lock.acquire(blocking=False)
    try:
        return _attend_now(q_kb, q_text, keys, values, bias, text_keys, text_values, probs, two)
    finally:
        if two:
            _halves_lock.release()


def _attend_now(q_kb, q_text, keys, values, bias, text_keys, text_values, probs: bool, two: bool):
    """attend's kernel call, on two threads when `two` (the caller holds _halves_lock, or times it alone)."""
    kernel = _load()
    heads, rows, width = q_kb.shape
    add = bias.float().reshape(-1).numpy() if torch.is_tensor(bias) else np.full(1, bias, np.float32)
    out = torch.empty(heads, rows, width)
    buf = torch.empty(heads, rows, keys.shape[1])
    args = (_bits(keys), _bits(values), add, q_kb.float().contiguous().numpy(), q_text.float().contiguous().numpy(),
            text_keys.contiguous().numpy(), text_values.contiguous().numpy(), buf.numpy(), out.numpy(), probs)
    if not two:
        kernel.attend(*args)
        return out, buf
    with _two_numba_threads():
        kernel.attend_halves(*args)
    return out, buf


@contextlib.contextmanager
def _two_numba_threads():
    """numba's parallel regions on two threads within, as many as before after: the count is the calling
    thread's own (set here, not inside the kernels: numba does not cache machine code that sets it)."""
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


def _tiny_attend(function) -> None:
    """`function` (rows_attend or its two-thread form) on a tiny step: compiled, or loaded from numba's cache."""
    function(np.zeros((1, 8, 2), np.uint16), np.zeros((1, 8, 2), np.uint16), _NO_BIAS, np.zeros((1, 1, 2), np.float32),
             np.zeros((1, 1, 2), np.float32), np.zeros((1, 1, 2), np.float32), np.zeros((1, 1, 2), np.float32),
             np.zeros((1, 1, 8), np.float32), np.zeros((1, 1, 2), np.float32), True)


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


def softmax_ready() -> bool:
    """Whether chunk_softmax's kernel serves (numba, enabled, torch on one thread as for the products)."""
    return ENABLED and torch.get_num_threads() == 1 and bool(_load())


def chunk_softmax(scores: torch.Tensor, bias: torch.Tensor | None, top: torch.Tensor, total: torch.Tensor,
                  rescale: torch.Tensor, probs: torch.Tensor) -> None:
    """A prompt's chunk of KB scores to probabilities in two passes (kblam._few_rows_kernel.chunk_softmax,
    in base 2): per row, top = the running largest logit, rescale = 2 ** (old top - top), probs = 2 ** (logit -
    top) in bfloat16, total = total * rescale + their sum. scores, probs (R, n) bfloat16, contiguous; bias (n,)
    float32 or None; top, total, rescale (R,) float32, contiguous (top -inf and total 0 before the first
    chunk). The caller checked softmax_ready()."""
    _load().softmax(_bits(scores), _NO_BIAS if bias is None else bias.float().contiguous().numpy(), top.numpy(),
                    total.numpy(), rescale.numpy(), _bits(probs))


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
