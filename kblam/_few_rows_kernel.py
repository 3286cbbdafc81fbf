"""The numba kernel of kblam.few_rows (imported only when numba is installed)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# fastmath without "no infinities": a masked knowledge token's logit is -inf, and the kernels below test for it.
_INF_SAFE_FASTMATH = {"nnan", "nsz", "arcp", "contract", "afn", "reassoc"}


@intrinsic
def _widen(typingctx, bits):
    """bfloat16 bits -> float32: the same bits as the float's upper half (numba has no bfloat16 type)."""

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _as_float(typingctx, bits):
    """int32 bits -> the float32 with these bits."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _bits_of(typingctx, x):
    """float32 -> int32 with the same bits."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit(nogil=True, fastmath=True, cache=True)
def rows_dot(a, x, out, bias):  # pragma: no cover - compiled; tests/test_few_rows.py compares it with torch
    """out[h, r, i] = sum over k < K of x[h, r, k] * a[h, i, k], plus bias[i] (or bias[0], or nothing).

    a (H, n, K) uint16, bfloat16 bits, C-contiguous; x (H, R, >= K) float32, C-contiguous; out (H, R, >= n)
    float32, C-contiguous, of which the first n columns are written; bias (n,), (1,) or (0,) float32.
    """
    _dot_range(a, x, out, _bias_row(bias, a.shape[1]), 0, a.shape[1])


@njit(nogil=True, fastmath=True, cache=True)
def _bias_row(bias, n):  # pragma: no cover - compiled
    """bias as n numbers: itself, or its one number (or 0) repeated."""
    if bias.shape[0] == n:
        return bias
    return np.full(n, bias[0] if bias.shape[0] else 0.0, np.float32)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_range(a, x, out, bias, lo, hi):  # pragma: no cover - compiled
    """rows_dot's columns lo..hi-1 (bias: n numbers).

    Blocks of 4 rows of a by 3 rows of x: 12 sums that the compiler keeps in vector registers, each
    element of a read once per 3 rows (3 is SmolLM2's query heads per KV head, a decoding step's rows).
    A block's 4 rows of a come one from each quarter of the range: the KB comes from memory, and 4 streams
    read it faster than one (page by page, the prefetcher stops at each page's end): 0.46 against 0.68 ms
    for one layer's keys of 10,000 triples, one thread, measured for issue 10.
    """
    heads, _, width = a.shape
    rows = x.shape[1]
    seg = (hi - lo) // 4
    for h in range(heads):
        for j in range(seg):
            i0, i1, i2, i3 = lo + j, lo + j + seg, lo + j + 2 * seg, lo + j + 3 * seg
            b0, b1, b2, b3 = bias[i0], bias[i1], bias[i2], bias[i3]
            r = 0
            while r + 3 <= rows:
                s00 = s01 = s02 = s03 = np.float32(0.0)
                s10 = s11 = s12 = s13 = np.float32(0.0)
                s20 = s21 = s22 = s23 = np.float32(0.0)
                for k in range(width):
                    w0 = _widen(a[h, i0, k])
                    w1 = _widen(a[h, i1, k])
                    w2 = _widen(a[h, i2, k])
                    w3 = _widen(a[h, i3, k])
                    q0 = x[h, r, k]
                    q1 = x[h, r + 1, k]
                    q2 = x[h, r + 2, k]
                    s00 += q0 * w0
                    s01 += q0 * w1
                    s02 += q0 * w2
                    s03 += q0 * w3
                    s10 += q1 * w0
                    s11 += q1 * w1
                    s12 += q1 * w2
                    s13 += q1 * w3
                    s20 += q2 * w0
                    s21 += q2 * w1
                    s22 += q2 * w2
                    s23 += q2 * w3
                out[h, r, i0] = s00 + b0
                out[h, r, i1] = s01 + b1
                out[h, r, i2] = s02 + b2
                out[h, r, i3] = s03 + b3
                out[h, r + 1, i0] = s10 + b0
                out[h, r + 1, i1] = s11 + b1
                out[h, r + 1, i2] = s12 + b2
                out[h, r + 1, i3] = s13 + b3
                out[h, r + 2, i0] = s20 + b0
                out[h, r + 2, i1] = s21 + b1
                out[h, r + 2, i2] = s22 + b2
                out[h, r + 2, i3] = s23 + b3
                r += 3
            while r < rows:  # the rows left over from the blocks of 3
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for k in range(width):
                    q = x[h, r, k]
                    s0 += q * _widen(a[h, i0, k])
                    s1 += q * _widen(a[h, i1, k])
                    s2 += q * _widen(a[h, i2, k])
                    s3 += q * _widen(a[h, i3, k])
                out[h, r, i0] = s0 + b0
                out[h, r, i1] = s1 + b1
                out[h, r, i2] = s2 + b2
                out[h, r, i3] = s3 + b3
                r += 1
        for i in range(lo + 4 * seg, hi):  # the rows of a left over from the quarters
            for r in range(rows):
                s = np.float32(0.0)
                for k in range(width):
                    s += x[h, r, k] * _widen(a[h, i, k])
                out[h, r, i] = s + bias[i]


