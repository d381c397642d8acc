"""gkp.memory: the caching CPU allocator keeps freed blocks, so repeated passes stop faulting."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gkp import autotune as tune
from gkp import fused, memory

ROOT = Path(__file__).resolve().parent.parent
needs_compiler = pytest.mark.skipif(not fused.load(), reason="needs a C++ compiler")

# Allocates and frees a 64 MiB tensor (always mmapped by glibc: above its largest adaptive mmap
# threshold, 32 MiB) a few times and counts the page faults of each repeat.
PROBE = """
import json, resource, torch
from gkp import memory
state = memory.keep_freed_memory()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 << 20)  # touches every page
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": state, "faults": faults, "stats": memory.stats()}))
"""


def _probe(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != memory.ENV}
    if setting is not None:
        env[memory.ENV] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_compiler
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults")
def test_kept_blocks_are_not_faulted_in_again_unless_off_or_over_the_limit():
    """Installed, the allocator serves the repeats from the kept block: no page faults after the
    first. With ``GKP_CPU_CACHE=off`` (PyTorch's allocator) every repeat maps the 64 MiB anew,
    16384 pages of 4 KiB; a 32 MB limit cannot keep the block, so the same happens."""
    kept = _probe(None)
    assert kept["state"] == "caching" and kept["stats"]["limit_bytes"] == 4096 << 20
    assert kept["faults"][0] > 4000 and max(kept["faults"][1:]) < 500, kept
    assert kept["stats"]["hits"] >= 3
    for setting, state in (("off", "default"), ("32", "caching")):
        plain = _probe(setting)
        assert plain["state"] == state
        assert min(plain["faults"]) > 4000, (setting, plain)


@needs_compiler
def test_blocks_handed_out_never_overlap_and_keep_what_was_written():
    """Many tensors of a few sizes, freed in random order and allocated again: no two live
    tensors share memory, and each holds the value written into it."""
    assert memory.keep_freed_memory() == "caching"
    hits = memory.stats()["hits"]
    rng = random.Random(0)
    live: dict[int, torch.Tensor] = {}
    for step in range(400):
        if live and rng.random() < 0.45:
            live.pop(rng.choice(list(live)))
        else:
            live[step] = torch.full((rng.choice([1, 7, 1000, 65536, 1 << 20]),), float(step))
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * 4) for t in live.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert all(bool((t == float(k)).all()) for k, t in live.items())
    assert memory.stats()["hits"] > hits


@needs_compiler
def test_threads_allocating_at_once_get_their_own_blocks():
    """Torch ops release the GIL, so Python threads allocate and free concurrently."""
    import threading

    assert memory.keep_freed_memory() == "caching"
    bad: list[str] = []

    def work(k: int) -> None:
        for i in range(300):
            t = torch.full((1000 + 37 * (i % 5),), float(k * 1000 + i))
            s = (t * 2).sum().item()
            if s != 2.0 * (k * 1000 + i) * t.numel():
                bad.append(f"thread {k} step {i}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


@needs_compiler
def test_raw_allocations_pass_through_it_also_after_caching_stops(monkeypatch):
    """oneDNN's buffers (an mkldnn tensor) are raw allocations through PyTorch's CPU allocator:
    they are counted as handed out, and freed after caching stopped they leave the table."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN")
    assert memory.keep_freed_memory() == "caching"
    before = memory.stats()["live"]
    y = torch.randn(64, 64).to_mkldnn()
    assert memory.stats()["live"] > before
    memory.uninstall()
    assert memory.allocator() == "default" and memory.stats()["kept_bytes"] == 0
    del y
    assert memory.stats()["live"] == before
    assert memory.keep_freed_memory() == "caching"


@needs_compiler
def test_a_lower_limit_frees_kept_blocks_down_to_it(monkeypatch):
    assert memory.keep_freed_memory() == "caching"
    blocks = [torch.empty(1 << 20) for _ in range(8)]  # 4 MiB each
    del blocks
    assert memory.stats()["kept_bytes"] >= 32 << 20
    monkeypatch.setenv(memory.ENV, "8")
    assert memory.keep_freed_memory() == "caching"
    assert memory.stats()["kept_bytes"] <= 8 << 20 and memory.stats()["limit_bytes"] == 8 << 20
    monkeypatch.setenv(memory.ENV, "0")
    assert memory.keep_freed_memory() == "default" and memory.stats()["kept_bytes"] == 0
    monkeypatch.delenv(memory.ENV)
    assert memory.keep_freed_memory() == "caching"


@needs_compiler
def test_networks_compute_the_same_on_either_allocator():
    """A conv network (oneDNN takes its scratch memory through the CPU allocator's raw
    interface) gives the same output with the caching allocator installed and without it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 3)).eval()  # fmt: skip
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        memory.keep_freed_memory()
        cached = [net(x) for _ in range(3)]
        memory.uninstall()
        assert memory.allocator() == "default"
        plain = net(x)
        memory.keep_freed_memory()
    assert memory.allocator() == "caching"
    assert all(torch.equal(c, plain) for c in cached)


@pytest.mark.parametrize("value", ["sometimes", "-5", "1.5", "²", str(memory.MAX_LIMIT_MB + 1)])
def test_a_bad_setting_is_refused(monkeypatch, value):
    monkeypatch.setenv(memory.ENV, value)
    with pytest.raises(ValueError, match=f"GKP_CPU_CACHE='{value}' is not a setting"):
        memory.keep_freed_memory()


def test_the_cli_refuses_a_bad_setting_before_any_work(monkeypatch, capsys):
    from benchmarks.cli import main

    monkeypatch.setenv(memory.ENV, "lots")
    code = main(["bench", "--model", "resnet20", "--dataset", "synthetic", "--method", "gkp-l2"])
    assert code == 2
    assert "GKP_CPU_CACHE='lots' is not a setting" in capsys.readouterr().err


def test_choices_timed_with_the_caching_allocator_are_kept_apart(monkeypatch):
    """Timings without page faults choose differently: the tune key says so (no part in it for
    the default allocator, so older keys hold), before any OpenMP setting."""
    for name in tune.OPENMP_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    x = torch.randn(1, 3, 8, 8)
    monkeypatch.setattr(memory, "allocator", lambda: "default")
    plain = tune.tune_key(x, 1)
    assert "alloc" not in plain
    monkeypatch.setattr(memory, "allocator", lambda: "caching")
    assert tune.tune_key(x, 1) == plain + "|alloc=caching"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert tune.tune_key(x, 1) == plain + "|alloc=caching|OMP_WAIT_POLICY=PASSIVE"


def test_prepared_networks_and_timed_forms_say_which_allocator_ran(monkeypatch):
    from benchmarks.backends import prepare
    from benchmarks.measure import timed_forms

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    _, info = prepare("eager", net, x, threads=1)
    assert info["allocator"] == memory.allocator() == ("caching" if fused.load() else "default")
    _, picked = timed_forms(net, net, "torch", x, 1)
    assert picked == {"allocator": info["allocator"]}
    monkeypatch.setenv(memory.ENV, "off")
    _, info = prepare("eager", net, x, threads=1)
    assert info["allocator"] == memory.allocator() == "default"
    monkeypatch.delenv(memory.ENV)
    assert memory.keep_freed_memory() == ("caching" if fused.load() else "default")
