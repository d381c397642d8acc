"""Filter grouping for grouped kernel pruning: TMI-GKP's three candidates and SR-GKP's snaking.

Every function returns one label per filter, in ``0..G-1``, each label used exactly ``C_out/G``
times (checked on every return). Clusterings are relabelled in order of first appearance; snake
labels keep their meaning (position in the deal).

* ``equal_size_kmeans``: k-means whose every assignment step gives each cluster exactly ``n/G``
  points. The default, ``method="exact"``, is the exact balanced assignment (a min-cost matching
  of points to centres replicated ``n/G`` times, ``scipy.optimize.linear_sum_assignment``);
  ``method="heuristic"`` offers the original greedy same-size heuristic (ELKI tutorial style).
* TMI-GKP Step B candidates ``kpca_candidate``, ``spectral_candidate``, ``dbscan_candidate``
  (the fast t-SNE and DBSCAN grid live in ``gkp._dbscan_grid``), gathered by ``tmi_candidates``.
  A candidate that fails numerically raises ``CandidateFailed``; ``tmi_candidates`` records and
  drops it. BLAS is limited to one thread inside them: the matrices are tiny and thread start-up
  costs more than it saves.
* SR-GKP: ``kernel_roughness``, ``filter_roughness``, ``snake_labels``, ``smoothness_snake``,
  ``magnitude_snake``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import kmeans_plusplus
from sklearn.decomposition import KernelPCA
from sklearn.metrics.pairwise import cosine_distances, rbf_kernel
from sklearn.preprocessing import normalize
from threadpoolctl import threadpool_limits

from gkp._dbscan_grid import dbscan_partition

__all__ = [
    "CandidateFailed",
    "dbscan_candidate",
    "equal_size_kmeans",
    "filter_roughness",
    "kernel_roughness",
    "kpca_candidate",
    "magnitude_snake",
    "smoothness_snake",
    "snake_labels",
    "spectral_candidate",
    "tmi_candidates",
]

_NUMERICAL_ERRORS = (ValueError, ArithmeticError, np.linalg.LinAlgError)


class CandidateFailed(RuntimeError):
    """A clustering candidate failed numerically; carries ``.name`` and ``.reason``."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} candidate failed: {reason}")
        self.name, self.reason = name, reason


def _group_size(n: int, n_groups: int) -> int:
    """``n / n_groups``, or ValueError when the groups cannot be equal."""
    if not isinstance(n_groups, (int, np.integer)) or n_groups < 1:
        raise ValueError(f"n_clusters must be a positive integer, got {n_groups!r}")
    if n < 1 or n % n_groups:
        raise ValueError(f"{n_groups} clusters do not divide {n} points into equal groups")
    return n // int(n_groups)


