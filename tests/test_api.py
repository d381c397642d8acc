"""The method registry and the contract's value checks."""

import sys

import pytest

from gkp import api, registry
from gkp.api import (
    METHODS,
    Granularity,
    MethodInfo,
    PluginError,
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


def test_register_duplicate_raises():
    @register_method(info("dummy-x"))
    def dummy(model, target, ctx):
        return None

    try:
        assert "dummy-x" in list_methods() and get_method("dummy-x").fn is dummy
        for spelling in ("dummy-x", "DUMMY-X", " Dummy-X "):  # one name in any case
            with pytest.raises(ValueError, match="method 'dummy-x' is already registered"):
                register_method(info(spelling))(dummy)
        assert get_method("dummy-x").fn is dummy  # the failed duplicates changed nothing
    finally:
        METHODS.unregister("dummy-x")
    assert "dummy-x" not in list_methods()


def test_method_names_are_case_insensitive_and_canonical():
    for spelling in ("GKP-L2", "gkp-l2", " Gkp-L2 "):
        method = get_method(spelling)
        assert method is get_method("gkp-l2")
        assert method.name == method.info.name == "gkp-l2"
        assert METHODS.canonical_name(spelling) == "gkp-l2"
        assert spelling in METHODS
    assert info("TMI-Fancy").name == "tmi-fancy"  # MethodInfo stores the canonical spelling
    assert all(name == name.strip().lower() for name in list_methods())
    with pytest.raises(UnknownNameError, match="unknown method 'GKP-L3'"):
        get_method("GKP-L3")


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


# ---------------------------------------------------------------- plugin loading


GOOD_PLUGIN = """
from gkp.api import Granularity, MethodInfo, register_method

@register_method(MethodInfo(name="{name}", granularity=Granularity.KERNEL,
                            faithfulness="variant", reference="t", description="t",
                            color="#000000"))
def pruner(model, target, ctx):
    return None
"""


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """A fresh method registry whose only plugin package is ``tmp_plugins_<n>`` in tmp_path."""
    name = f"tmp_plugins_{abs(hash(str(tmp_path)))}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # rewritten files are re-read
    monkeypatch.setattr(api, "METHODS", registry.Registry("method", plugins=(name,)))
    yield name, tmp_path / name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def test_broken_plugin_names_itself_and_leaves_no_half_filled_registry(plugin_package):
    name, folder = plugin_package
    (folder / "a_good.py").write_text(GOOD_PLUGIN.format(name="Plug-A"))  # imported first
    (folder / "broken.py").write_text("raise RuntimeError('boom')\n")
    (folder / "_private.py").write_text("raise AssertionError('never imported')\n")
    for _ in range(2):  # the failure repeats: nothing was marked loaded
        with pytest.raises(PluginError) as exc:
            list_methods()
        msg = str(exc.value)
        assert msg.startswith(f"method plugin {name}.broken failed to import: RuntimeError: boom")
        assert msg.endswith(f"; fix or remove {folder / 'broken.py'}")
        assert isinstance(exc.value, ImportError) and exc.value.name == f"{name}.broken"
        assert isinstance(exc.value.__cause__, RuntimeError)
        assert f"{name}.a_good" not in sys.modules  # rolled back: the retry imports it again
    (folder / "broken.py").write_text(GOOD_PLUGIN.format(name="Plug-B-Fixed"))
    assert list_methods() == ["plug-a", "plug-b-fixed"]  # the retry after the fix succeeds
    assert get_method("PLUG-A").name == "plug-a"


def test_plugin_that_registers_a_duplicate_is_a_plugin_error(plugin_package):
    name, folder = plugin_package
    (folder / "one.py").write_text(GOOD_PLUGIN.format(name="same"))
    (folder / "two.py").write_text(GOOD_PLUGIN.format(name="SAME"))
    with pytest.raises(PluginError, match=rf"{name}\.two failed to import: ValueError: method "):
        get_method("same")
    (folder / "two.py").unlink()
    assert list_methods() == ["same"]  # one.py's first registration was rolled back


def test_progress_false_hides_the_methods_own_bars(capsys):
    """``PruneContext.progress`` (``--no-progress``) turns off the layer-planning bar."""
    import torch

    from gkp.api import PruneContext, PruneTarget, get_method
    from gkp.models import get_model

    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    for progress in (True, False):
        ctx = PruneContext(example_inputs=x, progress=progress)
        get_method("gkp-l2")(get_model("resnet20"), PruneTarget(native={"groups": 4}), ctx)
        assert ("planning layers" in capsys.readouterr().err) is progress
