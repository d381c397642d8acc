"""Tests for gkp.selection: greedy chains, chain cost, beam search and the L2 baseline.

The hand cases use 1-D "kernels" x = [0, 1, 3, 6, 10, 15] (indices 0..5), so
S[i, j] = 1 - |x_i - x_j| is an integer and every cost below is exact.
"""

import numpy as np
import pytest
from scipy.stats import rankdata

from gkp.selection import (
    _grouped_rank,
    auto_lambda,
    beam_select,
    chain_cost,
    greedy_chains,
    greedy_select,
    grouped_kernels,
    l2_select,
    similarity,
)

X = np.array([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])
V_LINE = X[:, None]


def test_grouped_kernels_rows_are_channels():
    W = np.arange(4 * 3 * 2 * 2, dtype=float).reshape(4, 3, 2, 2)
    V = grouped_kernels(W, np.array([1, 3]))
    assert V.shape == (3, 8)
    np.testing.assert_array_equal(V[2], np.concatenate([W[1, 2].ravel(), W[3, 2].ravel()]))


def test_similarity_and_auto_lambda():
    S = similarity(V_LINE)
    assert S[0, 5] == -14.0 and S[2, 3] == -2.0
    np.testing.assert_array_equal(np.diag(S), np.ones(6))
    assert auto_lambda(6, 5, 1) == 10.0  # C(5,2) / (1 * 1)
    assert auto_lambda(64, 36, 7) == 630 / (28 * 7)
    assert auto_lambda(16, 4, 0) == 0.0
    assert auto_lambda(16, 16, 3) == 0.0


def test_greedy_chain_by_hand():
    # Smallest summed similarity == largest summed distance to the kept set.
    # Start 0 {x=0}: distances 1,3,6,10,15 -> add 5 (x=15).
    # {0,15}: every interior point has summed distance 15 -> tie -> lowest index 1.
    # {0,1,15}: idx2: 3+2+12=17, idx3: 6+5+9=20, idx4: 10+9+5=24 -> add 4.
    # {0,1,10,15}: idx2: 17+7=24, idx3: 20+4=24 -> tie -> add 2.  Chain [0, 5, 1, 4, 2].
    # Start 3 {x=6}: 15 is farthest (9) -> 5; {6,15}: idx0 6+15=21 is max -> 0;
    # {0,6,15}: idx1 1+5+14=20, idx2 3+3+12=18, idx4 10+4+5=19 -> 1;
    # {0,1,6,15}: idx2 18+2=20, idx4 19+9=28 -> 4.  Chain [3, 5, 0, 1, 4].
    chains = greedy_chains(similarity(V_LINE), 5)
    assert chains.shape == (6, 5)
    np.testing.assert_array_equal(chains[0], [0, 5, 1, 4, 2])
    np.testing.assert_array_equal(chains[3], [3, 5, 0, 1, 4])
    # every other start also leaves out idx 3 (x=6)
    for s in (1, 2, 4, 5):
        assert sorted(chains[s]) == [0, 1, 2, 4, 5]


def test_chain_cost_and_greedy_select_by_hand():
    # n_in = 6, n_keep = 5: e = floor(0.2 * 5) = 1, lambda = C(5,2) / ((6-5) * 1) = 10.
    # Pairwise distances of all 6 points sum to 105; per-point sums D = 35,31,27,27,35,55;
    # nearest-neighbour distances nn = 1,1,2,3,4,5.  Leaving out u:
    #   inner = C(5,2) - (105 - D(u)),  outer = 1 - nn(u)  (e = 1: the single closest kept)
    #   cost = 10 - 105 + D(u) - 10 * (1 - nn(u)) = -105 + D(u) + 10 * nn(u)
    # leave idx3 (x=6):  -105 + 27 + 30 = -48   (chains from starts 0,1,2,4,5)
    # leave idx2 (x=3):  -105 + 27 + 20 = -58   (chain from start 3) -> greedy keeps this one
    S = similarity(V_LINE)
    assert chain_cost(S, np.array([0, 1, 2, 4, 5]), 1, 10.0) == -48.0
    assert chain_cost(S, np.array([5, 4, 1, 3, 0]), 1, 10.0) == -58.0
    mask = np.array([True, True, True, False, True, True])
    assert chain_cost(S, mask, 1, 10.0) == -48.0
    kept, info = greedy_select(V_LINE, 5)
    np.testing.assert_array_equal(kept, [0, 1, 3, 4, 5])
    assert info == {
        "e": 1,
        "lambda": 10.0,
        "cost": -58.0,
        "start": 3,
        "outer_term_dropped": False,
    }