@njit(nogil=True, fastmath=True, cache=True)
def rows_mix(v, p, out):  # pragma: no cover - compiled; tests/test_few_rows.py compares it with torch
    """out[h, r, :] = sum over t < n of p[h, r, t] * v[h, t, :]: probabilities times values kept token by token.

    v (H, n, K) uint16, bfloat16 bits, C-contiguous; p (H, R, >= n) float32, C-contiguous; out (H, R, K)
    float32, C-contiguous.
    """
    _mix_range(v, p, out, 0, v.shape[1])


@njit(nogil=True, fastmath=True, cache=True)
def _mix_range(v, p, out, lo, hi):  # pragma: no cover - compiled
    """rows_mix over knowledge tokens lo..hi-1.

    Each value row is read once per 3 rows of p and added to their 3 accumulating rows (sums along the
    rows: no sums across a vector), 4 knowledge tokens at a time, one from each quarter of the range as in
    _dot_range: 0.39 against 0.58 ms for one layer's values of 10,000 triples read as one stream.
    """
    heads, _, width = v.shape
    rows = p.shape[1]
    seg = (hi - lo) // 4
    acc = np.zeros((3, width), np.float32)
    for h in range(heads):
        r = 0
        while r < rows:
            count = min(3, rows - r)  # the last block may hold 1 or 2 rows: the others' weights are zero
            acc[:] = 0.0
            for i in range(seg):
                t0, t1, t2, t3 = lo + i, lo + i + seg, lo + i + 2 * seg, lo + i + 3 * seg
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = c0 = c1 = c2 = c3 = np.float32(0.0)
                a0, a1, a2, a3 = p[h, r, t0], p[h, r, t1], p[h, r, t2], p[h, r, t3]
                if count > 1:
                    b0, b1, b2, b3 = p[h, r + 1, t0], p[h, r + 1, t1], p[h, r + 1, t2], p[h, r + 1, t3]
                if count > 2:
                    c0, c1, c2, c3 = p[h, r + 2, t0], p[h, r + 2, t1], p[h, r + 2, t2], p[h, r + 2, t3]
                for k in range(width):
                    w0 = _widen(v[h, t0, k])
                    w1 = _widen(v[h, t1, k])
                    w2 = _widen(v[h, t2, k])
                    w3 = _widen(v[h, t3, k])
                    acc[0, k] += a0 * w0 + a1 * w1 + a2 * w2 + a3 * w3
                    acc[1, k] += b0 * w0 + b1 * w1 + b2 * w2 + b3 * w3
                    acc[2, k] += c0 * w0 + c1 * w1 + c2 * w2 + c3 * w3
            for t in range(lo + 4 * seg, hi):  # the tokens left over from the quarters
                for j in range(count):
                    weight = p[h, r + j, t]
                    for k in range(width):
                        acc[j, k] += weight * _widen(v[h, t, k])
            for j in range(count):
                for k in range(width):
                    out[h, r + j, k] = acc[j, k]
            r += 3