def _finish(labels: np.ndarray, n_groups: int) -> np.ndarray:
    """Relabel by first appearance and check that every group has exactly n/G members."""
    labels = np.asarray(labels, dtype=np.int64)
    uniq, first = np.unique(labels, return_index=True)
    mapping = np.empty(uniq.max() - uniq.min() + 1, dtype=np.int64)
    mapping[uniq[np.argsort(first)] - uniq.min()] = np.arange(len(uniq))
    out = mapping[labels - uniq.min()]
    counts = np.bincount(out, minlength=n_groups)
    if len(counts) != n_groups or np.any(counts != len(out) // n_groups):
        raise AssertionError(f"groups are not equal-size: {counts.tolist()}")
    return out


def _sqdist(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    return ((X[:, None, :] - C[None, :, :]) ** 2).sum(axis=2)


def _means(X: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    return np.stack([X[labels == c].mean(axis=0) for c in range(k)])


def _assign_exact(D: np.ndarray, m: int, _prev: np.ndarray | None) -> np.ndarray:
    """Min-cost assignment of points to centres, each centre replicated m times."""
    _, cols = linear_sum_assignment(np.repeat(D, m, axis=1))
    return cols // m


def _assign_heuristic(D: np.ndarray, m: int, prev: np.ndarray | None) -> np.ndarray:
    """Same-size heuristic: greedy start (strongest preference first), then pairwise swaps."""
    if prev is None:
        room, labels = np.full(D.shape[1], m), np.empty(len(D), dtype=np.int64)
        for i in np.argsort(D.min(1) - D.max(1), kind="stable"):
            c = next(c for c in np.argsort(D[i], kind="stable") if room[c] > 0)
            labels[i], room[c] = c, room[c] - 1
        return labels
    return _swap_pass(D, prev)


def _swap_pass(D: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """One ELKI-style pass: points by descending gain; a point wanting cluster b swaps with a
    waiting point of b when that lowers the total cost, else it waits to leave its own cluster.
    Clusters are exactly full, so plain moves never fit and only swaps happen."""
    labels, n = prev.copy(), len(D)
    gain = D[np.arange(n), prev][:, None] - D
    waiting: list[list[int]] = [[] for _ in range(D.shape[1])]
    moved = np.zeros(n, dtype=bool)
    for i in np.argsort(-gain.max(1), kind="stable"):
        if gain[i].max() <= 0:
            break
        if moved[i]:
            continue
        a = labels[i]
        partner = next(
            (
                (b, j)
                for b in np.argsort(-gain[i], kind="stable")
                if gain[i, b] > 0
                for j in waiting[b]
                if D[i, a] + D[j, b] > D[i, b] + D[j, a] + 1e-12
            ),
            None,
        )
        if partner is None:
            waiting[a].append(i)
        else:
            b, j = partner
            labels[i], labels[j] = b, a
            moved[[i, j]] = True
            waiting[b].remove(j)
    return labels


def _lloyd(X, centres, m, max_iter, tol_abs, assign) -> tuple[np.ndarray, float]:
    labels = assign(_sqdist(X, centres), m, None)
    for _ in range(max_iter):
        new = _means(X, labels, len(centres))
        shift, centres = float(((new - centres) ** 2).sum()), new
        new_labels = assign(_sqdist(X, centres), m, labels)
        done = np.array_equal(new_labels, labels) or shift <= tol_abs
        labels = new_labels
        if done:
            break
    D = _sqdist(X, _means(X, labels, len(centres)))
    return labels, float(D[np.arange(len(X)), labels].sum())


def equal_size_kmeans(
    X: np.ndarray,
    n_clusters: int,
    *,
    seed: int = 0,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    method: str = "exact",
) -> np.ndarray:
    """Equal-size k-means: labels (n,), every cluster exactly ``n // n_clusters`` points after
    every assignment step. k-means++ starts (``n_init`` of them, lowest inertia kept); stops when
    the labels repeat or the centre shift is below ``tol`` times the mean feature variance (as
    sklearn). ``method``: ``"exact"`` (default, optimal balanced assignment) or ``"heuristic"``."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or not np.isfinite(X).all():
        raise ValueError("X must be a finite 2-D array (n_points, n_features)")
    m = _group_size(X.shape[0], n_clusters)
    assign = {"exact": _assign_exact, "heuristic": _assign_heuristic}.get(method)
    if assign is None:
        raise ValueError(f"method must be 'exact' or 'heuristic', got {method!r}")
    if n_clusters == 1:  # kmeans++ needs no run: there is one partition
        return np.zeros(X.shape[0], dtype=np.int64)
    rs, tol_abs = np.random.RandomState(seed), tol * float(np.mean(np.var(X, axis=0)))
    best: tuple[np.ndarray, float] | None = None
    for _ in range(n_init):
        centres, _ = kmeans_plusplus(X, n_clusters, random_state=rs)
        labels, inertia = _lloyd(X, centres, m, max_iter, tol_abs, assign)
        if best is None or inertia < best[1]:
            best = (labels, inertia)
    return _finish(best[0], n_clusters)


def _guarded(name: str, F: np.ndarray, n_groups: int, body: Callable) -> np.ndarray:
    """Validate, run ``body`` single-threaded, turn numerical errors into CandidateFailed."""
    F = np.asarray(F, dtype=np.float64)
    if F.ndim != 2:
        raise ValueError(f"F must be 2-D (C_out, C_in*k*k), got shape {F.shape}")
    _group_size(F.shape[0], n_groups)
    if not np.isfinite(F).all():
        raise CandidateFailed(name, "weights contain NaN or inf")
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            return _finish(body(F), n_groups)
    except _NUMERICAL_ERRORS as exc:
        raise CandidateFailed(name, f"{type(exc).__name__}: {exc}") from exc


def kpca_candidate(
    F: np.ndarray,
    n_groups: int,
    *,
    seed: int = 0,
    info: dict | None = None,
    kmeans: str = "exact",
) -> np.ndarray:
    """K-PCA candidate: kernel ``0.5·(F Fᵀ)∘² + 0.5·RBF(F, gamma=1/n_features)``, kernel PCA
    keeping every component with a non-zero eigenvalue, then equal-size k-means."""

    def body(F: np.ndarray) -> np.ndarray:
        K = 0.5 * (F @ F.T) ** 2 + 0.5 * rbf_kernel(F, gamma=1.0 / F.shape[1])
        emb = KernelPCA(kernel="precomputed", random_state=seed).fit_transform(K)
        if emb.shape[1] == 0 or not np.isfinite(emb).all():
            raise ArithmeticError(f"kernel PCA gave {emb.shape[1]} usable components")
        if info is not None:
            info["n_components"] = emb.shape[1]
        return equal_size_kmeans(emb, n_groups, seed=seed, method=kmeans)

    return _guarded("kpca", F, n_groups, body)


def _spectral_embedding(F: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Eigenvectors of the random-walk Laplacian of the mutual-kNN cosine graph; #isolated.

    Each node's neighbour set is itself plus its k nearest others (``min(k+1, n)`` in all), so
    every node keeps its self-loop and has degree >= 1: an isolated node (no mutual neighbour)
    has ``D = 1`` and a zero Laplacian row, i.e. its own zero eigenvalue; nothing divides by 0.
    ``D⁻¹(D−A)`` is similar to the symmetric ``I − D^-½ A D^-½``: we diagonalise that with
    ``eigh`` (real, stable) and map back, ``u = D^-½ v``, unit-normalised like ``np.linalg.eig``.
    """
    n = F.shape[0]
    dist = cosine_distances(normalize(F))
    np.fill_diagonal(dist, -np.inf)  # itself first, whatever the ties
    near = np.argsort(dist, axis=1, kind="stable")[:, : min(k + 1, n)]
    knn = np.zeros((n, n), dtype=bool)
    knn[np.arange(n)[:, None], near] = True
    A = (knn & knn.T).astype(np.float64)
    s = 1.0 / np.sqrt(A.sum(axis=1))
    vals, vecs = np.linalg.eigh(np.eye(n) - s[:, None] * A * s[None, :])
    u = s[:, None] * vecs
    u /= np.linalg.norm(u, axis=0)
    keep = np.argsort(np.abs(vals), kind="stable")[: max(n // 8, 1)]
    return np.real(u[:, keep]), int(np.sum(A.sum(axis=1) == 1))


def spectral_candidate(
    F: np.ndarray,
    n_groups: int,
    *,
    seed: int = 0,
    k: int = 16,
    info: dict | None = None,
    kmeans: str = "exact",
) -> np.ndarray:
    """Spectral candidate: mutual-kNN graph (k=16) on cosine distances of L2-normalised
    filters, the ``C_out // 8`` (>= 1) eigenvectors of smallest |eigenvalue| of ``D⁻¹(D−A)``,
    then equal-size k-means."""

    def body(F: np.ndarray) -> np.ndarray:
        emb, isolated = _spectral_embedding(F, k)
        if info is not None:
            info["isolated_nodes"] = isolated
        return equal_size_kmeans(emb, n_groups, seed=seed, method=kmeans)

    return _guarded("spectral", F, n_groups, body)


def dbscan_candidate(
    F: np.ndarray, n_groups: int, *, seed: int = 0, info: dict | None = None
) -> np.ndarray:
    """DBSCAN candidate: exact t-SNE (perplexity C_out/G, clamped below n; dims 2..7) of the
    normalised filters, standardised; DBSCAN grid (eps ~0, 0.05, ... to half the largest
    distance; min_samples (C_out/G)·r, r = 0.5..1.0); the trial minimising
    ``rank(|#clusters − (G+1)|) + 0.5·rank(var of sizes)`` is rebalanced into G equal groups.
    ``info`` (optional dict) receives the chosen trial and the perplexity actually used."""
    return _guarded("dbscan", F, n_groups, lambda F: dbscan_partition(F, n_groups, seed, info))


def tmi_candidates(
    F: np.ndarray,
    n_groups: int,
    *,
    seed: int = 0,
    info: dict | None = None,
    kmeans: str = "exact",
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Run K-PCA, Spectral, DBSCAN (in that order): (labels of those that worked, reason for
    each dropped one). ``info`` (optional dict) gets one diagnostics dict per candidate.
    ``kmeans`` is the equal-size k-means of K-PCA and Spectral ("exact" or "heuristic")."""
    labels: dict[str, np.ndarray] = {}
    failures: dict[str, str] = {}
    for name, fn, kw in (
        ("kpca", kpca_candidate, {"kmeans": kmeans}),
        ("spectral", spectral_candidate, {"kmeans": kmeans}),
        ("dbscan", dbscan_candidate, {}),
    ):
        details: dict = {}
        try:
            labels[name] = fn(F, n_groups, seed=seed, info=details, **kw)
        except CandidateFailed as exc:
            failures[name] = exc.reason
        if info is not None:
            info[name] = details
    return labels, failures


def kernel_roughness(W: np.ndarray) -> np.ndarray:
    """Roughness of k×k kernels, shape (..., k, k) -> (...): over every cell and each of its 8
    neighbours, the sum of ``|a² − b²|`` (so every unordered neighbour pair counts twice)."""
    S = np.asarray(W, dtype=np.float64) ** 2
    # horizontal, vertical, diagonal and anti-diagonal neighbour pairs, each counted once here
    pairs = (
        S[..., :, 1:] - S[..., :, :-1],
        S[..., 1:, :] - S[..., :-1, :],
        S[..., 1:, 1:] - S[..., :-1, :-1],
        S[..., 1:, :-1] - S[..., :-1, 1:],
    )
    return 2.0 * sum(np.abs(p).sum(axis=(-2, -1)) for p in pairs)


def filter_roughness(W: np.ndarray) -> np.ndarray:
    """Roughness of each filter of a conv weight (C_out, C_in, k, k): sum over its kernels."""
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 4:
        raise ValueError(f"expected a conv weight (C_out, C_in, k, k), got shape {W.shape}")
    return kernel_roughness(W).sum(axis=1)


def snake_labels(order: np.ndarray, n_groups: int) -> np.ndarray:
    """Boustrophedon deal: the filter at position i of ``order`` gets 0,1..G-1,G-1..0,0,1..;
    equal groups, each holding an even spread of the ranking."""
    order = np.asarray(order, dtype=np.int64)
    n = len(order)
    _group_size(n, n_groups)
    if not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError("order must be a permutation of 0..n-1")
    r = np.arange(n) % (2 * n_groups)
    labels = np.empty(n, dtype=np.int64)
    labels[order] = np.where(r < n_groups, r, 2 * n_groups - 1 - r)
    if np.any(np.bincount(labels, minlength=n_groups) != n // n_groups):
        raise AssertionError("snake deal produced unequal groups")
    return labels


def magnitude_snake(W: np.ndarray, n_groups: int) -> np.ndarray:
    """Snake over filters sorted by the signed sum of their weights, descending (stable);
    SR-GKP's rule for 1×1 convs, where a kernel has no neighbours to be rough against."""
    W = np.asarray(W, dtype=np.float64)
    return snake_labels(np.argsort(-W.reshape(W.shape[0], -1).sum(1), kind="stable"), n_groups)


def smoothness_snake(W: np.ndarray, n_groups: int) -> np.ndarray:
    """SR-GKP grouping: snake over filters by ascending roughness (stable); 1×1 convs use
    ``magnitude_snake``."""
    W = np.asarray(W, dtype=np.float64)
    if W.ndim == 4 and W.shape[-2:] == (1, 1):
        return magnitude_snake(W, n_groups)
    return snake_labels(np.argsort(filter_roughness(W), kind="stable"), n_groups)
