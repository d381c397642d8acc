"""The related methods [1] group2d and [3] KPGP: hand-derived cases, and the runner's teacher."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.decomposition import KernelPCA
from torch import nn

from baselines import group2d as g2d
from benchmarks import runner
from benchmarks.cli import main
from benchmarks.leaderboard import read_leaderboard
from gkp.api import PruneContext, PruneTarget, get_method
from gkp.data import random_calibration
from gkp.grouping import equal_size_kmeans
from gkp.models import get_model
from gkp.train import Distill, distill_loss

X = torch.zeros(1, 3, 32, 32)


def test_greedy_reconstruction_finds_planted_channels():
    """Channels 2 and 5 are the largest but cancel each other: they explain nothing of the
    output, so reconstruction keeps the planted informative channels and magnitude would not."""
    rng = np.random.default_rng(0)
    m = 400
    Z = 0.01 * rng.standard_normal((8, m))
    for c in (1, 4, 6):
        Z[c] = rng.standard_normal(m)
    v = 5.0 * rng.standard_normal(m)
    Z[2], Z[5] = v, -v
    kept, err = g2d.greedy_reconstruction(Z, 3)
    assert kept.tolist() == [1, 4, 6]
    assert err < 0.01
    by_norm = np.sort(np.argsort(-np.linalg.norm(Z, axis=1))[:3])
    assert not set(by_norm) <= {1, 4, 6}  # the case tells the two criteria apart
    with pytest.raises(ValueError, match="outside"):
        g2d.greedy_reconstruction(Z, 9)


def test_greedy_keeping_everything_is_exact():
    Z = np.random.default_rng(1).standard_normal((5, 50))
    kept, err = g2d.greedy_reconstruction(Z, 5)
    assert kept.tolist() == [0, 1, 2, 3, 4] and err == pytest.approx(0.0, abs=1e-20)


def test_refit_recovers_a_dropped_channel_that_copies_a_kept_one():
    """Input channel 3 is twice channel 0: dropping it loses nothing once the kept weights of
    channel 0 absorb its weights, which the least-squares refit finds."""
    rng = np.random.default_rng(2)
    patches = rng.standard_normal((300, 4, 9))
    patches[:, 3] = 2.0 * patches[:, 0]
    w = rng.standard_normal((2, 4, 3, 3))
    kept = np.array([0, 1, 2])
    want = patches.reshape(300, -1) @ w.reshape(2, -1).T
    new = g2d.refit_weights(patches, w, kept)
    got = patches.reshape(300, -1) @ new.reshape(2, -1).T
    assert np.abs(new[:, 3]).max() == 0.0
    assert np.allclose(got, want, atol=1e-4)
    assert np.allclose(new[:, 0], w[:, 0] + 2.0 * w[:, 3], atol=1e-4)  # derived by hand
    masked = w.copy()
    masked[:, 3] = 0
    plain = patches.reshape(300, -1) @ masked.reshape(2, -1).T
    assert not np.allclose(plain, want, atol=1e-2)  # without the refit, the output changes


def test_conv_patches_reproduce_the_conv_output():
    """With every location sampled, patches × weights sum to the conv's summed output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    batches = [(torch.randn(2, 3, 5, 5), torch.zeros(2).long())]
    patches = g2d.conv_patches(model, ["0"], batches, positions=25)["0"]
    assert patches.shape == (2 * 25, 3, 9)
    w = model[0].weight.double()
    z = g2d.contributions(patches.numpy(), w.detach().numpy())
    with torch.no_grad():
        out = model(batches[0][0]).double()
    per_filter = z.reshape(3, 2 * 25, 4).sum(axis=(0, 1))  # (C_in, samples, d) summed
    assert np.allclose(per_filter, out.sum(dim=(0, 2, 3)).numpy(), rtol=1e-5, atol=1e-5)


def test_group2d_uses_index_groups_and_records_its_reconstruction():
    torch.manual_seed(0)
    model = get_model("resnet20")
    ctx = PruneContext(X, calib_batches=random_calibration(X.shape[1:]), teacher=model)
    result = get_method("group2d")(model, PruneTarget(native={"layers": ["layer2.0.conv2"]}), ctx)
    plan = result.info["plans"]["layer2.0.conv2"]
    assert plan["groups"] == [list(range(4 * g, 4 * g + 4)) for g in range(8)]
    assert all(len(k) == 18 for k in plan["kept"])  # 32 channels, p = 0.4375: 18 kept
    assert result.info["calibration"] == {
        "batches": 2, "images": 16, "positions": 10, "inputs": "dense network", "refit": False,
    }  # fmt: skip
    assert result.info["distill"] == {"alpha": 0.9, "temperature": 4.0}
    assert 0.0 < result.info["layers"]["layer2.0.conv2"]["reconstruction_error"] < 1.0