@njit(nogil=True, fastmath=True, cache=True)
def shifted_exp2(scores, bias, which, shift, out):  # pragma: no cover - compiled; tests/test_few_rows.py checks it
    """out[h, r, t] = 2 ** (scores[h, r, t] + bias[which[r], t] - shift[h, r]), 0 below 2 ** -126.

    scores (H, R, n) uint16, bfloat16 bits; bias (B, n), which (R,) int32, shift (H, R), out (H, R, n) float32,
    all C-contiguous. One pass where torch makes four (widen, add, subtract, exp2), each through memory: the
    probabilities of the rows kblam.attention records. 2 ** x = 2 ** i * 2 ** f, i the integer nearest x
    (written into a float's exponent), 2 ** f = exp(f ln 2) by its Taylor series to f ** 6 (|f| <= 1/2:
    relative error about 1e-7, torch's exp2's order).
    """
    heads, rows, n = scores.shape
    for h in range(heads):
        for r in range(rows):
            b = which[r]
            z = shift[h, r]
            for t in range(n):
                out[h, r, t] = _pow2(_widen(scores[h, r, t]) + bias[b, t] - z)


@njit(nogil=True, fastmath=_INF_SAFE_FASTMATH, cache=True)
def _pow2(x):  # pragma: no cover - compiled
    """2 ** x for a float32 x <= about 0, 0 below 2 ** -126 (see shifted_exp2)."""
    i = np.floor(x + np.float32(0.5))
    f = x - i
    p = np.float32(1.540353039338e-4)
    p = p * f + np.float32(1.333355814643e-3)
    p = p * f + np.float32(9.618129107628e-3)
    p = p * f + np.float32(5.550410866482e-2)
    p = p * f + np.float32(2.402265069591e-1)
    p = p * f + np.float32(6.931471805599e-1)
    p = p * f + np.float32(1.0)
    e = np.int32(max(i, np.float32(-126.0)))  # clamped: a padded token's -inf gives a valid exponent
    return p * _as_float(np.int32((e + 127) << 23)) if x >= np.float32(-126.0) else np.float32(0.0)


_LOG2E = np.float32(1.4426950408889634)


@njit(nogil=True, fastmath=_INF_SAFE_FASTMATH, cache=True)
def rows_attend(keys, values, bias, q, qt, tk, tv, buf, out, probs):  # pragma: no cover - compiled; tests compare
    """A one-question decoding step's joint softmax over [KB | text] and both mixes, in one call.

    keys, values (H, n, K) uint16, bfloat16 bits, token by token; bias (n,), (1,) or (0,) float32; q (H, R, K)
    float32, the KB query rows (scaled); qt (H, R, K) float32, the text query rows (scaled); tk, tv (H, L, K)
    float32, the text's keys and values; buf (H, R, >= n) float32, scratch, left holding the KB's
    probabilities (normalised jointly with the text's) when `probs`; out (H, R, K) float32.
    """
    n = keys.shape[1]
    tops, sums, mixes, q2, full = _attend_parts(1, q, bias, n)
    _attend_range(keys, values, full, q2, buf, tops[0], sums[0], mixes[0], 0, n)
    _join(tops, sums, mixes, n, qt, tk, tv, buf, out, probs)


