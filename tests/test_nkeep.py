"""n_keep = floor((1 - p) * (C_in + 1)) in exact arithmetic, and the --target search built on it."""

import math
import re
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

from gkp.planning import achieved_reduction, exact_rate, n_keep_for, rate_for_target

WIDTHS = (16, 32, 64, 25, 100)

# Derived by hand: (1 - p) as a fraction, times (C_in + 1), floored.
#   0.8    -> 1/5:   17/5=3.4,     33/5=6.6,     65/5=13,       26/5=5.2,     101/5=20.2
#   0.32   -> 17/25: 289/25=11.56, 561/25=22.44, 1105/25=44.2,  442/25=17.68, 1717/25=68.68
#   0.56   -> 11/25: 187/25=7.48,  363/25=14.52, 715/25=28.6,   286/25=11.44, 1111/25=44.44
#   0.68   -> 8/25:  136/25=5.44,  264/25=10.56, 520/25=20.8,   208/25=8.32,  808/25=32.32
#   0.92   -> 2/25:  34/25=1.36,   66/25=2.64,   130/25=5.2,    52/25=2.08,   202/25=8.08
#   0.4375 -> 9/16:  153/16=9.56,  297/16=18.56, 585/16=36.56,  234/16=14.63, 909/16=56.81
TABLE = {
    0.8: (3, 6, 13, 5, 20),
    0.32: (11, 22, 44, 17, 68),
    0.56: (7, 14, 28, 11, 44),
    0.68: (5, 10, 20, 8, 32),
    0.92: (1, 2, 5, 2, 8),
    0.4375: (9, 18, 36, 14, 56),
}


@pytest.mark.parametrize("rate", sorted(TABLE))
def test_hand_derived_table(rate):
    assert [n_keep_for(c, rate) for c in WIDTHS] == list(TABLE[rate])
    for c in WIDTHS:  # the same numbers from the formula in exact rationals
        assert n_keep_for(c, rate) == max(1, math.floor((1 - Fraction(str(rate))) * (c + 1)))


def test_exact_where_floating_point_rounds_down():
    # 0.2 * 65 is 13 exactly; (1.0 - 0.8) * 65 in doubles is 12.999999999999996
    assert n_keep_for(64, 0.8) == 13
    assert [n_keep_for(c, 0.4375) for c in (16, 32, 64)] == [9, 18, 36]


def test_every_grid_rate_and_width_matches_exact_formula():
    for k in range(1, 1000):
        rate = round(k / 1000, 3)
        exact = Fraction(k, 1000)
        for c in (1, 3, 7, 24, 49, 64, 99, 255, 512):
            want = min(c, max(1, math.floor((1 - exact) * (c + 1))))
            assert n_keep_for(c, rate) == want, (c, rate)


@pytest.mark.parametrize(
    "rate", [0.8, np.float64(0.8), np.float32(0.8), Fraction(4, 5), Decimal("0.8")]
)
def test_rate_types_read_as_the_written_decimal(rate):
    assert exact_rate(rate) == Fraction(4, 5)
    assert n_keep_for(64, rate) == 13


@pytest.mark.parametrize(
    "rate",
    [
        0,
        1,
        0.0,
        1.0,
        -0.25,
        1.5,
        math.nan,
        math.inf,
        -math.inf,
        Decimal("NaN"),
        Decimal("Infinity"),
        Fraction(3, 2),
        "0.5",
        None,
        True,
        complex(0.5, 0),
        [0.5],
    ],
)
def test_bad_rate_raises_naming_it(rate):
    with pytest.raises(ValueError, match="rate " + re.escape(repr(rate))):
        n_keep_for(16, rate)
    with pytest.raises(ValueError, match="rate "):
        achieved_reduction([(16, 100)], rate)


def test_bad_width_raises():
    for c in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="C_in"):
            n_keep_for(c, 0.5)


def test_achieved_reduction_is_exact():
    # 64 -> 13 kept at 0.8: (64 - 13) / 64 = 51/64 = 0.796875 (floating point would keep 12)
    assert achieved_reduction([(64, 100)], 0.8) == 51 / 64
    # MACs-weighted: 16 keeps 9 (7/16 removed), 64 keeps 36 (28/64 removed)
    layers = [(16, 300), (64, 100), (16, 100)]
    want = Fraction(400 * 7, 16) + Fraction(100 * 28, 64)
    assert achieved_reduction(layers, 0.4375) == float(want / 500)


def brute_force(layers, target):
    """Reference search: every grid rate in exact rationals, closest reduction, then rate."""
    total = sum(m for _, m in layers)
    best = None
    for k in range(1, 2000):
        p = Fraction(k, 2000)
        removed = sum(
            Fraction(m * (c - max(1, min(c, math.floor((1 - p) * (c + 1))))), c) for c, m in layers
        )
        key = (abs(removed / total - Fraction(str(target))), abs(p - Fraction(str(target))))
        if best is None or key < best[0]:
            best = (key, p)
    return best[1]


@pytest.mark.parametrize(
    "layers,target",
    [
        ([(64, 100)], 0.8),
        ([(16, 100), (32, 100), (64, 100)], 0.4375),
        ([(16, 4096), (32, 2048), (64, 1024)], 0.5),
        ([(3, 10), (25, 7), (100, 1000), (64, 64)], 0.3),
        ([(16, 1), (16, 1)], 0.99),
    ],
)
def test_rate_for_target_matches_exact_brute_force(layers, target):
    rate = rate_for_target(layers, target)
    assert Fraction(str(rate)) == brute_force(layers, target)
    assert exact_rate(rate) == brute_force(layers, target)  # reads back as the scored rate


def test_rate_for_target_uses_the_exact_n_keep():
    # at 0.8 a 64-wide layer keeps 13, removing 51/64, the closest to 0.8 any n_keep gets;
    # float arithmetic kept 12 at 0.8 and moved the answer to 0.7995
    rate = rate_for_target([(64, 100)], 0.8)
    assert rate == 0.8 and n_keep_for(64, rate) == 13
    layers = [(16, 100), (32, 100), (64, 100)]
    rate = rate_for_target(layers, 0.4375)
    assert [n_keep_for(c, rate) for c in (16, 32, 64)] == [9, 18, 36]


def test_rate_for_target_rejects_non_finite_target():
    with pytest.raises(ValueError, match="target"):
        rate_for_target([(16, 100)], math.nan)