def test_group2d_refit_deploys_its_refit_weights():
    torch.manual_seed(0)
    model = get_model("resnet20")
    ctx = PruneContext(X, calib_batches=random_calibration(X.shape[1:]), teacher=model)
    native = {"layers": ["layer1.0.conv1"], "refit": True}
    result = get_method("group2d")(model, PruneTarget(native=native), ctx)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = result.model.eval()(x), result.reference.eval()(x)
    assert torch.allclose(got, want, atol=1e-4)
    ref_w = result.reference.get_submodule("layer1.0.conv1").weight
    orig = model.get_submodule("layer1.0.conv1").weight
    kept = ref_w.abs().sum(dim=(2, 3)) > 0
    assert not torch.allclose(ref_w[kept], orig[kept])  # the weights were refit, not just masked


def test_group2d_without_calibration_is_a_clear_error():
    with pytest.raises(ValueError, match="calibration batches"):
        get_method("group2d")(get_model("resnet20"), PruneTarget(), PruneContext(X))


@pytest.mark.parametrize("knob", [{"kd_alpha": 1.5}, {"kd_temperature": 0}, {"positions": 0}])
def test_group2d_bad_knobs(knob):
    with pytest.raises(ValueError, match="option"):
        get_method("group2d").check(get_model("resnet20"), PruneTarget(native=knob), X)


def test_distill_loss_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    y = torch.tensor([0, 1])
    kd = Distill(alpha=0.5, temperature=2.0)
    ps, pt = F.softmax(s / 2, 1), F.softmax(t / 2, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    want = F.cross_entropy(s, y) + 0.5 * 4.0 * kl
    assert distill_loss(s, t, y, kd).item() == pytest.approx(want.item(), rel=1e-6)
    assert distill_loss(s, s, y, kd).item() == pytest.approx(F.cross_entropy(s, y).item())
    with pytest.raises(ValueError, match="alpha"):
        Distill(alpha=2.0)


def _kpca_then_l2(w, n_groups, n_keep, seed):
    """K-PCA grouping + L2 selection, assembled here from sklearn and numpy."""
    f = w.reshape(w.shape[0], -1)
    sq = (f**2).sum(1)
    rbf = np.exp(-(sq[:, None] + sq[None, :] - 2 * f @ f.T) / f.shape[1])
    kernel = 0.5 * (f @ f.T) ** 2 + 0.5 * rbf
    emb = KernelPCA(kernel="precomputed", random_state=seed).fit_transform(kernel)
    labels = equal_size_kmeans(emb, n_groups, seed=seed)
    kept = []
    for g in range(n_groups):
        block = w[labels == g]  # (d, C_in, k, k)
        norms = np.sqrt((block**2).sum(axis=(0, 2, 3)))
        kept.append(sorted(np.argsort(-norms, kind="stable")[:n_keep].tolist()))
    return labels, kept


def test_kpgp_is_kpca_grouping_plus_l2_selection():
    torch.manual_seed(3)
    model = get_model("resnet20")
    name = "layer3.1.conv1"
    result = get_method("kpgp")(
        model, PruneTarget(native={"layers": [name]}), PruneContext(X, seed=5)
    )
    w = model.get_submodule(name).weight.detach().double().numpy()
    labels, kept = _kpca_then_l2(w, 8, 36, seed=5)
    plan = result.info["plans"][name]
    want_groups = sorted(np.flatnonzero(labels == g).tolist() for g in range(8))
    assert sorted(plan["groups"]) == want_groups
    by_group = {tuple(g): k for g, k in zip(plan["groups"], plan["kept"], strict=True)}
    for g in range(8):
        assert by_group[tuple(np.flatnonzero(labels == g).tolist())] == kept[g]
    assert get_method("kpgp").info.faithfulness == "reconstructed"


@pytest.fixture(scope="module")
def group2d_run(tmp_path_factory):
    """One smoke run of group2d through the runner, recording how fine-tuning was called."""
    root = tmp_path_factory.mktemp("related")
    calls = []
    original = runner.fit

    def spy(*args, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("phase", "teacher", "distill")})
        return original(*args, **kwargs)

    runner.fit = spy
    try:
        argv = ["run", "--dataset", "synthetic", "--recipe", "smoke", "--method", "group2d"]
        argv += ["--out", str(root / "results"), "--runs", str(root / "runs")]
        argv += ["--bench-rounds", "2", "--no-progress", "--json"]
        assert main(argv) == 0
    finally:
        runner.fit = original
    return root, calls


def test_the_runner_gives_group2d_calibration_and_a_teacher(group2d_run):
    root, calls = group2d_run
    finetune = [c for c in calls if c["phase"] == "finetune"]
    assert len(finetune) == 1 and finetune[0]["teacher"] is not None
    assert finetune[0]["distill"] == Distill(alpha=0.9, temperature=4.0)
    assert all(c["teacher"] is None for c in calls if c["phase"] == "train")
    row = read_leaderboard(root / "results" / "leaderboard.csv").iloc[0]
    info = json.loads(row["prune_info"])
    assert info["calibration"]["batches"] == runner.CALIB_BATCHES
    assert info["distill"] == {"alpha": 0.9, "temperature": 4.0}
    assert json.loads(row["options"])["kd_alpha"] == 0.9
    assert row["faithfulness"] == "reconstructed"
