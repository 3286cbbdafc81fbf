"""The numba kernel of kblam.few_rows (imported only when numba is installed)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _widen(typingctx, bits):
    """bfloat16 bits -> float32: the same bits as the float's upper half (numba has no bfloat16 type)."""

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(nogil=True, fastmath=True, cache=True)
def rows_dot(a, x, out, bias):  # pragma: no cover - compiled; tests/test_few_rows.py compares it with torch
    """out[h, r, i] = sum over k < K of x[h, r, k] * a[h, i, k], plus bias[i] (or bias[0], or nothing).

    a (H, n, K) uint16, bfloat16 bits, C-contiguous; x (H, R, >= K) float32, C-contiguous; out (H, R, >= n)
    float32, C-contiguous, of which the first n columns are written; bias (n,), (1,) or (0,) float32.
    Blocks of 4 rows of a by 3 rows of x: 12 sums that the compiler keeps in vector registers, each
    element of a read once per 3 rows (3 is SmolLM2's query heads per KV head, a decoding step's rows).
    """
    heads, n, width = a.shape
    rows = x.shape[1]
    n4 = n - n % 4
    if bias.shape[0] != n:  # one number for every column, or none
        bias = np.full(n, bias[0] if bias.shape[0] else 0.0, np.float32)
    for h in range(heads):
        for i in range(0, n4, 4):
            b0, b1, b2, b3 = bias[i], bias[i + 1], bias[i + 2], bias[i + 3]
            r = 0
            while r + 3 <= rows:
                s00 = s01 = s02 = s03 = np.float32(0.0)
                s10 = s11 = s12 = s13 = np.float32(0.0)
                s20 = s21 = s22 = s23 = np.float32(0.0)
                for k in range(width):
                    w0 = _widen(a[h, i, k])
                    w1 = _widen(a[h, i + 1, k])
                    w2 = _widen(a[h, i + 2, k])
                    w3 = _widen(a[h, i + 3, k])
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
                out[h, r, i] = s00 + b0
                out[h, r, i + 1] = s01 + b1
                out[h, r, i + 2] = s02 + b2
                out[h, r, i + 3] = s03 + b3
                out[h, r + 1, i] = s10 + b0
                out[h, r + 1, i + 1] = s11 + b1
                out[h, r + 1, i + 2] = s12 + b2
                out[h, r + 1, i + 3] = s13 + b3
                out[h, r + 2, i] = s20 + b0
                out[h, r + 2, i + 1] = s21 + b1
                out[h, r + 2, i + 2] = s22 + b2
                out[h, r + 2, i + 3] = s23 + b3
                r += 3
            while r < rows:  # the rows left over from the blocks of 3
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for k in range(width):
                    q = x[h, r, k]
                    s0 += q * _widen(a[h, i, k])
                    s1 += q * _widen(a[h, i + 1, k])
                    s2 += q * _widen(a[h, i + 2, k])
                    s3 += q * _widen(a[h, i + 3, k])
                out[h, r, i] = s0 + b0
                out[h, r, i + 1] = s1 + b1
                out[h, r, i + 2] = s2 + b2
                out[h, r, i + 3] = s3 + b3
                r += 1
        for i in range(n4, n):  # the rows of a left over from the blocks of 4
            for r in range(rows):
                s = np.float32(0.0)
                for k in range(width):
                    s += x[h, r, k] * _widen(a[h, i, k])
                out[h, r, i] = s + bias[i]