def test_chain_cost_top_e_sum():
    # e = 2: for each pruned kernel add its two largest similarities to the kept set.
    S = np.array(
        [
            [1.0, 0.1, 0.2, 0.5],
            [0.1, 1.0, 0.3, 0.4],
            [0.2, 0.3, 1.0, 0.9],
            [0.5, 0.4, 0.9, 1.0],
        ]
    )
    # K = {0, 1}: inner = 0.1; outer u=2: 0.2+0.3, u=3: 0.5+0.4 -> 1.4; cost = 0.1 - 2 * 1.4
    assert chain_cost(S, np.array([1, 0]), 2, 2.0) == pytest.approx(0.1 - 2.8)
    assert chain_cost(S, np.array([1, 0]), 0, 2.0) == pytest.approx(0.1)


def test_lowest_index_tie_rule():
    # All kernels equally similar: every step is a tie, so chains add the lowest free index.
    S = np.full((5, 5), 0.25)
    np.fill_diagonal(S, 1.0)
    chains = greedy_chains(S, 4)
    np.testing.assert_array_equal(chains[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(chains[3], [3, 0, 1, 2])
    # every chain keeps 4 of 5 at equal cost -> lowest start index (0) wins
    V = np.eye(5)  # all pairwise distances sqrt(2)
    kept, info = greedy_select(V, 4)
    np.testing.assert_array_equal(kept, [0, 1, 2, 3])
    assert info["start"] == 0


def test_e_zero_drops_outer_term():
    # n_keep = 3 < 5: e = 0, lambda = 0, only the inner sum counts.
    # First three of each chain: {0,1,5} (starts 0,1,5), {0,2,5}, {0,3,5}, {0,4,5}; each set
    # holds both end points, so its summed distance is 15 + 15 = 30 and inner = 3 - 30 = -27.
    # All tie -> lowest start index 0 -> {0, 1, 5}.
    kept, info = greedy_select(V_LINE, 3)
    np.testing.assert_array_equal(kept, [0, 1, 5])
    assert info["e"] == 0 and info["lambda"] == 0.0 and info["outer_term_dropped"]
    assert info["cost"] == -27.0
    # a numeric balancer cannot resurrect the outer term when e == 0
    kept2, info2 = greedy_select(V_LINE, 3, cost_balancer=5.0)
    np.testing.assert_array_equal(kept2, kept)
    assert info2["lambda"] == 0.0


def test_numeric_cost_balancer():
    # From the hand case: cost(leave u) = 10 - 105 + D(u) - lam * (1 - nn(u)), D = 27 for both.
    # lam = 0: -68 for both chain sets -> tie -> start 0 (leaves out idx 3).
    kept, info = greedy_select(V_LINE, 5, cost_balancer=0.0)
    np.testing.assert_array_equal(kept, [0, 1, 2, 4, 5])
    assert info["lambda"] == 0.0 and info["cost"] == -68.0 and info["start"] == 0
    # lam = 2: leave idx3 -68 + 2*2 = -64, leave idx2 -68 + 2*1 = -66 -> start 3.
    kept, info = greedy_select(V_LINE, 5, cost_balancer=2)
    np.testing.assert_array_equal(kept, [0, 1, 3, 4, 5])
    assert info["lambda"] == 2.0 and info["cost"] == -66.0
    with pytest.raises(ValueError):
        greedy_select(V_LINE, 5, cost_balancer="manual")
    with pytest.raises(ValueError):
        greedy_select(V_LINE, 5, cost_balancer=-1.0)
    with pytest.raises(ValueError):
        greedy_select(V_LINE, 7)


def test_beam_width_one_is_the_best_greedy_chain():
    rng = np.random.default_rng(3)
    V = rng.standard_normal((12, 18))
    n_keep = 7
    kept, info = beam_select(V, n_keep, rng.random(12), width=1)
    S = similarity(V)
    lam = auto_lambda(12, n_keep, 1)
    costs = [chain_cost(S, c, 1, lam) for c in greedy_chains(S, n_keep)]
    best = int(np.argmin(costs))
    np.testing.assert_array_equal(kept, np.sort(greedy_chains(S, n_keep)[best]))
    assert info["cost"] == costs[best] and info["start"] == best
    assert info["pool_size"] == 12  # one final entry per start


def test_beam_width_two_beats_greedy_by_hand():
    # Same points, n_keep = 5, roughness 0.  Final cost (e = 1, lambda 10) is the hand formula
    # above; over all 5-subsets: leave idx0 -60, idx1 -64, idx2 -58, idx3 -48, idx4 -30, idx5 0.
    # Width 1 (greedy) only reaches leave idx2/idx3 -> -58.  Width 2 from start 0:
    # t1: {0,5},{0,4}.  t2: {0,5}->{0,5,1},{0,5,2} (tie at 15); {0,4}->{0,4,5},{0,4,1}.
    # t3: {0,1,5}->+4,+3; {0,2,5}->+4,+3; {0,4,5}->+1,+2; {0,1,4}->+5,+3; distinct 4-sets and
    # costs with lambda = C(4,2)/(2*1) = 3:  {0,2,4,5} -40, {0,1,4,5} -36, {0,2,3,5} -33,
    # {0,1,3,5} -32, {0,1,3,4} -14  -> keep {0,2,4,5} and {0,1,4,5}.
    # t4 (last, re-rank): {0,2,4,5}->+1 (leave idx3, -48), +3 (leave idx1, -64);
    # {0,1,4,5}->+2 (duplicate), +3 (leave idx2, -58) -> keep -64 and -58.  Pool minimum: -64.
    kept1, info1 = beam_select(V_LINE, 5, np.zeros(6), width=1)
    assert info1["cost"] == -58.0
    kept2, info2 = beam_select(V_LINE, 5, np.zeros(6), width=2)
    np.testing.assert_array_equal(kept2, [0, 2, 3, 4, 5])
    assert info2["cost"] == -64.0 and info2["start"] == 0 and info2["lambda"] == 10.0
    assert info2["pool_size"] <= 2 * 6


def test_beam_prefers_smooth_on_cost_ties():
    # Unit-square corners, keep 2: both diagonals {0,2} and {1,3} have the same lowest cost
    # (1 - sqrt(2); every pruned corner is at distance 1 from both kept ones).
    V = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    kept, info = beam_select(V, 2, np.zeros(4))
    np.testing.assert_array_equal(kept, [0, 2])
    assert info["start"] == 0
    kept, info = beam_select(V, 2, np.array([5.0, 0.0, 0.0, 0.0]))
    np.testing.assert_array_equal(kept, [1, 3])
    assert info["roughness"] == 0.0 and info["cost"] == pytest.approx(1 - np.sqrt(2))


def test_beam_edge_cases():
    rng = np.random.default_rng(0)
    V = rng.standard_normal((6, 4))
    kept, _ = beam_select(V, 6, np.zeros(6))
    np.testing.assert_array_equal(kept, np.arange(6))
    kept, info = beam_select(V, 1, np.zeros(6), width=3, rerank_every=1)
    assert kept.shape == (1,) and info["pool_size"] == 6
    kept, _ = beam_select(V, 5, np.zeros(6), width=4, rerank_every=2)
    assert kept.shape == (5,) and np.unique(kept).size == 5
    with pytest.raises(ValueError):
        beam_select(V, 3, np.zeros(5))
    with pytest.raises(ValueError):
        beam_select(V, 3, np.zeros(6), width=0)


def _loop_beam(V, n_keep, rough, width, rerank_every):
    """SR-GKP's beam search written entry by entry, from beam_select's docstring: the sums are
    grown in the order kernels join a set (as the vectorised code grows them), duplicates per
    start merged keeping the first, ranks within a start's beam. (members, start) of the pool."""
    S = similarity(V)
    n_in = S.shape[0]
    pool = []
    for s in range(n_in):
        beam = [([s], S[s].copy(), 0.0, rough[s])]  # members, summed similarity, inner, rough
        for t in range(1, n_keep):
            children = []
            for members, acc, inner, r in beam:
                free = [u for u in range(n_in) if u not in members]
                for u in sorted(free, key=lambda u: (acc[u], u))[: min(width, len(free))]:
                    children.append((members + [u], acc + S[u], inner + acc[u], r + rough[u]))
            beam = children
            if t % rerank_every == 0 or t == n_keep - 1:
                seen, unique = set(), []
                for entry in beam:
                    if frozenset(entry[0]) not in seen:
                        seen.add(frozenset(entry[0]))
                        unique.append(entry)
                lam = auto_lambda(n_in, t + 1, 1)
                costs = []
                for members, _, inner, _ in unique:
                    mx = S[members].max(axis=0)
                    kept = np.zeros(n_in, dtype=bool)
                    kept[members] = True
                    costs.append(inner - lam * np.where(kept, 0.0, mx).sum())
                costs, rs = np.array(costs), np.array([e[3] for e in unique])
                score = 0.9 * rankdata(costs) + 0.1 * rankdata(rs)
                order = sorted(range(len(unique)), key=lambda i: (score[i], costs[i], rs[i], i))
                beam = [unique[i] for i in sorted(order[:width])]
        pool += [(sorted(members), s) for members, *_ in beam]
    return pool


@pytest.mark.parametrize("n_in,n_keep,width,every", [(9, 5, 2, 3), (12, 8, 3, 2), (10, 10, 2, 1)])
def test_beam_select_equals_an_entry_by_entry_beam_search(n_in, n_keep, width, every):
    """The vectorised beam (children's rows built lazily, max rows rebuilt at re-ranks) keeps
    exactly what a plain loop over entries keeps: same pool, same winner, same cost bits."""
    rng = np.random.default_rng(n_in + n_keep)
    V = rng.standard_normal((n_in, 6))
    V[2] = V[4]  # exact ties
    rough = rng.random(n_in)
    kept, info = beam_select(V, n_keep, rough, width=width, rerank_every=every)
    pool = _loop_beam(V, n_keep, rough, width, every)
    S = similarity(V)
    lam = auto_lambda(n_in, n_keep, 1) if n_keep < n_in else 0.0
    costs = [chain_cost(S, np.array(m), 1, lam) for m, _ in pool]
    set_rough = [rough[m].sum() for m, _ in pool]
    best = min(range(len(pool)), key=lambda i: (costs[i], set_rough[i], pool[i][1]))
    np.testing.assert_array_equal(kept, pool[best][0])
    assert info["pool_size"] == len(pool) and info["start"] == pool[best][1]
    assert info["cost"] == costs[best]


@pytest.mark.parametrize("e", [1, 3, 8])
def test_chain_costs_top_e_from_rows_equal_sorted_columns(e):
    """The outer term's e largest S[u, i] (i kept, u not): from whole rows when e = 1 and S is
    symmetric, else from the rows outside the set with a partition; summed in ascending order,
    bit for bit what sorting every column gives, for symmetric and asymmetric S."""
    from gkp.selection import chain_costs

    rng = np.random.default_rng(e)
    V = rng.standard_normal((20, 5))
    V[7] = V[3]
    S = similarity(V)
    sets = np.array([rng.permutation(20)[:11] for _ in range(9)])
    for M in (S, S + 0.01 * rng.standard_normal(S.shape)):  # symmetric, then not
        expect = []
        for kept in np.sort(sets, axis=1):
            iu, ju = np.triu_indices(len(kept), k=1)
            inner = np.cumsum(M[kept[iu], kept[ju]])[-1]
            outside = [u for u in range(20) if u not in kept]
            tops = [np.cumsum(np.sort(M[u, kept])[-e:])[-1] for u in outside]
            expect.append(inner - 0.7 * np.cumsum(tops)[-1])
        np.testing.assert_array_equal(chain_costs(M, sets, e, 0.7), expect)


def test_grouped_rank_matches_rankdata_per_group():
    values = np.array([3.0, 1.0, 1.0, 2.0, 5.0, 5.0, 5.0, 0.0])
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    ranks = _grouped_rank(values, groups)
    for g in (0, 1):
        np.testing.assert_array_equal(ranks[groups == g], rankdata(values[groups == g]))


def test_l2_select():
    V = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 5.0], [2.0, 2.0], [0.0, 0.0]])
    # norms 5, 1, 5, 2.83, 0 -> top 2: the tie 5 == 5 keeps both; top 1: lowest index 0
    np.testing.assert_array_equal(l2_select(V, 2), [0, 2])
    np.testing.assert_array_equal(l2_select(V, 1), [0])
    np.testing.assert_array_equal(l2_select(V, 3), [0, 2, 3])
