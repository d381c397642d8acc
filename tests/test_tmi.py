"""Tests for gkp.tmi: ticket scores, gap statistics and the lottery vote."""

import numpy as np
import pytest

from gkp.tmi import epoch_winner, gap_stats, ticket_scores, vote

# G = 2 candidates over 4 filters.  With two groups there is one gap, so every variance is 0 and
# the epoch winner is the candidate with the smallest gap (most even split).
PARTS = {
    "kpca": np.array([0, 0, 1, 1]),
    "spectral": np.array([0, 1, 0, 1]),
    "dbscan": np.array([0, 1, 1, 0]),
}
# gaps (kpca, spectral, dbscan):  K: |9-6|=3, |5-10|=5, |3-12|=9  -> kpca
#                                 P: |5-10|=5, |9-6|=3, |3-12|=9  -> spectral
#                                 D: |3-12|=9, |5-10|=5, |9-6|=3  -> dbscan
K = [1.0, 8.0, 4.0, 2.0]
P = [1.0, 4.0, 8.0, 2.0]
D = [1.0, 2.0, 4.0, 8.0]


def test_ticket_scores_by_hand():
    final = np.array([[1.0, -2.0], [0.5, 3.0]]).reshape(2, 1, 1, 2)
    snap1 = np.array([[-1.0, 1.0], [0.0, 3.0]]).reshape(2, 1, 1, 2)
    snap2 = np.array([[2.0, -2.0], [-1.0, -1.0]]).reshape(2, 1, 1, 2)
    # filter 0, snap1: |1-1| + |2-1| = 1 (sign ignored); filter 1: |0.5-0| + |3-3| = 0.5
    # filter 0, snap2: |1-2| + |2-2| = 1;                 filter 1: |0.5-1| + |3-1| = 2.5
    scores = ticket_scores(final, [snap1, snap2])
    np.testing.assert_array_equal(scores, [[1.0, 0.5], [1.0, 2.5]])
    assert ticket_scores(final, []).shape == (0, 2)
    with pytest.raises(ValueError):
        ticket_scores(final, [snap1[:1]])


def test_gap_stats_by_hand():
    scores = np.arange(1.0, 9.0)
    labels = np.array([0, 1, 0, 2, 3, 3, 2, 1])
    # group sums: g0 = 1+3 = 4, g1 = 2+8 = 10, g2 = 4+7 = 11, g3 = 5+6 = 11
    # descending 11, 11, 10, 4 -> gaps 0, 1, 6 -> mean 7/3, variance (49+16+121)/9/3 = 62/9
    mu, var = gap_stats(scores, labels, 4)
    assert mu == pytest.approx(7 / 3)
    assert var == pytest.approx(62 / 9)
    assert gap_stats(scores, np.zeros(8, dtype=int), 1) == (0.0, 0.0)
    with pytest.raises(ValueError):
        gap_stats(scores, labels, 3)  # label 3 out of range


def test_epoch_winner_plain():
    # rank(mu) = 1, 2, 3; rank(var) = 2, 1, 3 -> 2.5, 2.0, 4.5 -> spectral
    stats = {"kpca": (1.0, 1.0), "spectral": (2.0, 0.0), "dbscan": (3.0, 2.0)}
    assert epoch_winner(stats) == "spectral"


def test_epoch_winner_tie_breaks():
    # rank(mu) = 3, 1, 2; rank(var) = 1, 2, 3 -> 2.5, 2.5, 4.0: kpca/spectral tie -> order
    stats = {"dbscan": (2.0, 9.0), "spectral": (1.0, 5.0), "kpca": (3.0, 4.0)}
    assert epoch_winner(stats) == "kpca"
    assert epoch_winner(stats, order=("spectral", "kpca", "dbscan")) == "spectral"
    # averaged ties: mu ranks 1.5, 1.5, 3; var ranks 2, 1, 3 -> 2.75, 1.75, 4.5 -> spectral
    stats = {"kpca": (1.0, 2.0), "spectral": (1.0, 1.0), "dbscan": (2.0, 3.0)}
    assert epoch_winner(stats) == "spectral"
    # everything equal -> all tie -> first in order
    stats = {"dbscan": (0.0, 0.0), "spectral": (0.0, 0.0), "kpca": (0.0, 0.0)}
    assert epoch_winner(stats) == "kpca"
    # NaN ranks last instead of winning
    stats = {"kpca": (float("nan"), float("nan")), "spectral": (5.0, 5.0)}
    assert epoch_winner(stats) == "spectral"
    with pytest.raises(ValueError):
        epoch_winner({})


def test_vote_majority():
    winner, info = vote(PARTS, np.array([K, P, K, D, K]), 2)
    assert winner == "kpca"
    assert info["winners"] == ["kpca", "spectral", "kpca", "dbscan", "kpca"]
    assert info["counts"] == {"kpca": 3, "spectral": 1, "dbscan": 1}
    assert info["longest_streak"] == {"kpca": 1, "spectral": 1, "dbscan": 1}
    assert info["tie_break"] == "none"


def test_vote_streak_tie_break():
    # kpca and spectral win 2 epochs each; spectral's wins are consecutive
    winner, info = vote(PARTS, np.array([K, P, P, K, D]), 2)
    assert winner == "spectral"
    assert info["counts"] == {"kpca": 2, "spectral": 2, "dbscan": 1}
    assert info["longest_streak"]["spectral"] == 2
    assert info["tie_break"] == "streak"


def test_vote_order_tie_break():
    winner, info = vote(PARTS, np.array([D, P, K]), 2)
    assert winner == "kpca" and info["tie_break"] == "order"
    winner, _ = vote(PARTS, np.array([D, P, K]), 2, order=("dbscan", "spectral", "kpca"))
    assert winner == "dbscan"


def test_vote_single_and_losing_candidates():
    winner, info = vote({"spectral": PARTS["spectral"]}, np.array([K, P, D]), 2)
    assert winner == "spectral" and info["counts"] == {"spectral": 3}
    assert info["tie_break"] == "none"
    winner, info = vote(PARTS, np.array([K, K]), 2)
    assert info["counts"]["dbscan"] == 0 and info["longest_streak"]["dbscan"] == 0


def test_vote_all_equal_scores_goes_to_order():
    winner, info = vote(PARTS, np.ones((4, 4)), 2)
    assert winner == "kpca" and info["winners"] == ["kpca"] * 4
    assert info["tie_break"] == "none"


def test_vote_matches_per_epoch_winner():
    rng = np.random.default_rng(0)
    scores = rng.random((6, 16))
    parts = {n: rng.permutation(np.repeat(np.arange(4), 4)) for n in ("kpca", "spectral")}
    _, info = vote(parts, scores, 4)
    for ep, w in enumerate(info["winners"]):
        stats = {n: gap_stats(scores[ep], lab, 4) for n, lab in parts.items()}
        assert epoch_winner(stats) == w


def test_vote_errors():
    with pytest.raises(ValueError, match="zero snapshots"):
        vote(PARTS, np.zeros((0, 4)), 2)
    with pytest.raises(ValueError):
        vote({}, np.ones((2, 4)), 2)
    with pytest.raises(ValueError):
        vote(PARTS, np.ones(4), 2)
    with pytest.raises(ValueError):
        vote({"kpca": np.array([0, 0, 1])}, np.ones((2, 4)), 2)
