"""Knobs are checked for type and range before any work: no silent coercion."""

import pytest
import torch

from gkp.api import PruneContext, PruneTarget, get_method
from gkp.errors import UsageError
from gkp.knobs import check_knobs
from gkp.methods import SR_DEFAULTS, TMI_DEFAULTS
from gkp.models import get_model
from gkp.planning import GKP_DEFAULTS

X = torch.zeros(1, 3, 32, 32)


@pytest.mark.parametrize(
    "defaults,knobs,message",
    [
        (GKP_DEFAULTS, {"groups": [8]}, "option groups=[8]: must be an integer"),
        (GKP_DEFAULTS, {"groups": 2.5}, "option groups=2.5: must be an integer"),
        (GKP_DEFAULTS, {"groups": True}, "must be an integer"),
        (GKP_DEFAULTS, {"groups": 0}, "must be at least 1"),
        (GKP_DEFAULTS, {"rate": None}, "option rate=null: must be a number"),
        (GKP_DEFAULTS, {"rate": "0.5"}, "must be a number"),
        (GKP_DEFAULTS, {"rate": 1.0}, "is outside (0, 1)"),
        (GKP_DEFAULTS, {"all_bottleneck_convs": "maybe"}, "must be true or false"),
        (GKP_DEFAULTS, {"all_bottleneck_convs": 1}, "must be true or false"),
        (GKP_DEFAULTS, {"layers": "layer1.0.conv1"}, "must be a list of conv names"),
        (GKP_DEFAULTS, {"layers": []}, "must be a list of conv names"),
        (GKP_DEFAULTS, {"beam_width": 2}, "unknown option(s) beam_width"),
        (TMI_DEFAULTS, {"equal_size": "sometimes"}, "must be one of exact, heuristic"),
        (TMI_DEFAULTS, {"snapshot_window": [3, 2]}, "[first, last]"),
        (TMI_DEFAULTS, {"snapshot_window": [1.5, 2]}, "[first, last]"),
        (TMI_DEFAULTS, {"cost_balancer": "big"}, "must be a number"),
        (TMI_DEFAULTS, {"cost_balancer": -1}, "is outside [0, inf]"),
        (SR_DEFAULTS, {"beam_width": 0}, "must be at least 1"),
        (SR_DEFAULTS, {"rerank_every": 1.0}, "must be an integer"),
    ],
)
def test_bad_knobs_are_refused_naming_the_option(defaults, knobs, message):
    with pytest.raises(UsageError) as err:
        check_knobs(knobs, defaults)
    assert message in str(err.value)


def test_good_knobs_pass_unchanged():
    knobs = {"cost_balancer": "auto", "snapshot_window": [35, 70], "equal_size": "heuristic"}
    assert check_knobs(knobs, TMI_DEFAULTS) == knobs
    assert check_knobs({"cost_balancer": 2, "rate": 0.5, "groups": 4}, SR_DEFAULTS)["groups"] == 4


def test_layers_are_checked_against_the_model_and_recorded():
    model = get_model("resnet20")
    method = get_method("gkp-l2")
    with pytest.raises(UsageError, match="option layers: 'nope' is not an ungrouped nn.Conv2d"):
        method.check(model, PruneTarget(native={"layers": ["nope"]}), X)
    with pytest.raises(UsageError, match="'bn1' is not an ungrouped"):
        method.check(model, PruneTarget(native={"layers": ["bn1"]}), X)
    result = method(model, PruneTarget(native={"layers": ["layer1.0.conv1"]}), PruneContext(X))
    assert result.info["options"]["layers"] == ["layer1.0.conv1"]
    assert list(result.info["plans"]) == ["layer1.0.conv1"]


@pytest.mark.parametrize("name", ["gkp-l2", "gkp-random", "tmi-gkp", "sr-gkp"])
def test_every_grouped_method_checks_groups_up_front(name):
    model = get_model("resnet20")
    with pytest.raises(UsageError, match="3 groups do not divide its 16 filters"):
        get_method(name).check(model, PruneTarget(native={"groups": 3}), X)
    get_method(name).check(model, PruneTarget(macs=0.3), X)  # fine: no exception
