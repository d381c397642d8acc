"""TMI-GKP step A (ticket scores) and step C (the lottery vote between grouping candidates).

``TMI`` (tickets magnitude increase) measures how far each filter's weight magnitudes moved between
an early-training snapshot and the final weights. The vote prefers the candidate partition whose
groups share that movement most evenly (small, regular gaps between sorted group sums).

Decisions where METHODS.md is silent:

* candidates named outside ``order`` rank after those in it, in their insertion order;
* a non-finite gap statistic ranks as the worst value (``+inf``) instead of poisoning the ranks;
* with one group there are no gaps, and ``gap_stats`` returns ``(0.0, 0.0)``;
* zero snapshots (or zero candidates) raise ``ValueError``: there is nothing to vote on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = ["DEFAULT_ORDER", "epoch_winner", "gap_stats", "ticket_scores", "vote"]

DEFAULT_ORDER: tuple[str, ...] = ("kpca", "spectral", "dbscan")


def ticket_scores(final: np.ndarray, snapshots: Sequence[np.ndarray]) -> np.ndarray:
    """``TMI_e(f) = sum_w | |w_final| - |w_e| |`` for every snapshot ``e`` and filter ``f``.

    ``final`` has shape ``(C_out, ...)`` and every snapshot the same shape. Returns an array of
    shape ``(n_snapshots, C_out)`` (``(0, C_out)`` when there are no snapshots).
    """
    final = np.asarray(final, dtype=np.float64)
    if final.ndim < 1:
        raise ValueError("final weights need a leading filter axis")
    n_filters = final.shape[0]
    snaps = [np.asarray(s, dtype=np.float64) for s in snapshots]
    for i, snap in enumerate(snaps):
        if snap.shape != final.shape:
            raise ValueError(f"snapshot {i} has shape {snap.shape}, final has {final.shape}")
    if not snaps:
        return np.zeros((0, n_filters))
    mag_final = np.abs(final).reshape(1, n_filters, -1)
    mag_snaps = np.abs(np.stack(snaps)).reshape(len(snaps), n_filters, -1)
    return np.abs(mag_final - mag_snaps).sum(axis=2)


def gap_stats(scores: np.ndarray, labels: np.ndarray, n_groups: int) -> tuple[float, float]:
    """Mean and population variance of the ``G-1`` gaps between sorted (descending) group sums.

    ``scores`` are one epoch's per-filter ticket scores, ``labels`` the filters' group ids.
    Small, even gaps mean the ticket filters are spread evenly over the groups.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(1, -1)
    mu, var = _gap_stats_batch(scores, labels, n_groups)
    return float(mu[0]), float(var[0])


def epoch_winner(
    stats: dict[str, tuple[float, float]], order: Sequence[str] = DEFAULT_ORDER
) -> str:
    """The candidate minimising ``0.5*rank(mu) + rank(var)`` (ascending ranks, ties averaged).

    Exact score ties go to the candidate listed first in ``order``.
    """
    if not stats:
        raise ValueError("epoch_winner needs at least one candidate")
    names = _by_priority(stats, order)
    mu = np.array([[stats[n][0] for n in names]], dtype=np.float64)
    var = np.array([[stats[n][1] for n in names]], dtype=np.float64)
    return names[int(_winner_columns(mu, var)[0])]


def vote(
    partitions: dict[str, np.ndarray],
    scores: np.ndarray,
    n_groups: int,
    order: Sequence[str] = DEFAULT_ORDER,
) -> tuple[str, dict]:
    """TMI-GKP step C: the candidate that wins the most snapshot epochs.

    ``partitions`` maps candidate name -> per-filter group labels; ``scores`` is
    ``ticket_scores(...)`` of shape ``(n_snapshots, C_out)``. A tie in wins goes to the longest run
    of consecutive wins, a remaining tie to ``order``. Returns the winner and
    ``{"winners", "counts", "longest_streak", "tie_break"}`` (``"none"|"streak"|"order"``).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_snapshots, C_out), got shape {scores.shape}")
    if scores.shape[0] == 0:
        raise ValueError(
            "vote needs at least one snapshot epoch, got zero snapshots "
            "(is the ticket window empty or were snapshots not saved?)"
        )
    if not partitions:
        raise ValueError("vote needs at least one candidate partition")
    names = _by_priority(partitions, order)
    stats = {n: _gap_stats_batch(scores, partitions[n], n_groups) for n in names}
    mu = np.stack([stats[n][0] for n in names], axis=1)  # (n_epochs, n_candidates)
    var = np.stack([stats[n][1] for n in names], axis=1)
    winners = [names[i] for i in _winner_columns(mu, var)]
    counts = {n: winners.count(n) for n in names}
    streaks = {n: _longest_run(winners, n) for n in names}
    top = [n for n in names if counts[n] == max(counts.values())]
    tie_break = "none"
    if len(top) > 1:
        best_streak = max(streaks[n] for n in top)
        top = [n for n in top if streaks[n] == best_streak]
        tie_break = "streak" if len(top) == 1 else "order"
    info = {"winners": winners, "counts": counts, "longest_streak": streaks, "tie_break": tie_break}
    return top[0], info


# --------------------------------------------------------------------------- helpers


def _gap_stats_batch(
    scores: np.ndarray, labels: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Gap mean and variance for every row of ``scores`` (one code path for exact reproducibility).

    Rows of ``scores`` are epochs; returns two arrays of length ``n_epochs``.
    """
    labels = _check_labels(labels, scores.shape[1], n_groups)
    sums = np.stack([scores[:, labels == g].sum(axis=1) for g in range(n_groups)], axis=1)
    if n_groups < 2:
        zeros = np.zeros(scores.shape[0])
        return zeros, zeros.copy()
    desc = -np.sort(-sums, axis=1)
    gaps = desc[:, :-1] - desc[:, 1:]
    return gaps.mean(axis=1), gaps.var(axis=1)


def _check_labels(labels: np.ndarray, n_filters: int, n_groups: int) -> np.ndarray:
    """Validate one candidate's labels: one integer id in ``0..n_groups-1`` per filter."""
    labels = np.asarray(labels)
    if labels.shape != (n_filters,):
        raise ValueError(f"labels must have shape ({n_filters},), got {labels.shape}")
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    as_int = labels.astype(np.intp)
    in_range = as_int.size == 0 or (as_int.min() >= 0 and as_int.max() < n_groups)
    if not (np.array_equal(as_int, labels) and in_range):
        raise ValueError(f"labels must be integers in 0..{n_groups - 1}")
    return as_int


def _by_priority(names: Iterable[str], order: Sequence[str]) -> list[str]:
    """Candidate names, those listed in ``order`` first (in that order), the rest as given."""
    names = list(names)
    listed = [n for n in order if n in names]
    return listed + [n for n in names if n not in listed]


def _winner_columns(mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Per row (epoch), the column (candidate, in priority order) minimising the vote score.

    Ranks are ascending with ties averaged; NaN counts as +inf so a broken statistic ranks last.
    ``argmin`` returns the first column on ties, i.e. the highest-priority candidate.
    """
    mu = np.where(np.isnan(mu), np.inf, mu)
    var = np.where(np.isnan(var), np.inf, var)
    score = 0.5 * rankdata(mu, axis=1) + rankdata(var, axis=1)
    return np.argmin(score, axis=1)


def _longest_run(winners: list[str], name: str) -> int:
    """Length of the longest run of consecutive epochs won by ``name`` (0 if it never wins)."""
    best = run = 0
    for w in winners:
        run = run + 1 if w == name else 0
        best = max(best, run)
    return best
