"""Tests for gkp.grouping (TMI-GKP candidates, equal-size k-means, SR-GKP snaking) and the
vectorised t-SNE / DBSCAN grid behind the DBSCAN candidate."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.spatial.distance import squareform
from sklearn.cluster import DBSCAN
from sklearn.manifold import TSNE
from sklearn.manifold._t_sne import _gradient_descent, _joint_probabilities, _kl_divergence
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics.pairwise import pairwise_distances

import gkp.grouping as grouping
from gkp import _dbscan_grid as grid
from gkp.grouping import (
    CandidateFailed,
    dbscan_candidate,
    equal_size_kmeans,
    filter_roughness,
    kernel_roughness,
    kpca_candidate,
    magnitude_snake,
    smoothness_snake,
    snake_labels,
    spectral_candidate,
    tmi_candidates,
)

METHODS = ("exact", "heuristic")


def assert_equal_groups(labels: np.ndarray, n_groups: int) -> None:
    labels = np.asarray(labels)
    assert labels.dtype.kind == "i"
    assert labels.min() >= 0 and labels.max() < n_groups
    assert np.all(np.bincount(labels, minlength=n_groups) == len(labels) // n_groups)


def awkward_inputs() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(0)
    ties = rng.integers(0, 2, size=(24, 3)).astype(float)  # many exactly tied distances
    dup = np.repeat(rng.normal(size=(3, 5)), [10, 1, 1], axis=0)  # a 10-fold duplicate
    return [
        ("ties", ties, 4),
        ("duplicates", dup, 3),
        ("identical", np.ones((16, 7)), 8),
        ("n/G=1", rng.normal(size=(8, 4)), 8),
        ("n/G=2", rng.normal(size=(16, 4)), 8),
        ("G=1", rng.normal(size=(12, 4)), 1),
    ]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", awkward_inputs(), ids=lambda c: c[0])
def test_equal_size_kmeans_awkward_inputs(case, method):
    _, X, n_groups = case
    assert_equal_groups(equal_size_kmeans(X, n_groups, method=method), n_groups)


@pytest.mark.parametrize("method", METHODS)
def test_equal_size_kmeans_recovers_separated_blobs(method):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 3)) * 20
    perm = rng.permutation(24)
    X = (np.repeat(centres, 6, axis=0) + rng.normal(size=(24, 3)) * 0.1)[perm]
    truth = np.repeat(np.arange(4), 6)[perm]
    labels = equal_size_kmeans(X, 4, method=method)
    assert_equal_groups(labels, 4)
    assert adjusted_rand_score(truth, labels) == 1.0


def test_exact_assignment_is_optimal_balanced_assignment():
    rng = np.random.default_rng(2)
    D = rng.random((6, 2))  # 6 points, 2 centres of 3
    got = grouping._assign_exact(D, 3, None)
    best = min(
        sum(D[i, 0] if i in c0 else D[i, 1] for i in range(6))
        for c0 in itertools.combinations(range(6), 3)
    )
    assert np.bincount(got).tolist() == [3, 3]
    assert D[np.arange(6), got].sum() == pytest.approx(best)


@pytest.mark.parametrize("method", METHODS)
def test_equal_size_kmeans_seed_is_reproducible(method):
    X = np.random.default_rng(3).normal(size=(32, 6))
    a = equal_size_kmeans(X, 4, seed=5, method=method)
    np.testing.assert_array_equal(a, equal_size_kmeans(X, 4, seed=5, method=method))


@pytest.mark.parametrize(
    "kwargs", [{"n_clusters": 5}, {"n_clusters": 0}, {"n_clusters": 3, "method": "greedy"}]
)
def test_equal_size_kmeans_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        equal_size_kmeans(np.zeros((12, 2)), **kwargs)


def test_candidates_reject_group_count_not_dividing():
    with pytest.raises(ValueError, match="do not divide"):
        tmi_candidates(np.ones((12, 9)), 8)


def test_kernel_roughness_by_hand():
    # [[1, 2], [3, 0]] squared is [[1, 4], [9, 0]]; in a 2x2 kernel every pair of cells is
    # neighbours: |1-4| + |1-9| + |1-0| + |4-9| + |4-0| + |9-0| = 3+8+1+5+4+9 = 30, and each
    # unordered pair is counted twice: 60.
    assert kernel_roughness(np.array([[1.0, 2.0], [3.0, 0.0]])) == pytest.approx(60.0)
    # A single 1 in the middle of a 3x3 kernel: it differs by 1 from each of its 8 neighbours
    # (8 pairs), all other pairs are 0-0; counted twice: 16.
    spike = np.zeros((3, 3))
    spike[1, 1] = -1.0  # the sign does not matter, only squares do
    assert kernel_roughness(spike) == pytest.approx(16.0)
    # A corner 1: neighbours (0,1), (1,0), (1,1): 3 pairs, counted twice: 6.
    corner = np.zeros((3, 3))
    corner[0, 0] = 1.0
    W = np.stack([np.stack([spike, corner]), np.stack([corner, corner])])  # (2, 2, 3, 3)
    np.testing.assert_allclose(kernel_roughness(W), [[16.0, 6.0], [6.0, 6.0]])
    np.testing.assert_allclose(filter_roughness(W), [22.0, 12.0])


def test_snake_labels_hand_example():
    order = np.array([5, 2, 7, 0, 1, 3, 6, 4])  # filters, smoothest first
    labels = snake_labels(order, 4)
    np.testing.assert_array_equal(labels[order], [0, 1, 2, 3, 3, 2, 1, 0])
    np.testing.assert_array_equal(
        snake_labels(np.arange(12), 3), [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0]
    )
    with pytest.raises(ValueError):
        snake_labels(np.array([0, 0, 1, 2]), 2)


def test_smoothness_snake_sorts_by_roughness():
    spike = np.zeros((3, 3))
    spike[1, 1] = 1.0
    scale = np.array([3.0, 1.0, 4.0, 0.5, 2.0, 5.0, 6.0, 0.1])  # roughness grows with scale
    W = scale[:, None, None, None] * np.broadcast_to(spike, (8, 2, 3, 3))
    # ascending roughness: filters 7, 3, 1, 4, 0, 2, 5, 6 -> labels 0, 1, 2, 3, 3, 2, 1, 0
    expected = np.empty(8, dtype=int)
    expected[[7, 3, 1, 4, 0, 2, 5, 6]] = [0, 1, 2, 3, 3, 2, 1, 0]
    np.testing.assert_array_equal(smoothness_snake(W, 4), expected)


def test_magnitude_snake_for_1x1_convs():
    sums = np.array([0.5, -2.0, 3.0, 1.0, -1.0, 2.0])
    W = np.zeros((6, 2, 1, 1))
    W[:, 0, 0, 0] = sums  # signed sum of each filter
    # descending signed sum: filters 2, 5, 3, 0, 4, 1 -> labels 0, 1, 2, 2, 1, 0
    expected = np.empty(6, dtype=int)
    expected[[2, 5, 3, 0, 4, 1]] = [0, 1, 2, 2, 1, 0]
    np.testing.assert_array_equal(magnitude_snake(W, 3), expected)
    np.testing.assert_array_equal(smoothness_snake(W, 3), expected)


def test_kpca_failure_is_reported_and_dropped(monkeypatch):
    F = np.random.default_rng(4).normal(size=(16, 18))
    bad = F.copy()
    bad[3, 2] = np.nan
    with pytest.raises(CandidateFailed) as err:
        kpca_candidate(bad, 4)
    assert err.value.name == "kpca" and "NaN" in err.value.reason

    class BrokenKernelPCA:
        def __init__(self, **_):
            pass

        def fit_transform(self, K):
            raise np.linalg.LinAlgError("eigh did not converge")

    monkeypatch.setattr(grouping, "KernelPCA", BrokenKernelPCA)
    labels, failures = tmi_candidates(F, 4)
    assert list(labels) == ["spectral", "dbscan"]
    assert "did not converge" in failures["kpca"]
    for lab in labels.values():
        assert_equal_groups(lab, 4)


def test_spectral_with_isolated_nodes():
    # Unit vectors at these angles (degrees); with k = 1 node 0's nearest is node 1, whose
    # nearest is node 2: node 0 has no mutual neighbour, and neither do 3 and 6 below.
    angles = np.radians([0, 10, 12, 40, 52, 54, 100, 112, 114, 170, 175, 200])
    F = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    info: dict = {}
    labels = spectral_candidate(F, 4, k=1, info=info)
    assert info["isolated_nodes"] >= 3
    assert_equal_groups(labels, 4)


def test_spectral_default_graph_is_complete_for_16_filters():
    emb, isolated = grouping._spectral_embedding(np.random.default_rng(5).normal(size=(16, 9)), 16)
    assert emb.shape == (16, 2) and isolated == 0


@pytest.mark.parametrize("shape", [(16, 144), (32, 288), (64, 576)])
def test_dbscan_candidate_equal_sizes(shape):
    F = np.random.default_rng(shape[0]).normal(size=shape)
    info: dict = {}
    labels = dbscan_candidate(F, 8, info=info)
    assert_equal_groups(labels, 8)
    assert info["perplexity"] == shape[0] / 8 and not info["perplexity_clamped"]
    assert info["tsne_dim"] in range(2, 8) and info["min_samples"] >= 1


def test_dbscan_candidate_clamps_perplexity():
    info: dict = {}
    labels = dbscan_candidate(np.random.default_rng(6).normal(size=(8, 9)), 1, info=info)
    assert_equal_groups(labels, 1)
    assert info["perplexity"] == 7 and info["perplexity_clamped"]


def test_tmi_candidates_are_deterministic_and_equal_size():
    F = np.random.default_rng(7).normal(size=(32, 288))
    a, fa = tmi_candidates(F, 8, seed=3)
    b, fb = tmi_candidates(F, 8, seed=3)
    assert list(a) == ["kpca", "spectral", "dbscan"] and fa == fb == {}
    for name in a:
        assert_equal_groups(a[name], 8)
        np.testing.assert_array_equal(a[name], b[name])


def test_vectorised_dbscan_matches_sklearn():
    rng = np.random.default_rng(8)
    for _ in range(8):
        n, d = int(rng.integers(6, 40)), int(rng.integers(2, 5))
        Z = rng.normal(size=(n, d)) * rng.choice([0.3, 1.0], size=(n, 1))
        eps = grid.eps_grid(Z)[1::3]  # eps ~0 is checked separately below
        for ms in (1, 2, 3, 5):
            got = grid.dbscan_all_eps(Z, eps, ms)
            for row, e in zip(got, eps, strict=True):
                # identical labels, numbering included (no renaming needed)
                np.testing.assert_array_equal(row, DBSCAN(eps=e, min_samples=ms).fit(Z).labels_)


def test_vectorised_dbscan_border_point_rule():
    # Border point x=0.7 (2 neighbours + itself < min_samples 4) touches core points of both
    # clusters; sklearn gives it the cluster started first (lowest core index), and so do we.
    a, b = [0.0, 0.05, 0.1, 0.2], [1.2, 1.3, 1.35, 1.4]
    for pts in (a + b + [0.7], b + a + [0.7]):
        Z = np.array(pts)[:, None]
        ours = grid.dbscan_all_eps(Z, np.array([0.55]), 4)[0]
        np.testing.assert_array_equal(ours, DBSCAN(eps=0.55, min_samples=4).fit(Z).labels_)
        assert ours[-1] == 0
    # eps ~0: every point is its own core cluster when min_samples = 1 (sklearn's own distance
    # code can return a tiny non-zero self-distance and call such a point noise instead).
    tiny = grid.eps_grid(np.eye(3))[:1]
    np.testing.assert_array_equal(grid.dbscan_all_eps(np.eye(3), tiny, 1)[0], [0, 1, 2])


def test_cluster_stats_counts_noise_as_a_cluster():
    k, var = grid.cluster_stats(np.array([[0, 0, 1, -1], [0, 0, 0, 0]]))
    np.testing.assert_array_equal(k, [3, 1])
    np.testing.assert_allclose(var, [np.var([2, 1, 1]), 0.0])


def test_rebalance_moves_farthest_points_splits_and_dissolves():
    Z = np.array([[0.0], [1.0], [2.5], [10.0]])
    # cluster 0 too big: its farthest point (2.5) joins the cluster with room
    out = grid.rebalance(Z, np.array([0, 0, 0, 1]), 2)
    assert out[0] == out[1] and out[2] == out[3] != out[0]
    # one cluster (all noise): split into two
    assert_equal_groups(grid.rebalance(Z, np.array([-1, -1, -1, -1]), 2), 2)
    # four clusters for two groups: dissolve the smallest
    assert_equal_groups(grid.rebalance(Z, np.array([0, 1, 2, 3]), 2), 2)


def _sk_setup(n: int, dim: int):
    X = np.random.default_rng(9).normal(size=(n, 20))
    P = _joint_probabilities(pairwise_distances(X, squared=True), 4.0, 0)
    return X, P, grid._pca_init(X, [dim], 0)[0]


def test_tsne_gradient_and_first_steps_match_sklearn():
    X, P, Y0 = _sk_setup(24, 3)
    _, g = _kl_divergence(Y0.ravel(), P, 2, 24, 3)
    np.testing.assert_allclose(
        grid.kl_gradient(Y0, squareform(P)), g.reshape(24, 3), rtol=1e-10, atol=1e-18
    )
    sk, _, _ = _gradient_descent(
        _kl_divergence,
        Y0.ravel(),
        0,
        3,
        n_iter_check=50,
        n_iter_without_progress=250,
        momentum=0.5,
        learning_rate=50.0,
        args=[P * 12.0, 2, 24, 3],
        kwargs={},
    )
    ours = grid.tsne_exact(X, [3], 4.0, 0, max_iter=3)[0]
    np.testing.assert_allclose(ours, sk.reshape(24, 3), rtol=1e-6)


def test_tsne_row_blocks_give_the_one_block_gradient(monkeypatch):
    # Large layers work through the n x n matrices in row blocks (the L2-resident path); the
    # result must be the whole-matrix gradient and objective, to rounding, whatever the block.
    rng = np.random.default_rng(11)
    X = rng.normal(size=(40, 12))
    P = squareform(_joint_probabilities(pairwise_distances(X, squared=True), 5.0, 0))
    Y, scale = rng.normal(size=(3, 40, 4)), np.array([12.0, 1.0, 12.0])
    dof = np.array([1.0, 2.0, 3.0])
    whole = grid._kl_terms(Y, P, scale, dof, np.empty((3, 40, 40)), True)
    monkeypatch.setattr(grid, "_BLOCK", 3 * 40 * 7)  # 7 rows a block, the last one 5
    blocked = grid._kl_terms(Y, P, scale, dof, np.empty((3, 40, 40)), True)
    for a, b in zip(whole, blocked, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12)
    assert not np.array_equal(whole[0], np.zeros_like(whole[0]))


def test_tsne_reaches_sklearn_quality():
    # t-SNE on a few dozen points is chaotic, so compare the objective, not the coordinates.
    X = np.random.default_rng(10).normal(size=(16, 30))
    P = squareform(_joint_probabilities(pairwise_distances(X, squared=True), 2.0, 0))
    ours, theirs = [], []
    for dim, Y in zip((2, 3, 4), grid.tsne_exact(X, [2, 3, 4], 2.0, 0), strict=True):
        sk = TSNE(n_components=dim, perplexity=2.0, method="exact", random_state=0).fit(X)
        theirs.append(sk.kl_divergence_)
        ours.append(grid.kl_divergence(Y, P))
    assert np.mean(ours) < 1.5 * np.mean(theirs)
