"""Per-pixel loops that numpy can only run as many passes over large temporaries, compiled with Numba.

Each kernel is plain Python over arrays, readable and runnable as it is; :func:`compiled` gives its Numba build
(nopython, releasing the GIL, so row bands run on several threads at once), made on first use: importing this
module does not import Numba. Without fast-math, Numba rounds every float32 operation as numpy does and fuses no
multiply-add, so a kernel's result is the numpy expression's, bit for bit.
"""

from __future__ import annotations

from functools import cache
from typing import Callable

import numpy as np


@cache
def compiled(kernel: Callable) -> Callable:
    """``kernel``'s Numba build; it compiles for the argument types of its first call."""
    import numba

    return numba.njit(nogil=True)(kernel)


def blend_unsure_cells(values, row, sure, first_row, rows_per, r1, rw0, rw1, first_col, cols_per, c1, cw0, cw1,
                       y0, y1, out):
    """Bilinear blends of class scores, arg-maxed, for the output pixels of unsure cells in rows ``y0:y1``.

    A cell (i, j) of the (h, w) source grid covers the output rows whose first source row is i (``first_row[i]``,
    ``rows_per[i]`` of them) and the columns whose first source column is j; ``sure[i, j]`` False marks it for
    blending. Per output row y: second source row ``r1[y]``, weights ``rw0[y]`` and ``rw1[y]``, float32 (likewise
    per column). ``values`` holds (P, C) float32 scores, the row of source pixel k being ``row[k]``. Each pixel's
    scores are blended corner by corner, top-left, top-right, bottom-left, bottom-right, each product rounded to
    float32 and added in that order, as the numpy expression ``v00 * (wr0 * wc0) + v01 * (wr0 * wc1) + ...`` does,
    and the first class with the highest blend is written to ``out[y - y0, x]``."""
    h, w = sure.shape
    classes = values.shape[1]
    for i in range(h):
        top_row, end_row = max(first_row[i], y0), min(first_row[i] + rows_per[i], y1)
        if top_row >= end_row:
            continue
        for j in range(w):
            if sure[i, j]:
                continue
            for y in range(top_row, end_row):
                above, below = i * w, r1[y] * w
                for x in range(first_col[j], first_col[j] + cols_per[j]):
                    p00, p01 = row[above + j], row[above + c1[x]]
                    p10, p11 = row[below + j], row[below + c1[x]]
                    w00, w01 = rw0[y] * cw0[x], rw0[y] * cw1[x]
                    w10, w11 = rw1[y] * cw0[x], rw1[y] * cw1[x]
                    best, label = values[p00, 0] * w00, 0
                    best += values[p01, 0] * w01
                    best += values[p10, 0] * w10
                    best += values[p11, 0] * w11
                    for k in range(1, classes):
                        score = values[p00, k] * w00
                        score += values[p01, k] * w01
                        score += values[p10, k] * w10
                        score += values[p11, k] * w11
                        if score > best:
                            best, label = score, k
                    out[y - y0, x] = label


def top_class(scores, top, lead):
    """Per pixel of (C, h, w) finite float ``scores``: the first class with the highest score, as an arg-max
    picks it, into ``top``, and its lead over the next best score into ``lead`` (+inf with one class), computed
    as the numpy passes ``second = max(second, min(best, s)); best = max(best, s)`` over the classes do. A row
    at a time, class by class, so the inner loop runs along contiguous scores."""
    classes, h, w = scores.shape
    best, second = np.empty(w, scores.dtype), np.empty(w, scores.dtype)
    for i in range(h):
        label = top[i]
        for j in range(w):
            best[j], second[j], label[j] = scores[0, i, j], -np.inf, 0
        for k in range(1, classes):
            row = scores[k, i]
            for j in range(w):
                score = row[j]
                second[j] = max(second[j], min(best[j], score))
                if score > best[j]:
                    best[j], label[j] = score, k
        for j in range(w):
            lead[i, j] = best[j] - second[j]


def sure_cells(top, lead, threshold, sure):
    """``sure[i, j]``: the cell from source pixel (i, j) to its lower, right and lower-right neighbours (the last
    row and column repeated) has one top class, and each of its four pixels leads by more than ``threshold``."""
    h, w = top.shape
    for i in range(h):
        below = min(i + 1, h - 1)
        for j in range(w):
            right = min(j + 1, w - 1)
            label = top[i, j]
            sure[i, j] = (
                top[below, j] == label and top[i, right] == label and top[below, right] == label
                and min(min(lead[i, j], lead[below, j]), min(lead[i, right], lead[below, right])) > threshold
            )
