"""The method registry and the contract's value checks."""

import pytest

from gkp import api
from gkp.api import (
    Granularity,
    MethodInfo,
    PruneTarget,
    UnknownNameError,
    get_method,
    list_methods,
    register_method,
)


def info(name, **kw):
    fields = dict(
        name=name,
        granularity=Granularity.KERNEL,
        faithfulness="variant",
        reference="test",
        description="test",
        color="#000000",
    )
    return MethodInfo(**{**fields, **kw})


def test_builtin_methods_registered():
    assert {"gkp-l2", "gkp-random", "tmi-gkp", "sr-gkp"} <= set(list_methods())
    assert get_method("tmi-gkp").info.needs == frozenset({"snapshots"})


def test_register_duplicate_raises(monkeypatch):
    monkeypatch.setattr(api, "_METHODS", dict(api._METHODS))

    @register_method(info("dummy-x"))
    def dummy(model, target, ctx):
        return None

    assert "dummy-x" in list_methods()
    with pytest.raises(ValueError, match="already registered"):
        register_method(info("dummy-x"))(dummy)


def test_unknown_method_lists_known():
    with pytest.raises(UnknownNameError, match="known methods: .*gkp-l2") as exc:
        get_method("gkp-l3")
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, ValueError)


def test_method_info_and_target_validation():
    with pytest.raises(ValueError, match="faithfulness"):
        info("x", faithfulness="approximately")
    with pytest.raises(ValueError, match="unknown needs"):
        info("x", needs=frozenset({"gpu"}))
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"outside \(0, 1\)"):
            PruneTarget(macs=bad)
    assert PruneTarget(macs=0.5).macs == 0.5
