"""scripts/ab_fused.py: another commit's build of the fused op loads beside this checkout's."""

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import ab_fused  # noqa: E402

from gkp import fused  # noqa: E402


def _in_git_checkout() -> bool:
    try:
        subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


needs_build = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler"
)


@needs_build
@pytest.mark.skipif(not _in_git_checkout(), reason="not a git checkout")
def test_the_base_build_runs_beside_this_one_and_both_are_exact():
    """The committed kernel (HEAD) as ``gkp_fused_base`` next to the working tree's
    ``gkp_fused``: two separate ops in one process, each equal to gather -> grouped conv ->
    un-permute on both of the kernel's paths."""
    assert fused.load()
    ab_fused.load_base("HEAD")
    base = torch.ops.gkp_fused_base.grouped_kernel_conv
    this = torch.ops.gkp_fused.grouped_kernel_conv
    rng = random.Random(3)
    for batch in (2, 16):  # the rows path and the lanes path
        x = torch.randn(batch, 12, 9, 11)
        weight = torch.randn(8, 5, 3, 3)
        gather = torch.tensor([rng.randrange(12) for _ in range(4 * 5)])
        out_idx = torch.randperm(8)
        want = F.conv2d(x[:, gather], weight, None, 1, 1, 1, 4)[:, out_idx]
        for op in (base, this):
            got = op(x, weight, None, gather, out_idx, [1, 1], [1, 1], [1, 1], 4, None, False)
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_an_unknown_revision_is_a_clear_error():
    with pytest.raises(SystemExit, match="cannot read gkp/csrc/grouped_kernel_conv.cpp at"):
        ab_fused.load_base("no-such-revision-anywhere")


def test_the_layer_sets_and_their_exclusive_options(monkeypatch, capsys):
    """``--batch-one`` times the batch-1 layers, the default the larger batches (64 and 16),
    ``--downsampling`` the stride-2 ones; asking for two sets at once is refused before any
    build."""
    assert {ly[3] for ly in ab_fused.pick_layers(False, True)} == {1}
    assert {ly[3] for ly in ab_fused.pick_layers(False, False)} == {16, 64}
    assert {ly[5] for ly in ab_fused.pick_layers(True, False)} == {2}
    argv = ["ab_fused.py", "--base", "HEAD", "--batch-one", "--downsampling"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        ab_fused.main()
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