@njit(nogil=True, fastmath=_INF_SAFE_FASTMATH, cache=True, parallel=True)
def rows_attend_halves(keys, values, bias, q, qt, tk, tv, buf, out, probs):  # pragma: no cover - compiled
    """rows_attend on two threads, each the knowledge tokens of one half of the KB (its logits, their
    exponentials, their mix), joined with the text on the calling thread. The caller sets numba's threads to 2
    (kblam.few_rows): numba's thread count set in here stops it from caching the machine code."""
    n = keys.shape[1]
    tops, sums, mixes, q2, full = _attend_parts(2, q, bias, n)
    for half in prange(2):
        _attend_range(keys, values, full, q2, buf, tops[half], sums[half], mixes[half], n * half // 2,
                      n * (half + 1) // 2)
    _join(tops, sums, mixes, n, qt, tk, tv, buf, out, probs)


@njit(nogil=True, fastmath=_INF_SAFE_FASTMATH, cache=True)
def _attend_parts(parts, q, bias, n):  # pragma: no cover - compiled
    """Each part's row maxima, sums and mixes (to fill), and the query rows and bias in base 2."""
    heads, rows, width = q.shape
    tops = np.empty((parts, heads, rows), np.float32)
    sums = np.empty((parts, heads, rows), np.float32)
    mixes = np.empty((parts, heads, rows, width), np.float32)
    return tops, sums, mixes, q * _LOG2E, _bias_row(bias, n) * _LOG2E


@njit(nogil=True, fastmath=_INF_SAFE_FASTMATH, cache=True)
def _attend_range(keys, values, bias, q, buf, top, total, mix, lo, hi):  # pragma: no cover - compiled
    """Knowledge tokens lo..hi-1: their logits in base 2 into buf, each row's largest (top), 2 ** (logit - top)
    in place and their sum (total), and the values' mix with these weights (mix)."""
    _dot_range(keys, q, buf, bias, lo, hi)
    heads, rows = q.shape[0], q.shape[1]
    for h in range(heads):
        for r in range(rows):
            row = buf[h, r, lo:hi]  # a row's view: the loops over it are vectorised, buf[h, r, t]'s were not
            m = _row_max(row)
            s = np.float32(0.0)
            if m == -np.inf:  # every token of the range masked: no weight (and no inf - inf)
                row[:] = 0.0
                m = np.float32(0.0)
            else:
                for t in range(row.shape[0]):
                    e = _pow2(row[t] - m)
                    row[t] = e
                    s += e
            top[h, r] = m
            total[h, r] = s
    _mix_range(values, buf, mix, lo, hi)


@njit(nogil=True, fastmath=_INF_SAFE_FASTMATH, cache=True)
def _row_max(row):  # pragma: no cover - compiled
    """The largest of row's numbers (-inf for none): 16 running maxima, which the compiler keeps in a vector
    register (one running maximum is a chain of comparisons, 5 times slower)."""
    n = row.shape[0]
    tops = np.full(16, -np.inf, np.float32)
    t = 0
    while t + 16 <= n:
        for j in range(16):
            x = row[t + j]
            tops[j] = x if x > tops[j] else tops[j]
        t += 16
    top = np.float32(-np.inf)
    for j in range(16):
        top = tops[j] if tops[j] > top else top
    for j in range(t, n):
        top = row[j] if row[j] > top else top
    return top


@njit(nogil=True, fastmath=_INF_SAFE_FASTMATH, cache=True)
def _join(tops, sums, mixes, n, qt, tk, tv, buf, out, probs):  # pragma: no cover - compiled
    """The KB's parts (tops, sums, mixes: one per range of n // parts tokens) joined with the text's
    attention: out = their weighted mixes / the joint sum; buf's weights normalised too when `probs`."""
    parts, heads, rows = tops.shape
    length, width = tk.shape[1], tk.shape[2]
    logits = np.empty(length, np.float32)
    scale = np.empty(parts, np.float32)
    for h in range(heads):
        for r in range(rows):
            m = -np.inf
            for p in range(parts):
                if sums[p, h, r] > 0:
                    m = max(m, tops[p, h, r])
            for j in range(length):
                x = np.float32(0.0)
                for k in range(width):
                    x += qt[h, r, k] * tk[h, j, k]
                logits[j] = x * _LOG2E
                m = max(m, logits[j])
            z = np.float32(0.0)
            for p in range(parts):
                scale[p] = _pow2(tops[p, h, r] - m) if sums[p, h, r] > 0 else np.float32(0.0)
                z += scale[p] * sums[p, h, r]
            for j in range(length):
                logits[j] = _pow2(logits[j] - m)
                z += logits[j]
            for k in range(width):
                x = np.float32(0.0)
                for p in range(parts):
                    x += scale[p] * mixes[p, h, r, k]
                for j in range(length):
                    x += logits[j] * tv[h, j, k]
                out[h, r, k] = x / z
            if probs:
                for p in range(parts):
                    row = buf[h, r, n * p // parts:n * (p + 1) // parts]
                    row *= scale[p] / z


_LEAST = np.float32(-3.4028234663852886e38)  # float32's lowest: the shift of a row that has seen only -inf


@njit(nogil=True, fastmath=_INF_SAFE_FASTMATH, cache=True)
def chunk_softmax(scores, bias, top, total, rescale, probs):  # pragma: no cover - compiled; tests compare it
    """One chunk of a prompt's KB attention, the flash-attention way, in base 2: per row r,
    l = (scores[r] + bias) * log2(e); top[r] = max(top[r], max(l)); rescale[r] = 2 ** (old top - top);
    probs[r] = 2 ** (l - top), rounded to bfloat16; total[r] = total[r] * rescale[r] + their sum (unrounded).

    scores, probs (R, n) uint16, bfloat16 bits, C-contiguous; bias (n,) float32 or (0,) for none; top,
    total, rescale (R,) float32 (top starts at -inf, total at 0). One pass to widen, bias and find the
    largest (a row of n float32 stays in the core's first cache), one to exponentiate, sum and round, where
    torch makes nine through the chunk (widen, bias, max, subtract, scale, exp2, sum, round, and a copy).
    A row that has seen no finite logit keeps top -inf, total 0, probabilities 0. Each row's largest logit is
    found among integers (_ordered): numba's float maximum stays scalar, the integer one is vectorised (0.12
    against 0.32 ms for the first pass over 216 rows of 4,096, measured for issue 10).
    """
    rows, n = scores.shape
    biased = bias.shape[0] == n
    row = np.empty(n, np.float32)
    for r in range(rows):
        line = scores[r]  # a row's view: loops over it vectorise, scores[r, t]'s do not
        k = _ORDERED_LEAST
        for t in range(n):
            x = (_widen(line[t]) + (bias[t] if biased else np.float32(0.0))) * _LOG2E
            row[t] = x
            key = _ordered(x)
            k = key if key > k else k
        old = top[r]
        m = _as_float(_flip_negative(k))  # the key back to its float (the flip is its own inverse)
        m = m if m > old else old
        safe = m if m > _LEAST else _LEAST
        out = probs[r]
        s = np.float32(0.0)
        for t in range(n):
            e = _pow2(row[t] - safe)
            s += e
            out[t] = _round_bfloat16(e)
        scale = _pow2(old - safe)
        rescale[r] = scale
        total[r] = total[r] * scale + s
        top[r] = m


@njit(nogil=True, fastmath=_INF_SAFE_FASTMATH, cache=True)
def _round_bfloat16(x):  # pragma: no cover - compiled
    """A float32 >= 0 (not NaN) to the nearest bfloat16, ties to even, as torch rounds: its bits."""
    bits = _bits_of(x)
    # int32 and uint32 throughout: numba widens a mix of int32 and int literals to int64, which stays scalar
    return np.uint16(np.uint32(bits + np.int32(0x7FFF) + ((bits >> np.int32(16)) & np.int32(1))) >> np.uint32(16))


_ORDERED_LEAST = np.int32(-2147483648)


@njit(nogil=True, fastmath=_INF_SAFE_FASTMATH, cache=True)
def _ordered(x):  # pragma: no cover - compiled
    """A float32's bits as an int32 that orders as the floats do."""
    return _flip_negative(_bits_of(x))


@njit(nogil=True, fastmath=_INF_SAFE_FASTMATH, cache=True)
def _flip_negative(bits):  # pragma: no cover - compiled
    """int32 bits with all but the sign flipped where the sign is set (negative floats order backwards)."""
    return bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF))
