"""The one registry type behind methods, models, datasets and recipes."""

import pickle
import sys

import pytest

from gkp import api, data, models, recipes
from gkp.data import get_dataset_spec, load_data
from gkp.models import get_model, get_model_info
from gkp.recipes import RECIPES, get_recipe
from gkp.registry import PluginError, Registry, UnknownNameError, canonical


def test_register_get_list_contains_and_mapping_view():
    widgets: Registry[int] = Registry("widget")
    assert widgets.register("Bravo", 2) == 2
    widgets.register(" alpha ", 1)
    assert widgets.names() == ["alpha", "bravo"]  # sorted, canonical
    assert list(widgets) == ["bravo", "alpha"]  # iteration keeps registration order, as a dict
    assert (widgets["ALPHA"], widgets["bravo"], len(widgets)) == (1, 2, 2)
    assert "Alpha" in widgets and "charlie" not in widgets and 3 not in widgets
    assert widgets.get("charlie") is None and widgets.get("BRAVO") == 2  # Mapping semantics
    assert dict(widgets.items()) == {"bravo": 2, "alpha": 1}
    assert widgets.canonical_name("  BRAVO") == "bravo"
    with pytest.raises(UnknownNameError) as exc:
        widgets["Charlie"]
    assert str(exc.value) == "unknown widget 'Charlie'; known widgets: alpha, bravo"
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, ValueError)
    assert str(pickle.loads(pickle.dumps(exc.value))) == str(exc.value)  # crosses processes
    assert (exc.value.kind, exc.value.name, exc.value.known) == (
        "widget",
        "Charlie",
        ("alpha", "bravo"),
    )
    with pytest.raises(ValueError, match="widget 'alpha' is already registered"):
        widgets.register("ALPHA", 9)
    with pytest.raises(ValueError, match="must not be empty"):
        widgets.register("  ", 9)
    assert widgets["alpha"] == 1  # the refused duplicate changed nothing
    assert widgets.unregister("Alpha") == 1 and widgets.names() == ["bravo"]
    with pytest.raises(UnknownNameError):
        widgets.unregister("alpha")


def test_decorator_wraps_and_returns_the_function_and_normalise_is_per_registry():
    things: Registry[tuple[str, object]] = Registry("thing", normalise=lambda n: canonical(n)[::-1])

    @things.decorator("AB", wrap=lambda fn: ("wrapped", fn))
    def f():
        return 1

    assert f() == 1 and things["ab"] == ("wrapped", f) and things.names() == ["ba"]
    assert things.normalise("XY ") == "yx"
    plain: Registry[object] = Registry("plain")
    assert plain.decorator("g")(f) is f and plain["G"] is f


def test_every_registry_is_case_insensitive_and_returns_canonical_names():
    assert get_model_info("ResNet20").name == "resnet20"
    assert get_model_info(" VGG16_BN ").name == "vgg16_bn"  # models keep their underscores
    assert type(get_model("ResNet20")) is type(get_model("resnet20"))
    assert get_dataset_spec("SYNTHETIC") is get_dataset_spec("synthetic")
    assert get_dataset_spec("Fashion_MNIST").name == "fashion-mnist"
    assert data.DATASETS.canonical_name("CIFAR10") == "cifar10"
    assert load_data("SYNTHETIC", subset=20, test_subset=10).spec.name == "synthetic"
    assert get_recipe("Smoke") is RECIPES["smoke"] and get_recipe("SMOKE").name == "smoke"
    assert api.get_method("TMI-GKP").name == "tmi-gkp"
    for reg in (api.METHODS, models.MODELS, data.DATASETS, recipes.RECIPES):
        assert isinstance(reg, Registry)
        assert all(name == reg.normalise(name) for name in reg.names())
        with pytest.raises(UnknownNameError, match=f"unknown {reg.kind} 'nope'; known {reg.kind}s"):
            reg["nope"]


def test_duplicates_differing_only_in_case_raise_everywhere():
    with pytest.raises(ValueError, match="model 'resnet20' is already registered"):
        models.register_model("ResNet20", "x", lambda m, a: [], object)(lambda **kw: None)
    with pytest.raises(ValueError, match="dataset 'fashion-mnist' is already registered"):
        data.register_dataset(
            "FASHION_MNIST", num_classes=1, in_channels=1, image_size=1, mean=(0,), std=(1,)
        )(lambda spec, opts: (None, None))
    with pytest.raises(ValueError, match="recipe 'smoke' is already registered"):
        recipes.register_recipe(recipes.Recipe("SMOKE", "x", epochs=1, lr=1, ft_epochs=1, ft_lr=1))
    assert get_recipe("smoke").why.startswith("tests")


def test_recipe_registered_in_any_case_is_stored_canonical():
    recipe = recipes.register_recipe(
        recipes.Recipe("Tiny-Test", "x", epochs=1, lr=1, ft_epochs=1, ft_lr=1)
    )
    try:
        assert recipe.name == "tiny-test" and get_recipe("TINY-test") is recipe
    finally:
        RECIPES.unregister("tiny-test")


# ---------------------------------------------------------------- plugins


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A host module holding a registry whose plugin package ``<pkg>`` lives in tmp_path."""
    tag = abs(hash(str(tmp_path)))
    host, pkg = f"tmp_host_{tag}", f"tmp_pkg_{tag}"
    source = f"REG = Registry('widget', plugins=({pkg!r}, 'no_such_pkg_{tag}'))\n"
    (tmp_path / f"{host}.py").write_text("from gkp.registry import Registry\n" + source)
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    module = __import__(host)
    yield module.REG, host, tmp_path / pkg
    for name in [m for m in sys.modules if m in (host, pkg) or m.startswith(pkg + ".")]:
        del sys.modules[name]


def test_plugins_load_lazily_once_and_may_look_up_while_loading(plugins):
    reg, host, folder = plugins
    (folder / "a.py").write_text(f"from {host} import REG\nREG.register('A', 1)\n")
    (folder / "b.py").write_text(
        f"from {host} import REG\nSEEN = REG.names()\nREG.register('B', REG['a'] + 1)\n"
    )
    assert reg.names() == ["a", "b"] and reg["B"] == 2  # a missing plugin package is skipped
    assert sys.modules[f"{folder.name}.b"].SEEN == ["a"]  # no recursive loading
    (folder / "c.py").write_text("raise RuntimeError('not imported again')\n")
    assert reg.names() == ["a", "b"]  # loaded once


def test_failed_plugin_rolls_back_and_the_next_use_retries(plugins):
    reg, host, folder = plugins
    reg.register("pre", 0)  # registered before loading: survives the rollback
    (folder / "a.py").write_text(f"from {host} import REG\nREG.register('A', 1)\n")
    (folder / "b.py").write_text("import a_module_that_does_not_exist_anywhere\n")
    with pytest.raises(PluginError) as exc:
        reg["a"]
    assert str(exc.value) == (
        f"widget plugin {folder.name}.b failed to import: ModuleNotFoundError: No module named "
        f"'a_module_that_does_not_exist_anywhere'; fix or remove {folder / 'b.py'}"
    )
    assert isinstance(exc.value.__cause__, ModuleNotFoundError)
    assert f"{folder.name}.a" not in sys.modules
    with pytest.raises(PluginError):  # still failing, still not half-loaded
        "a" in reg  # noqa: B015
    (folder / "b.py").unlink()
    assert reg.names() == ["a", "pre"]
