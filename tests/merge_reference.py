"""Plain, element-by-element reference implementations of the merge methods (test oracles).

Written from the spec (../shared/specs/MERGE_ALGORITHMS.md) with Python loops over entries,
sharing no code with mergehub.merge, so a bug in the vectorized methods cannot hide here too.
"""

from __future__ import annotations


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


def trim(tau: list[float], density: float) -> list[float]:
    """Keep entries whose |value| >= the k-th largest |value|, k = max(1, int(density * n))."""
    if density >= 1:
        return list(tau)
    k = max(1, int(density * len(tau)))
    threshold = sorted((abs(v) for v in tau), reverse=True)[k - 1]
    return [v if abs(v) >= threshold else 0.0 for v in tau]


def ties(base: list[float], taus: list[list[float]], weights: list[float], densities: list[float],
         lam: float = 1.0, normalize: bool = True, elect: str = "sum") -> list[float]:
    trimmed = [trim(t, d) for t, d in zip(taus, densities)]
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
