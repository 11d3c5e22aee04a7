"""Which samples a round queries, given scores and (for the diversity samplers) embeddings.

Every sampler returns indices into the pool, the `budget` chosen, without repeats:
- `top_n`: the highest scores.
- `mixture`: top-N for part of the budget, a random draw from the rest of the pool for `random_fraction`.
- `k_nearest`: the highest-scoring samples as seeds, each with its nearest unchosen neighbours
  in the embedding (groups of `k`), so a query covers the region around an informative sample.
- `core_set`: greedy k-centre (Sener and Savarese): repeatedly the pool sample farthest from
  everything labelled or chosen so far; scores are not used.
"""

from __future__ import annotations

import numpy as np


def top_n(scores: np.ndarray, budget: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:budget]


def mixture(scores: np.ndarray, budget: int, random_fraction: float, seed: int) -> np.ndarray:
    random_count = int(round(budget * random_fraction))
    chosen = top_n(scores, budget - random_count)
    rest = np.setdiff1d(np.arange(len(scores)), chosen)
    drawn = np.random.default_rng(seed).choice(rest, size=min(random_count, len(rest)), replace=False)
    return np.concatenate([chosen, drawn])


def k_nearest(scores: np.ndarray, embeddings: np.ndarray, budget: int, k: int) -> np.ndarray:
    chosen: list[int] = []
    free = np.ones(len(scores), bool)
    for seed in np.argsort(-scores, kind="stable"):
        if len(chosen) >= budget:
            break
        if not free[seed]:
            continue
        distance = np.linalg.norm(embeddings - embeddings[seed], axis=1)
        distance[~free] = np.inf
        group = np.argsort(distance, kind="stable")[:min(k, budget - len(chosen))]
        group = group[np.isfinite(distance[group])]
        chosen.extend(int(i) for i in group)
        free[group] = False
    return np.array(chosen, dtype=int)


def core_set(embeddings: np.ndarray, labelled: np.ndarray, budget: int) -> np.ndarray:
    """`embeddings` of pool and labelled samples together; `labelled` indices into them. Returns
    indices of unlabelled ones."""
    from scipy.spatial.distance import cdist

    nearest = cdist(embeddings, embeddings[labelled]).min(1) if len(labelled) else np.full(len(embeddings), np.inf)
    nearest[labelled] = -np.inf
    chosen = []
    for _ in range(min(budget, len(embeddings) - len(labelled))):
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(embeddings - embeddings[pick], axis=1))
        nearest[chosen] = -np.inf
        nearest[labelled] = -np.inf
    return np.array(chosen, dtype=int)
