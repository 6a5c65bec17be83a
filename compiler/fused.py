"""The build's hot loops, compiled by numba: reading bf16 rows into fp32 deltas, TIES' threshold
counts, and its trim + sign election + disjoint merge + reconstruction error of a block of rows,
each one pass over the deltas.

As torch ops the same arithmetic is a dozen passes over [N, R, in] temporaries (|d|, sign(d),
four group sums, masks), and on this build's sizes memory traffic, not arithmetic, is the cost
(benchmarks/results/build_phases.json). The loops release the GIL, so the build's worker threads
run them side by side. Compiled on first use and cached on disk by numba.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

TINY = np.float32(np.finfo(np.float32).tiny)  # the smallest divisor, as methods._nonzero lifts
MAGNITUDE = 0x7FFFFFFF  # the bits of |x| in a float32's bits


@intrinsic
def _float32_of_bits(typingctx, bits):  # type: ignore[no-untyped-def]
    """The float32 whose bit pattern is `bits` (a uint32): numba has no scalar view."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(cache=True, nogil=True, boundscheck=False)
def bf16_minus(expert: np.ndarray, base: np.ndarray, out: np.ndarray, e: int) -> None:
    """out[r, e] = expert[r] - base[r] in float32, for expert [R, in] bf16 bit patterns (int16),
    base [R, in] float32 and out [R, N, in]: one pass, where converting and then subtracting in
    place are two (a bf16 is the upper half of its float32)."""
    for r in range(expert.shape[0]):
        source, b, o = expert[r], base[r], out[r, e]
        for c in range(source.shape[0]):
            bits = np.uint32(np.uint16(source[c])) << np.uint32(16)
            o[c] = _float32_of_bits(bits) - b[c]  # type: ignore[call-arg]


@njit(cache=True, nogil=True, boundscheck=False)
def high_counts(bits: np.ndarray) -> np.ndarray:
    """How many |d| patterns [out, in] have each upper 16 bits. [2^15]"""
    counts = np.zeros(1 << 15, np.int64)
    for r in range(bits.shape[0]):
        for c in range(bits.shape[1]):
            counts[(bits[r, c] & MAGNITUDE) >> 16] += 1
    return counts


@njit(cache=True, nogil=True, boundscheck=False)
def bucket_counts(stack: np.ndarray, e: int, lo: int, size: int, heavy: int) -> np.ndarray:
    """Counts of expert e's |d| patterns (stack [R, N, in]) below lo, of each of
    lo .. lo + size - 1, and above. [size + 2]

    A histogram over all values waits on its own last store, as most land in the same few bins;
    below, above and the count of `heavy` (a pattern of the bucket expected to be frequent, -1
    for none) are sums, which compile to vector code, and the rest of the bucket is counted
    one by one. Deltas of bf16 weights have a few distinct values: near the threshold, one
    pattern is almost all of the bucket (build_phases.json)."""
    counts = np.zeros(size + 2, np.int64)
    for r in range(stack.shape[0]):
        row = stack[r, e]
        below, above, same = 0, 0, 0
        for c in range(row.shape[0]):
            m = row[c] & MAGNITUDE
            below += m < lo
            above += m >= lo + size
            same += m == heavy
        counts[0] += below
        counts[size + 1] += above
        if heavy >= 0:
            counts[heavy - lo + 1] += same
        if below + above + same < row.shape[0]:
            for c in range(row.shape[0]):
                m = row[c] & MAGNITUDE
                if lo <= m < lo + size and m != heavy:
                    counts[m - lo + 1] += 1
    return counts


@njit(cache=True, nogil=True, boundscheck=False)
def nth_equal(stack: np.ndarray, e: int, pattern: int, nth: int) -> tuple[int, int, int]:
    """(row, col, 0) of the nth (from 1) of expert e's |d| (stack [R, N, in]) equal to `pattern`
    in flat order; if there are fewer, (R, 0, how many more to find after these rows)."""
    for r in range(stack.shape[0]):
        row = stack[r, e]
        count = 0
        for c in range(row.shape[0]):  # a count per row compiles to vector code, a search not
            count += (row[c] & MAGNITUDE) == pattern
        if count < nth:
            nth -= count
            continue
        for c in range(row.shape[0]):
            nth -= (row[c] & MAGNITUDE) == pattern
            if nth == 0:
                return r, c, 0
    return stack.shape[0], 0, nth


@njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc", "nsz"})
def squared_distance(a: np.ndarray, b: np.ndarray) -> np.float32:
    """||a - b||^2 of two rows, summed in any order: in order it is one add after another, each
    waiting for the last, and slower than the whole merge."""
    acc = np.float32(0)
    for c in range(a.shape[0]):
        diff = a[c] - b[c]
        acc += diff * diff
    return acc


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def ties_rows(deltas: np.ndarray, labels: np.ndarray, ge: np.ndarray, gt: np.ndarray,
              cut_row: np.ndarray, cut_col: np.ndarray, weights: np.ndarray, normalize: bool,
              lam: float, merged: np.ndarray, err_sq: np.ndarray) -> None:
    """TIES over rows: deltas [R, N, in] (raw), labels [R, N] -> merged [K, R, in], and err_sq [N]
    += ||merged[label] - raw||^2 over the rows where the expert's group has other members.

    Expert n keeps |d| > ge[n] up to and including (cut_row[n], cut_col[n]) (rows relative to
    the block) and |d| > gt[n] after it (methods.trim_top_k). The arithmetic is
    methods.sign_consensus' in float32: per group, sums of w d, w |d|, w sign(d), w |sign(d)|
    over the kept entries; the elected sign is that of the first (zero counts as +).
    """
    rows, n, inp = deltas.shape
    k = merged.shape[0]
    sums = np.empty((k, 4, inp), np.float32)  # per group: sums of w d, w |d|, w sign d, w |sign d|
    half, scale = np.float32(0.5 * lam), np.float32(lam)
    zero, one = np.float32(0), np.float32(1)
    for r in range(rows):
        sums[:] = 0
        for e in range(n):
            # 1-D rows and scalars hoisted: with them the loop below compiles to vector code
            total, magnitude, sign, weight = sums[labels[r, e]]
            row, w, ge_e, gt_e = deltas[r, e], np.float32(weights[e]), ge[e], gt[e]
            # columns before `split` keep |d| > ge, from it on |d| > gt
            split = inp if r < cut_row[e] else (cut_col[e] + 1 if r == cut_row[e] else 0)
            for c in range(inp):
                x = row[c]
                kept = x if abs(x) > (ge_e if c < split else gt_e) else zero
                s = (one if kept > 0 else zero) - (one if kept < 0 else zero)
                total[c] += w * kept
                magnitude[c] += w * abs(kept)
                sign[c] += w * s
                weight[c] += w * abs(s)
        for g in range(k):
            total, magnitude, sign, weight = sums[g]
            out = merged[g, r]
            for c in range(inp):
                elected = one if total[c] >= 0 else -one
                m = total[c] + elected * magnitude[c]  # twice the agreeing members' sum
                if normalize:
                    m = m / max(weight[c] + elected * sign[c], TINY)
                    out[c] = m * scale if lam != 1 else m
                else:
                    out[c] = m * half
        for e in range(n):
            g = labels[r, e]
            members = 0
            for f in range(n):
                members += labels[r, f] == g
            if members > 1:
                err_sq[e] += squared_distance(merged[g, r], deltas[r, e])
