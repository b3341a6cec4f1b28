"""Plain, element-by-element reference implementations of the merge methods (test oracles).

Written from the papers (formulas in docs/merging.md), mergekit's ``sparsify.py`` and the
TIES authors' code, with Python loops over entries (and numpy sorts for the trims), sharing no
code with mergehub.merge, so a bug in the vectorized methods cannot hide here too.
"""

from __future__ import annotations

import numpy as np


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def linear(thetas: list[list[float]], weights: list[float], normalize: bool = True) -> list[float]:
    total = sum(weights)
    out = []
    for i in range(len(thetas[0])):
        v = sum(w * t[i] for w, t in zip(weights, thetas))
        out.append(v / total if normalize else v)
    return out


def task_arithmetic(base: list[float], taus: list[list[float]], weights: list[float],
                    lam: float) -> list[float]:
    return [b + lam * sum(w * t[i] for w, t in zip(weights, taus)) for i, b in enumerate(base)]


def tall_consensus(base: list[float], taus: list[list[float]], mtl: list[float],
                   lambdas: list[float], k: int, lam: float) -> list[float]:
    """Consensus of TALL masks |τt| > λt·|τMTL − τt| (strict, as the TALL-masks code)."""
    out = []
    for i, b in enumerate(base):
        votes = sum(1 for t, l in zip(taus, lambdas) if abs(t[i]) > l * abs(mtl[i] - t[i]))
        out.append(b + lam * (mtl[i] if votes >= k else 0.0))
    return out


def mwa_weights(values: list[float], metric: str, p: float) -> list[float]:
    raw = [v ** (-p) if metric == "loss" else v ** p for v in values]
    return [r / sum(raw) for r in raw]


def kept_count(density: float, n: int) -> int:
    """How many of n entries a magnitude trim keeps: k = int(density·n) (mergekit's and the
    TIES code's k), but at least 1 for a positive density (where mergekit stops with an error),
    none at density <= 0, all at >= 1."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def ranked(values) -> np.ndarray:
    """Flat positions ordered by |value|, largest first, equal magnitudes by position (lowest
    first): a stable sort on −|value|. The one total order every exact trim below cuts."""
    mag = np.abs(np.asarray(values, dtype=np.float64).reshape(-1))
    return np.argsort(-mag, kind="stable")


def top_k_mask(values, k: int) -> np.ndarray:
    """Exactly the k first entries of :func:`ranked` (mergekit's argsort top-k, with its
    arbitrary order among equal magnitudes replaced by position)."""
    flat = np.asarray(values).reshape(-1)
    mask = np.zeros(flat.size, dtype=bool)
    mask[ranked(flat)[:k]] = True
    return mask


def threshold_mask(values, k: int) -> np.ndarray:
    """The old rule: every entry with |value| >= the k-th largest |value| (ties all kept)."""
    mag = np.abs(np.asarray(values, dtype=np.float64).reshape(-1))
    if k <= 0:
        return np.zeros(mag.size, dtype=bool)
    return mag >= np.sort(mag)[::-1][k - 1]


def trim(tau: list[float], density: float, ties: str = "index") -> list[float]:
    """TIES' trim of one flat task vector (or a whole flattened task vector: trim_scope
    global): ``index`` keeps exactly kept_count(density, n) entries, ``threshold`` all tied
    with the last of them."""
    k = kept_count(density, len(tau))
    mask = top_k_mask(tau, k) if ties == "index" else threshold_mask(tau, k)
    return [v if m else 0.0 for v, m in zip(tau, mask)]


def band_mask(values, density: float, gamma: float) -> np.ndarray:
    """Breadcrumbs (mergekit's magnitude_outliers): drop the n_top = int(gamma·n) largest, keep
    the next int(density·n), n_top cut down so that they fit; in :func:`ranked` order."""
    flat = np.asarray(values).reshape(-1)
    n = flat.size
    mask = np.zeros(n, dtype=bool)
    if density >= 1:
        return ~mask
    keep = max(0, int(density * n))
    top = min(int(gamma * n), n - keep)
    mask[ranked(flat)[top:top + keep]] = True
    return mask


def ties(base: list[float], taus: list[list[float]], weights: list[float], densities: list[float],
         lam: float = 1.0, normalize: bool = True, elect: str = "sum",
         ties: str = "index") -> list[float]:
    trimmed = [trim(t, d, ties) for t, d in zip(taus, densities)]
    out = []
    for i, b in enumerate(base):
        vals = [w * t[i] for w, t in zip(weights, trimmed)]
        score = sum(vals) if elect == "sum" else sum(sign(v) for v in vals)
        major = 1 if score >= 0 else -1
        agree = [(v, w) for v, w in zip(vals, weights) if sign(v) == major]
        total = sum(v for v, _ in agree)
        div = sum(w for _, w in agree) if normalize else 1.0
        out.append(b + lam * total / (div if div != 0 else 1.0))
    return out
