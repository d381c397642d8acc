"""Per-group selection of grouped kernels (TMI-GKP step D, SR-GKP beam search, L2 baseline).

A group's grouped kernels are the rows of ``V`` (one per input channel); each selector picks the
``n_keep`` rows the group keeps. float64 numpy, vectorised over start kernels for speed.

Decisions where METHODS.md is silent (beam search: see :func:`beam_select`): ``e = n_keep // 5``;
a numeric ``cost_balancer`` must be finite and >= 0 and is ignored when ``e == 0`` (lambda recorded
as 0.0); final costs come from the *sorted* kept set (bit-identical whichever chain reached it).
"""

from __future__ import annotations

from math import comb

import numpy as np
from scipy.spatial.distance import cdist
from scipy.stats import rankdata


def grouped_kernels(W: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Stack one group's grouped kernels: ``V[c] = W[filters, c].ravel()``, shape ``(C_in, d*k*k)``.

    Row ``c`` is everything the group's filters read from input channel ``c``: the unit GKP removes.
    """
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 4:
        raise ValueError(f"W must be (C_out, C_in, k, k), got shape {W.shape}")
    block = W[np.asarray(filters, dtype=np.intp).reshape(-1)]  # (d, C_in, k, k)
    return np.ascontiguousarray(block.transpose(1, 0, 2, 3).reshape(W.shape[1], -1))


def similarity(V: np.ndarray) -> np.ndarray:
    """``S = 1 - euclidean_distance(V, V)``: larger means more redundant (diagonal is exactly 1)."""
    V = np.asarray(V, dtype=np.float64)
    return 1.0 - cdist(V, V, metric="euclidean")


def auto_lambda(n_in: int, n_keep: int, e: int) -> float:
    """TMI-GKP's automatic balancer ``C(n_keep, 2) / ((n_in - n_keep) * e)``.

    It puts the inner (``C(n_keep, 2)`` pairs) and outer (``(n_in - n_keep) * e`` terms) sums on
    the same scale. Returns 0.0 when there is no outer term (``e == 0`` or ``n_keep == n_in``).
    """
    if e == 0 or n_keep == n_in:
        return 0.0
    return comb(n_keep, 2) / ((n_in - n_keep) * e)


def chain_costs(S: np.ndarray, sets: np.ndarray, e: int, lam: float) -> np.ndarray:
    """Batched :func:`chain_cost` for ``sets`` of shape ``(B, m)`` (each row distinct indices).

    Rows are sorted and every sum runs left to right, so a set's cost is bit-identical whatever
    order it was grown in and however many sets are scored together. Sets are scored in chunks
    of at most ~64 MiB of work space, so wide layers (C_in 1024+) do not exhaust memory.
    """
    S = np.asarray(S, dtype=np.float64)
    sets = np.asarray(sets, dtype=np.intp)
    step = max(1, _CHUNK_BYTES // (24 * S.shape[0] * max(1, sets.shape[1])))
    sym = bool(np.array_equal(S, S.T))
    starts = range(0, max(len(sets), 1), step)  # no sets: one empty block
    return np.concatenate([_chain_costs_block(S, sets[i : i + step], e, lam, sym) for i in starts])


_CHUNK_BYTES = 64 * 2**20


def _chain_costs_block(
    S: np.ndarray, sets: np.ndarray, e: int, lam: float, sym: bool
) -> np.ndarray:
    sets = np.sort(sets, axis=1)
    n_sets, m = sets.shape
    iu, ju = np.triu_indices(m, k=1)
    inner = _seq_sum(S[sets[:, iu], sets[:, ju]])
    if e == 0 or m == S.shape[0]:
        return inner
    e_used = min(e, m)
    outside = np.ones((n_sets, S.shape[0]), dtype=bool)
    outside[np.arange(n_sets)[:, None], sets] = False
    # the e largest S[u, i], i in K, in ascending order, summed for every u outside K; SR-GKP's
    # e = 1 is the largest alone: from whole rows S[i] (a fast gather) when S is symmetric
    # (``sym``; every similarity() is, bit for bit). Otherwise only the rows u outside K are
    # gathered, and np.partition finds the e largest, sorting only those: the values, and so the
    # sums, are exactly those of sorting every column.
    if e_used == 1 and sym:
        top = np.where(outside, S[sets].max(axis=1), 0.0)  # S[i, u] = S[u, i]
    else:
        out_u = np.nonzero(outside)[1].reshape(n_sets, S.shape[0] - m)  # ascending u
        cols = S[out_u[:, :, None], sets[:, None, :]]  # (B, n_in - m, m): S[u, i]
        if e_used == 1:
            vals = cols.max(axis=2)
        else:
            vals = _seq_sum(np.sort(np.partition(cols, m - e_used, axis=2)[:, :, m - e_used :]))
        top = np.zeros(outside.shape)
        top[outside] = vals.reshape(-1)
    return inner - lam * _seq_sum(top)  # zeros at the kept u


def chain_cost(S: np.ndarray, kept: np.ndarray, e: int, lam: float) -> float:
    """``sum_{i<j in K} S[i,j] - lam * sum_{u not in K} (sum of the e largest S[u,i], i in K)``.

    Low inner similarity means a diverse kept set; a high outer term means every pruned kernel still
    has close kept representatives. ``e == 0`` drops the outer term. ``kept``: indices or bool mask.
    """
    kept = np.asarray(kept)
    kept = np.flatnonzero(kept) if kept.dtype == bool else kept
    if e < 0:
        raise ValueError(f"e must be >= 0, got {e}")
    return float(chain_costs(S, kept.reshape(1, -1), e, lam)[0])


def greedy_chains(S: np.ndarray, n_keep: int) -> np.ndarray:
    """Greedy chains from every start, shape ``(n_in, n_keep)``; row ``s`` starts at kernel ``s``.

    Each step adds the unkept kernel with the smallest summed similarity to the kept set (lowest
    index on ties, which is what ``argmin`` returns). All starts advance together.
    """
    S = np.asarray(S, dtype=np.float64)
    n_in = S.shape[0]
    _check_n_keep(n_in, n_keep)
    rows = np.arange(n_in)
    chains = np.empty((n_in, n_keep), dtype=np.intp)
    chains[:, 0] = rows
    masked = S.copy()  # row s: summed similarity of every kernel to chain s, inf once kept
    masked[rows, rows] = np.inf
    for t in range(1, n_keep):
        nxt = masked.argmin(axis=1)
        chains[:, t] = nxt
        masked += S[nxt]
        masked[rows, nxt] = np.inf
    return chains


def greedy_select(
    V: np.ndarray, n_keep: int, cost_balancer: float | str = "auto"
) -> tuple[np.ndarray, dict]:
    """TMI-GKP step D: keep the lowest-cost greedy chain (lowest start index on exact ties).

    ``e = n_keep // 5``; ``lambda = auto_lambda(...)`` or the given number. When ``e == 0`` the
    outer term is dropped (lambda 0, ``outer_term_dropped=True``), as the original does.
    Returns the sorted kept indices and ``{"e", "lambda", "cost", "start", "outer_term_dropped"}``.
    """
    S = similarity(V)
    n_in = S.shape[0]
    _check_n_keep(n_in, n_keep)
    e = n_keep // 5
    lam = _balancer(cost_balancer, n_in, n_keep, e)
    chains = greedy_chains(S, n_keep)
    costs = chain_costs(S, chains, e, lam)
    start = int(np.argmin(costs))
    info = {"e": e, "lambda": lam, "cost": float(costs[start]), "start": start}
    info["outer_term_dropped"] = e == 0
    return np.sort(chains[start]), info


def beam_select(
    V: np.ndarray,
    n_keep: int,
    roughness: np.ndarray,
    *,
    width: int = 2,
    rerank_every: int = 3,
    cost_balancer: float | str = "auto",
) -> tuple[np.ndarray, dict]:
    """SR-GKP selection: beam search per start kernel, minimum-cost final candidate kept.

    Every start ``s`` begins with the beam ``[{s}]``. An expansion replaces each entry by its
    children: the set plus one of its ``width`` unkept kernels with the smallest summed similarity
    (lowest index on ties). The beam grows between re-ranks; after expansion ``t`` with
    ``t % rerank_every == 0``, and always after the last one (so also when ``n_keep`` is reached
    between re-ranks), it is re-ranked by ``0.9*rank(cost) + 0.1*rank(roughness)`` and cut to
    ``width``. Decisions where METHODS.md is silent:

    * identical sets in one start's beam are merged before re-ranking (they would expand
      identically and waste slots); different starts never merge;
    * re-rank cost: ``e = 1``, lambda = the number given or ``auto_lambda(n_in, m, 1)`` for the
      current size ``m``; it is accumulated incrementally (fast), so sets whose costs tie exactly
      in real arithmetic may be ordered by float rounding;
    * ranks are within one start's beam (``rankdata``, ties averaged); the cut keeps the lowest
      score, then lowest cost, then lowest roughness, then the earlier entry;
    * the pool is every start's final beam, scored by :func:`chain_costs` at size ``n_keep``;
      ties go to the smoother set, then the lower start index.

    Returns sorted kept indices and ``{"e", "lambda", "cost", "start", "roughness", "pool_size",
    "width", "rerank_every", "outer_term_dropped"}``.
    """
    S = similarity(V)
    n_in = S.shape[0]
    _check_n_keep(n_in, n_keep)
    rough = np.asarray(roughness, dtype=np.float64).reshape(-1)
    if rough.shape != (n_in,):
        raise ValueError(f"roughness must have {n_in} entries, got {rough.shape}")
    if width < 1 or rerank_every < 1:
        raise ValueError(f"width and rerank_every must be >= 1, got {width}, {rerank_every}")
    beam = _initial_beam(S, rough)
    for t in range(1, n_keep):
        beam = _expand(beam, S, rough, width)
        if t % rerank_every == 0 or t == n_keep - 1:
            beam = _rerank(beam, S, width, _balancer(cost_balancer, n_in, t + 1, 1))
    members = beam["base"]["members"]  # the last expansion is always re-ranked
    lam = _balancer(cost_balancer, n_in, n_keep, 1)
    costs = chain_costs(S, members, 1, lam)
    set_rough = rough[np.sort(members, axis=1)].sum(axis=1)  # order-independent sum
    best = np.lexsort((beam["start"], set_rough, costs))[0]
    info = {"e": 1, "lambda": lam, "cost": float(costs[best]), "start": int(beam["start"][best])}
    info.update(roughness=float(set_rough[best]), pool_size=int(costs.size), width=width)
    info.update(rerank_every=rerank_every, outer_term_dropped=False)
    return np.sort(members[best]), info


def l2_select(V: np.ndarray, n_keep: int) -> np.ndarray:
    """Sorted indices of the ``n_keep`` rows of ``V`` with the largest L2 norm (ties: lowest index).

    The magnitude baseline (KPGP reconstruction) the similarity-based selections are compared to.
    """
    V = np.asarray(V, dtype=np.float64)
    _check_n_keep(V.shape[0], n_keep)
    norms = np.linalg.norm(V.reshape(V.shape[0], -1), axis=1)
    return np.sort(np.argsort(-norms, kind="stable")[:n_keep])


def _check_n_keep(n_in: int, n_keep: int) -> None:
    """Reject a keep count outside ``1..n_in`` early, with the numbers in the message."""
    if not 1 <= n_keep <= n_in:
        raise ValueError(f"n_keep must be in 1..{n_in}, got {n_keep}")


def _balancer(cost_balancer: float | str, n_in: int, n_keep: int, e: int) -> float:
    """Resolve ``"auto"`` or a number to the lambda actually used (0.0 when ``e == 0``)."""
    if e == 0:
        return 0.0
    if isinstance(cost_balancer, str):
        if cost_balancer != "auto":
            raise ValueError(f"cost_balancer must be 'auto' or a number, got {cost_balancer!r}")
        return auto_lambda(n_in, n_keep, e)
    lam = float(cost_balancer)
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"cost_balancer must be finite and >= 0, got {cost_balancer}")
    return lam


def _initial_beam(S: np.ndarray, rough: np.ndarray) -> dict[str, np.ndarray]:
    """One entry ``{s}`` per start.

    Per entry: ``acc`` = summed similarity of every kernel to the set, ``inf`` at its members
    (so the argmin of a row is the least similar unkept kernel and ``isinf(acc)`` is the kept
    mask), ``inner``, ``rough``, and the entry as ``base`` row ``anc`` plus the kernels
    ``recent``-ly added. ``base`` holds the entries that survived the last re-rank (here: the
    starts): their ``members`` and ``mx`` (max similarity of every kernel to the set). What the
    children grown between re-ranks need is built only where it is needed: their ``acc`` rows
    (``pending``: the parents' rows and the kernels added) by the next expansion, or at a
    re-rank for the survivors alone; their members and max rows from base row and recent
    kernels, at the re-rank. The sums and maxima are the incrementally updated ones bit for bit.
    """
    n_in = S.shape[0]
    rows = np.arange(n_in)
    acc = S.copy()
    acc[rows, rows] = np.inf
    base = {"members": rows[:, None].copy(), "mx": S.copy()}
    recent = np.empty((n_in, 0), dtype=np.intp)
    return {"start": rows, "acc": acc, "inner": np.zeros(n_in), "rough": rough.copy(),
            "anc": rows.copy(), "recent": recent, "base": base}  # fmt: skip


def _children_acc(pending: tuple, S: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """``acc`` of the children ``rows`` (all when None): parent's row + S[added], inf at added."""
    parent_acc, new = pending
    n_par, w = new.shape
    if rows is None:  # every child, written by broadcasting the parents' rows
        out = np.empty((n_par, w, S.shape[0]))
        for i in range(w):
            np.add(parent_acc, S[new[:, i]], out=out[:, i, :])
        out = out.reshape(n_par * w, -1)
        added = new.reshape(-1)
    else:
        added = new.reshape(-1)[rows]
        out = parent_acc[rows // w] + S[added]
    out[np.arange(added.size), added] = np.inf
    return out


def _expand(beam: dict, S: np.ndarray, rough: np.ndarray, width: int) -> dict:
    """Replace each entry by its children: add each of its ``width`` least-similar unkept kernels.

    The sums are updated incrementally (inner sum, summed similarity), so an expansion costs
    ``O(entries * n_in)``. The children's ``acc`` rows are left pending (see
    :func:`_initial_beam`): a re-rank next builds only the survivors'.
    """
    acc = beam["acc"] if "acc" in beam else _children_acc(beam["pending"], S)
    n_rows, n_in = acc.shape
    m = beam["base"]["members"].shape[1] + beam["recent"].shape[1]
    rows = np.arange(n_rows)
    w = min(width, n_in - m)
    new = np.empty((n_rows, w), dtype=np.intp)
    picked = np.empty((n_rows, w))
    for i in range(w):  # the w smallest unkept entries, lowest index on ties
        j = acc.argmin(axis=1)
        new[:, i], picked[:, i] = j, acc[rows, j]
        acc[rows, j] = np.inf
    for i in range(w):  # restore the parents' rows (the children are built from them)
        acc[rows, new[:, i]] = picked[:, i]
    recent = np.empty((n_rows, w, beam["recent"].shape[1] + 1), dtype=np.intp)
    recent[:, :, :-1] = beam["recent"][:, None, :]
    recent[:, :, -1] = new
    return {
        "start": np.repeat(beam["start"], w),
        "pending": (acc, new),
        "inner": (beam["inner"][:, None] + picked).reshape(-1),
        "rough": (beam["rough"][:, None] + rough[new]).reshape(-1),
        "anc": np.repeat(beam["anc"], w),
        "recent": recent.reshape(n_rows * w, -1),
        "base": beam["base"],
    }


def _rerank(beam: dict, S: np.ndarray, width: int, lam: float) -> dict:
    """Merge duplicate sets per start, rank by ``0.9*rank(cost)+0.1*rank(rough)``, cut to width.

    Called right after an expansion. Scores are computed on the unique rows, their max rows
    built from base row and recent kernels a cache-sized block of rows at a time (max is exact,
    and each row's sum is the same whatever block it is summed in); the survivors' ``acc`` rows
    are built, and they become the next base.
    """
    parent_acc, new = beam["pending"]
    w = new.shape[1]
    kept = np.repeat(np.isinf(parent_acc), w, axis=0)
    kept[np.arange(kept.shape[0]), new.reshape(-1)] = True
    first = _first_unique(beam["start"], kept)
    start, rough = beam["start"][first], beam["rough"][first]
    anc, recent, kept = beam["anc"][first], beam["recent"][first], kept[first]
    base_mx = beam["base"]["mx"]

    def max_rows(sel) -> np.ndarray:
        mx = base_mx[anc[sel]]
        for c in range(recent.shape[1]):
            np.maximum(mx, S[recent[sel, c]], out=mx)
        return mx

    outer = np.empty(first.size)
    block = max(1, 2**16 // S.shape[0])  # 512 KB of float64 rows
    for b0 in range(0, first.size, block):
        sel = slice(b0, b0 + block)
        outer[sel] = np.where(kept[sel], 0.0, max_rows(sel)).sum(axis=1)
    cost = beam["inner"][first] - lam * outer
    score = 0.9 * _grouped_rank(cost, start) + 0.1 * _grouped_rank(rough, start)
    order = np.lexsort((np.arange(start.size), rough, cost, score, start))
    sorted_start = start[order]
    pos = np.arange(order.size) - np.searchsorted(sorted_start, sorted_start, side="left")
    cut = np.sort(order[pos < width])  # positions in ``first``
    keep = first[cut]
    members = np.concatenate([beam["base"]["members"][anc[cut]], recent[cut]], axis=1)
    return {"start": start[cut], "acc": _children_acc(beam["pending"], S, keep),
            "inner": beam["inner"][keep], "rough": rough[cut], "anc": np.arange(keep.size),
            "recent": np.empty((keep.size, 0), dtype=np.intp),
            "base": {"members": members, "mx": max_rows(cut)}}  # fmt: skip


def _first_unique(start: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Sorted row indices of the first occurrence of every distinct (start, kept set) pair.

    The kept masks are bit-packed into 64-bit words so a stable lexsort finds duplicates exactly.
    """
    packed = np.packbits(kept, axis=1)
    packed = np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8)))
    keys = np.column_stack([start.astype(np.uint64), packed.view(np.uint64)])
    order = np.lexsort(keys.T[::-1])
    sorted_keys = keys[order]
    new = np.ones(order.size, dtype=bool)
    new[1:] = np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)
    return np.sort(order[new])


def _grouped_rank(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``scipy.stats.rankdata`` (average ties, 1-based) applied separately within each group."""
    if np.unique(groups).size == 1:
        return rankdata(values)
    order = np.lexsort((values, groups))
    v, g = values[order], groups[order]
    idx = np.arange(order.size)
    group_first = np.searchsorted(g, g, side="left")
    new_run = np.ones(order.size, dtype=bool)
    new_run[1:] = (g[1:] != g[:-1]) | (v[1:] != v[:-1])
    run = np.cumsum(new_run) - 1
    pos = (idx - group_first).astype(np.float64)
    mean_pos = np.bincount(run, weights=pos) / np.bincount(run)
    ranks = np.empty(order.size)
    ranks[order] = mean_pos[run] + 1.0
    return ranks


def _seq_sum(x: np.ndarray) -> np.ndarray:
    """Left-to-right sum over the last axis (numpy's pairwise ``sum`` depends on memory layout)."""
    return np.cumsum(x, axis=-1)[..., -1] if x.shape[-1] else np.zeros(x.shape[:-1])
