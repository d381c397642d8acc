"""Fast pieces of TMI-GKP's DBSCAN candidate: exact t-SNE, a DBSCAN grid for all eps at once,
and the rebalancing into equal groups.

Why this module exists: the original ran ``sklearn.manifold.TSNE(method="exact")`` six times and
``sklearn.cluster.DBSCAN`` thousands of times per layer (about 2.5 h for ResNet-56). Both are
replaced by vectorised equivalents of the *same* algorithms with the *same* parameters:

* ``tsne_exact`` is sklearn's exact t-SNE (same P matrix via sklearn's own perplexity search, same
  PCA initialisation and seed, same two-phase gradient descent: 250 iterations with early
  exaggeration 12 and momentum 0.5, then momentum 0.8 up to 1000 iterations, gains, learning rate
  "auto", degrees of freedom ``max(dim - 1, 1)``, the same stopping checks every 50 iterations).
  Only the arithmetic is vectorised (the gradient over L2-sized blocks of rows of the n x n
  matrices, all rows at once up to 104 filters, instead of sklearn's per-row loop) and kept in
  float64 (sklearn stores the embedding in float32). t-SNE on a few dozen points is
  chaotic, so the result matches sklearn's to rounding only for the first iterations; the tests
  check the gradient against sklearn's and the quality of the final embedding.
* ``dbscan_all_eps`` gives, for one ``min_samples``, exactly ``sklearn.cluster.DBSCAN`` labels for
  every eps of a grid at once: point i is core iff its core distance (distance to its
  ``min_samples``-th nearest point, itself included) is <= eps; two core points share a cluster
  iff the minimax path distance between them under the mutual-reachability weights
  ``max(core_i, core_j, d_ij)`` is <= eps (single-linkage cophenetic distance). Border points:
  sklearn numbers clusters in the order of their lowest-index core point and a border point
  takes the first cluster (by that order) that has a core point within eps of it; we reproduce
  that rule, so the labels are identical, numbering included (tested against sklearn). Two
  rounding-level differences remain: a distance lying exactly on a grid value may compare
  differently from sklearn's own distance code, and at eps ~0 we take a point's distance to
  itself as exactly 0 (sklearn's brute-force distances can give ~1e-8 and call the point noise).

The whole grid is evaluated (the original also stopped some eps sweeps early; METHODS.md does not
ask for that shortcut, and it is not needed for speed here).
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import cophenet, linkage
from scipy.spatial.distance import pdist, squareform
from scipy.stats import rankdata
from sklearn.decomposition import PCA
from sklearn.manifold._t_sne import _joint_probabilities  # sklearn's exact perplexity search
from sklearn.metrics.pairwise import pairwise_distances
from sklearn.preprocessing import StandardScaler, normalize

_EPS = np.finfo(np.double).eps
_EXAGGERATION = 12.0
_EXPLORATION_ITERS = 250
_MAX_ITER = 1000
_CHECK_EVERY = 50
TSNE_DIMS = (2, 3, 4, 5, 6, 7)
RATIO_TENTHS = (5, 6, 7, 8, 9, 10)  # min_samples = ceil((C_out/G) * r), r = 0.5 .. 1.0


_BLOCK = 1 << 16  # floats per (batch, rows, n) block of the n x n matrices: 512 KB, L2-resident


def _weight_rows(Y: np.ndarray, sq: np.ndarray, dof: np.ndarray, r0: int, out: np.ndarray) -> None:
    """Rows ``[r0, r0 + k)`` of every batch entry's Student-t weights, zero diagonal, into ``out``.

    ``w = (1 + d²/dof)^(-(dof+1)/2)`` for ``Y`` (batch, n, dim) with squared norms ``sq``; ``out``
    is (batch, k, n). After the product every step works in place on that cache-sized block,
    and the power is built from multiplications and one square root (``np.power`` with a
    fractional exponent is much slower).
    """
    k = out.shape[1]
    x = np.matmul(Y[:, r0 : r0 + k], Y.transpose(0, 2, 1))
    x *= -2.0
    x += sq[:, r0 : r0 + k, None]
    x += sq[:, None, :]
    np.maximum(x, 0.0, out=x)
    x /= dof[:, None, None]
    x += 1.0
    np.reciprocal(x, out=x)  # x = 1 / (1 + d²/dof)
    for b, twice_a in enumerate((dof + 1.0).astype(int)):
        out[b] = x[b]
        for _ in range(twice_a // 2 - 1):
            out[b] *= x[b]
        if twice_a % 2:
            out[b] *= np.sqrt(x[b])
    i = np.arange(k)
    out[:, i, r0 + i] = 0.0


def _kl_terms(
    Y: np.ndarray, P: np.ndarray, scale: np.ndarray, dof: np.ndarray, w: np.ndarray, want_kl: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The exact t-SNE gradient of each batch entry and, if ``want_kl``, its KL divergence.

    ``Y`` is (batch, n, dim); the joint probabilities are ``P * scale[b]`` (early exaggeration
    per entry); ``w`` is a (batch, n, n) workspace. The n x n matrices are worked through in
    blocks of rows that stay in the L2 cache: one pass gives the weights and their sum, a second
    the gradient ``c * sum_j (p_ij - q_ij) w_ij (y_i - y_j)`` with ``q = max(w / sum(w), eps)``.
    """
    B, n, _ = Y.shape
    rows = max(1, min(n, _BLOCK // (B * n)))
    sq = np.einsum("bij,bij->bi", Y, Y)
    total = np.zeros(B)
    for r0 in range(0, n, rows):
        blk = w[:, r0 : r0 + rows]
        _weight_rows(Y, sq, dof, r0, blk)
        total += blk.sum(axis=(1, 2))
    pq_sum, pq_y = np.empty((B, n)), np.empty_like(Y)
    kl = np.zeros(B) if want_kl else None
    for r0 in range(0, n, rows):
        blk = w[:, r0 : r0 + rows]
        q = blk / total[:, None, None]
        np.maximum(q, _EPS, out=q)
        pq = P[None, r0 : r0 + rows] * scale[:, None, None]
        if kl is not None:
            kl += np.sum(pq * np.log(np.maximum(pq, _EPS) / q), axis=(1, 2))
        pq -= q
        pq *= blk
        pq_sum[:, r0 : r0 + rows] = pq.sum(2)
        np.matmul(pq, Y, out=pq_y[:, r0 : r0 + rows])
    c = (2.0 * (dof + 1.0) / dof)[:, None, None]
    return c * (pq_sum[:, :, None] * Y - pq_y), kl


def kl_gradient(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Exact t-SNE gradient for one embedding ``Y`` (n, dim) and the full joint matrix ``P``."""
    dof = np.array([max(Y.shape[1] - 1, 1)], dtype=float)
    return _kl_terms(Y[None], P, np.ones(1), dof, np.empty((1,) + P.shape), False)[0][0]


def kl_divergence(Y: np.ndarray, P: np.ndarray) -> float:
    """The exact t-SNE objective ``KL(P || Q)`` of one embedding ``Y`` (n, dim)."""
    dof = np.array([max(Y.shape[1] - 1, 1)], dtype=float)
    return float(_kl_terms(Y[None], P, np.ones(1), dof, np.empty((1,) + P.shape), True)[1][0])


def _pca_init(X: np.ndarray, dims: list[int], seed: int) -> np.ndarray:
    """sklearn's ``init="pca"``: PCA scores scaled so PC1 has std 1e-4, zero-padded to max(dims)."""
    Y = np.zeros((len(dims), X.shape[0], max(dims)))
    for b, d in enumerate(dims):
        pcs = PCA(n_components=d, random_state=np.random.RandomState(seed)).fit_transform(X)
        sd = float(np.std(pcs[:, 0]))
        if not np.isfinite(sd) or sd <= 0.0:
            raise FloatingPointError("t-SNE PCA initialisation is degenerate (identical rows?)")
        Y[b, :, :d] = pcs / sd * 1e-4
    return Y


def tsne_exact(
    X: np.ndarray, dims: list[int], perplexity: float, seed: int, max_iter: int = _MAX_ITER
) -> list[np.ndarray]:
    """Exact t-SNE of ``X`` into each of ``dims`` (all optimised in one batched loop).

    Each batch entry follows sklearn's two phases independently (own stopping checks, own
    optimiser state); padded coordinates have zero gradient and stay exactly zero.
    """
    n, B = X.shape[0], len(dims)
    P = squareform(_joint_probabilities(pairwise_distances(X, squared=True), perplexity, 0))
    Y = _pca_init(X, dims, seed)
    dof = np.maximum(np.asarray(dims, dtype=float) - 1.0, 1.0)
    lr = max(n / _EXAGGERATION / 4.0, 50.0)
    scale = np.full(B, _EXAGGERATION)  # early exaggeration of P, per batch entry
    mom, patience = np.full(B, 0.5), np.full(B, _EXPLORATION_ITERS)
    best_err, best_it = np.full(B, np.finfo(float).max), np.zeros(B, dtype=int)
    active, phase1 = np.ones(B, dtype=bool), np.ones(B, dtype=bool)
    update, gains = np.zeros_like(Y), np.ones_like(Y)
    w = np.empty((B, n, n))
    for it in range(max_iter):
        if not active.any():
            break
        check = (it + 1) % _CHECK_EVERY == 0
        grad, err = _kl_terms(Y, P, scale, dof, w, check)
        gains = np.maximum(np.where(update * grad < 0.0, gains + 0.2, gains * 0.8), 0.01)
        grad *= gains
        update = mom[:, None, None] * update - lr * grad
        update[~active] = 0.0
        Y += update
        if not check:
            continue
        improved = err < best_err
        stale = ~improved & (it - best_it > patience)
        best_err, best_it = np.where(improved, err, best_err), np.where(improved, it, best_it)
        stop = active & (stale | (np.sqrt(np.sum(grad**2, axis=(1, 2))) <= 1e-7))
        end1 = active & phase1 & (stop | (it + 1 >= _EXPLORATION_ITERS))
        scale[end1], mom[end1], patience[end1] = 1.0, 0.8, 300  # phase 2 from it + 1, fresh state
        best_err[end1], best_it[end1] = np.finfo(float).max, it + 1
        update[end1], gains[end1] = 0.0, 1.0
        active &= ~(stop & ~phase1)
        phase1 &= ~end1
    return [Y[b, :, :d].copy() for b, d in enumerate(dims)]


def eps_grid(Z: np.ndarray, step: float = 0.05) -> np.ndarray:
    """~0, then step, 2·step, ... up to the first value at or past half the largest distance."""
    half = 0.5 * float(pdist(Z).max()) if len(Z) > 1 else 0.0
    k = np.arange(1, int(np.floor(half / step)) + 2)
    return np.concatenate([[np.finfo(float).tiny], k * step])


def dbscan_all_eps(Z: np.ndarray, eps: np.ndarray, min_samples: int) -> np.ndarray:
    """sklearn-identical DBSCAN labels (``-1`` noise) for every eps: array (len(eps), n)."""
    n = Z.shape[0]
    if min_samples > n:
        return np.full((len(eps), n), -1)
    D = squareform(pdist(Z))
    core_dist = np.sort(D, axis=1)[:, min_samples - 1]
    M = np.maximum(D, np.maximum.outer(core_dist, core_dist))
    H = squareform(cophenet(linkage(squareform(M, checks=False), method="single")))
    np.fill_diagonal(H, core_dist)
    e = np.asarray(eps, dtype=float)[:, None, None]
    rep = np.argmax(H[None] <= e, axis=2)  # lowest core index of each core point's cluster
    adj = (D[None] <= e) & (core_dist[None, None, :] <= e)  # j is a core point within eps of i
    lab = np.where(adj, rep[:, None, :], n).min(axis=2)  # n = noise
    present = np.zeros((len(eps), n + 1), dtype=bool)
    np.put_along_axis(present, lab, True, axis=1)
    new_id = np.cumsum(present[:, :n], axis=1) - 1
    out = np.take_along_axis(np.concatenate([new_id, np.full((len(eps), 1), -1)], 1), lab, 1)
    return out


def cluster_stats(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of labels: number of clusters (noise counts as one) and population variance of
    the cluster sizes, computed exactly from integers so equal variances tie exactly."""
    t, n = labels.shape
    idx = labels + 1 + (n + 1) * np.arange(t)[:, None]
    counts = np.bincount(idx.ravel(), minlength=t * (n + 1)).reshape(t, n + 1)
    k = (counts > 0).sum(1)
    sumsq = (counts.astype(np.int64) ** 2).sum(1)
    return k, (k * sumsq - n * n) / (k * k)


def _split(Z: np.ndarray, clusters: list[np.ndarray], m: int) -> None:
    """Split the largest cluster: the point farthest from its centroid and its m-1 nearest."""
    big = int(np.argmax([len(c) for c in clusters]))
    pts = clusters[big]
    far = pts[np.argmax(np.linalg.norm(Z[pts] - Z[pts].mean(0), axis=1))]
    order = pts[np.argsort(np.linalg.norm(Z[pts] - Z[far], axis=1), kind="stable")]
    clusters[big] = np.sort(order[m:])
    clusters.append(np.sort(order[:m]))


def rebalance(Z: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """Turn a DBSCAN labelling (noise = one more cluster) into n_groups groups of n/n_groups.

    Too few clusters: split the largest (``_split``) until there are n_groups. Too many: dissolve
    the smallest (ties: noise first, then lower label). Then every point of a dissolved cluster
    and the points farthest from their centroid in an oversized cluster are moved, farthest
    first, to the nearest centroid (of the kept points) that still has room.
    """
    n, m = Z.shape[0], Z.shape[0] // n_groups
    ids = np.unique(labels)  # noise (-1) sorts first
    clusters = [np.flatnonzero(labels == c) for c in ids]
    while len(clusters) < n_groups:
        _split(Z, clusters, m)
    by_size = sorted(range(len(clusters)), key=lambda c: (len(clusters[c]), c))
    drop = set(by_size[: len(clusters) - n_groups])
    pool: list[tuple[float, int]] = []
    kept = []
    for c, pts in enumerate(clusters):
        dist = np.linalg.norm(Z[pts] - Z[pts].mean(0), axis=1)
        order = np.argsort(dist, kind="stable")
        n_stay = 0 if c in drop else m
        pool += [(-dist[i], int(pts[i])) for i in order[n_stay:]]
        if c not in drop:
            kept.append(np.sort(pts[order[:n_stay]]))
    centroids = np.stack([Z[p].mean(0) for p in kept])
    room = np.array([m - len(p) for p in kept])
    out = np.empty(n, dtype=np.int64)
    for g, p in enumerate(kept):
        out[p] = g
    for _, i in sorted(pool):
        d = np.linalg.norm(centroids - Z[i], axis=1)
        g = int(np.argmin(np.where(room > 0, d, np.inf)))
        out[i], room[g] = g, room[g] - 1
    return out


def dbscan_partition(F: np.ndarray, n_groups: int, seed: int, info: dict | None) -> np.ndarray:
    """TMI-GKP's DBSCAN candidate: t-SNE grid x DBSCAN grid, best trial, rebalanced.

    ``min_samples`` is ``ceil((n/G)·r)``, computed in integers: the original passed the float
    ``(n/G)·r`` to sklearn, whose ``count >= min_samples`` test makes that the same threshold.
    """
    n = F.shape[0]
    m = n // n_groups
    if n < 2:
        raise ValueError("t-SNE needs at least two filters")
    perplexity = float(min(m, n - 1))  # sklearn requires perplexity < n_samples
    embeddings = tsne_exact(normalize(F), list(TSNE_DIMS), perplexity, seed)
    zs, blocks, meta, ks, vs = [], [], [], [], []
    for b, Y in enumerate(embeddings):
        Z = StandardScaler().fit_transform(Y)
        if not np.isfinite(Z).all():
            raise FloatingPointError("t-SNE embedding is not finite")
        eps, cache = eps_grid(Z), {}
        zs.append(Z)
        for tenths in RATIO_TENTHS:
            ms = -(-m * tenths // 10)
            if ms not in cache:
                cache[ms] = dbscan_all_eps(Z, eps, ms)
            k, v = cluster_stats(cache[ms])
            blocks.append(cache[ms])
            meta += [(b, tenths, float(e), ms) for e in eps]
            ks.append(k)
            vs.append(v)
    k, v = np.concatenate(ks), np.concatenate(vs)
    score = rankdata(np.abs(k - (n_groups + 1))) + 0.5 * rankdata(v)
    best = int(np.argmin(score))
    labels = np.concatenate(blocks)[best]
    b, tenths, eps_best, ms = meta[best]
    if info is not None:
        info.update(
            perplexity=perplexity,
            perplexity_clamped=perplexity != m,
            tsne_dim=TSNE_DIMS[b],
            eps=eps_best,
            min_samples=ms,
            min_samples_ratio=tenths / 10,
            n_trials=len(meta),
            dbscan_clusters=int(k[best]),
            dbscan_noise=int(np.sum(labels == -1)),
        )
    return rebalance(zs[b], labels, n_groups)
