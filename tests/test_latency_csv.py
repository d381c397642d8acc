"""Latency backends and the long-format results/latency.csv: every backend runs the same function
as eager PyTorch, rows validate and append atomically, a malformed file is never rewritten,
suite JSON pairs become rows, the per-backend figure has one panel per backend, CLI errors."""

import copy
import importlib.util
import json

import pytest
import torch
from torch import nn

from benchmarks.backends import BACKENDS, missing, prepare, structure_digest
from benchmarks.cli import main
from benchmarks.csvtable import csv_line
from benchmarks.environment import cpu_name
from benchmarks.latency import (
    COLUMNS,
    CPU_SINCE,
    LEGACY_HEADERS,
    append_rows,
    cpu_names,
    current_cpu_rows,
    goals_markdown,
    import_rows,
    last_rows,
    latency_markdown,
    latency_rows,
    read_latency,
    rows_from_suite,
    suite_rounds,
    untrained_run_id,
)
from benchmarks.latency_plot import latency_figure
from benchmarks.leaderboard import LeaderboardError
from gkp.nn import GroupedKernelConv2d, GroupPlan


def small_grouped() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    plan = GroupPlan.from_lists([[2 * g, 2 * g + 1] for g in range(8)],
                                [[(g + i) % 16 for i in range(9)] for g in range(8)])  # fmt: skip
    pruned = copy.deepcopy(dense)
    pruned[2] = GroupedKernelConv2d.from_conv(dense[2], plan)
    return dense, pruned.eval()


CPU_BACKENDS = [b for b in BACKENDS if b != "compile"]


def grouped_case(backend: str):
    """(pruned network, input, its eager output) for a backend test; skips where it can't run."""
    if missing(backend):
        pytest.skip(missing(backend))
    _, pruned = small_grouped()
    x = torch.randn(2, 3, 12, 12)
    with torch.inference_mode():
        return pruned, x, pruned(x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_computes_what_eager_computes(backend):
    pruned, x, want = grouped_case(backend)
    fn, info = prepare(backend, pruned, x, threads=1)
    with torch.inference_mode():
        got = torch.as_tensor(fn(x))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert info["form"] in ("grouped", "masked-dense")
    assert isinstance(pruned[2], GroupedKernelConv2d) and pruned[2].backend == "torch"


@pytest.mark.parametrize("backend", ["autotune", "onnxruntime"])
def test_tuning_choices_are_cached_and_reused(backend):
    """The choice a backend makes (per-layer backends, or the network form) goes into the cache
    under this shape and thread count; the same call again reuses it untimed."""
    if missing(backend):
        pytest.skip(missing(backend))
    _, pruned = small_grouped()
    x = torch.randn(2, 3, 12, 12)
    cache: dict = {}
    _, first = prepare(backend, pruned, x, threads=1, cache=cache)
    (key,) = cache["forms"]  # the network form (runtimes) or layout (eager family) chosen
    assert "2x3x12x12" in key and "threads=1" in key and not first.get("cached")
    if backend == "autotune":  # per-layer choices, tuned in each layout
        assert set(cache["autotune"]) == {"nchw", "channels_last"}
        assert all(len(v) == 1 for v in cache["autotune"].values())
    fn, again = prepare(backend, pruned, x, threads=1, cache=cache)
    assert again["cached"] and again["form"] == first["form"]
    with torch.inference_mode():
        assert torch.allclose(torch.as_tensor(fn(x)), pruned(x), atol=1e-4, rtol=1e-4)
    prepare(backend, pruned, torch.randn(1, 3, 12, 12), threads=1, cache=cache)
    assert len(cache["forms"]) == 2  # another batch is another entry


@pytest.mark.parametrize("backend", ["eager", "autotune"])
def test_dense_runs_in_the_faster_layout_and_computes_the_same(backend):
    dense, _ = small_grouped()
    x = torch.randn(2, 3, 12, 12)
    cache: dict = {}
    fn, info = prepare(backend, dense, x, threads=1, cache=cache)
    assert info["form"] == "dense" and info["layout"] in ("nchw", "channels_last")
    assert set(info["layouts_ms"]) == {"nchw", "channels_last"}
    with torch.inference_mode():
        assert torch.allclose(fn(x), dense(x), atol=1e-5)
    _, again = prepare(backend, dense, x, threads=1, cache=cache)
    assert again["cached"] and again["layout"] == info["layout"]


def test_autotune_fuses_epilogues_in_dense_and_pruned_networks_alike():
    """``autotune`` times every network with each conv's ReLU taken into the conv call (here
    both convs), dense too, so its speed-ups compare like with like; the other eager backends
    do not."""
    from gkp.epilogue import ConvEpilogue

    dense, pruned = small_grouped()
    x = torch.randn(2, 3, 12, 12)
    for model in (dense, pruned):
        fn, info = prepare("autotune", model, x, threads=1)
        assert info["epilogues"] == 2
        net = fn if isinstance(fn, nn.Module) else next(
            c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, nn.Module)
        )  # fmt: skip
        assert sum(isinstance(m, ConvEpilogue) for m in net.modules()) == 2
        with torch.inference_mode():
            assert torch.allclose(torch.as_tensor(fn(x)), model(x), atol=1e-4, rtol=1e-4)
    assert "epilogues" not in prepare("eager", pruned, x, threads=1)[1]


def test_autotune_that_keeps_dense_everywhere_runs_plain_convs(monkeypatch):
    """When every layer keeps the masked dense conv, the network runs as plain convs (no
    per-layer dispatch: on a launch-bound GPU that dispatch alone is a few percent)."""
    from gkp import autotune as tune

    monkeypatch.setattr(
        tune,
        "_median_ms",
        lambda layer, b, x, rounds, threads, *_: {k: 2.0 - (k == "dense") for k in b},
    )
    _, pruned = small_grouped()
    x = torch.randn(2, 3, 12, 12)
    with torch.inference_mode():
        want = pruned(x)
    fn, info = prepare("autotune", pruned, x, threads=1)
    assert info["form"] == "masked-dense" and info["autotune"] == {"dense": 1}

    def boom(self, inp):
        raise AssertionError("a grouped layer ran")

    monkeypatch.setattr(GroupedKernelConv2d, "forward", boom)
    with torch.inference_mode():
        assert torch.allclose(torch.as_tensor(fn(x)), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "fused"])
@pytest.mark.parametrize("winner", ["nchw", "masked-dense|channels_last"])
def test_eager_family_deploys_the_faster_of_grouped_and_masked_dense(backend, winner, monkeypatch):
    """Like the runtimes, eager and fused race the masked dense network against the grouped
    one (both layouts) and deploy the faster; the losing form's median stays on record."""
    from gkp import metrics

    pruned, x, want = grouped_case(backend)
    raced = []

    def race(fns, example, **kw):
        raced.append(sorted(fns))
        return {k: 1.0 if k == winner else 2.0 for k in fns}

    monkeypatch.setattr(metrics, "fastest_of", race)
    fn, info = prepare(backend, pruned, x, threads=1)
    choices = ["channels_last", "masked-dense|channels_last", "masked-dense|nchw", "nchw"]
    assert raced == [choices] and set(info["layouts_ms"]) == set(choices)
    assert info["form"] == ("grouped" if winner == "nchw" else "masked-dense")
    assert info["layout"] == winner.rpartition("|")[2]
    if winner != "nchw":  # the masked dense network runs: no grouped layer is called

        def boom(self, inp):
            raise AssertionError("a grouped layer ran")

        monkeypatch.setattr(GroupedKernelConv2d, "forward", boom)
    with torch.inference_mode():
        assert torch.allclose(torch.as_tensor(fn(x)), want, atol=1e-4, rtol=1e-4)


def test_prepared_info_names_the_openmp_settings_and_choices_are_kept_apart(monkeypatch):
    """A network prepared with an OpenMP wait or binding setting in the environment says so
    (``info["openmp"]``, carried into the latency row's ``backend_info``), and its form choice,
    cached under another setting, is made again rather than reused."""
    from gkp import autotune as tune

    for name in tune.OPENMP_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    _, pruned = small_grouped()
    x = torch.randn(2, 3, 12, 12)
    cache: dict = {}
    _, info = prepare("eager", pruned, x, threads=1, tune_rounds=3, cache=cache)
    assert "openmp" not in info and "cached" not in info
    _, info = prepare("eager", pruned, x, threads=1, tune_rounds=3, cache=cache)
    assert info["cached"]
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    _, info = prepare("eager", pruned, x, threads=1, tune_rounds=3, cache=cache)
    assert info["openmp"] == {"OMP_WAIT_POLICY": "PASSIVE"} and "cached" not in info
    assert len(cache["forms"]) == 2


@pytest.mark.parametrize("backend", ["eager", "fused", "autotune"])
def test_a_network_of_the_dense_structure_runs_in_dense_layout_unraced(backend, monkeypatch):
    """Masked weights (the weight and kernel methods) leave dense's structure: such a network
    takes dense's faster layout without a race of its own, which could only let noise pick the
    slower one; any other structure still races its layouts."""
    from gkp import metrics

    dense, _ = small_grouped()
    masked = copy.deepcopy(dense)
    with torch.no_grad():
        masked[2].weight[:, ::2] = 0  # kernels removed, shapes kept
    x = torch.randn(2, 3, 12, 12)
    assert structure_digest(masked) == structure_digest(dense)
    raced = []

    def race(fns, example, **kw):
        raced.append(sorted(fns))
        return {k: 1.0 for k in fns}

    monkeypatch.setattr(metrics, "fastest_of", race)
    digest = structure_digest(dense)
    fn, info = prepare(backend, masked, x, threads=1, dense_layout="channels_last",
                       dense_structure=digest)  # fmt: skip
    assert raced == [] and info["layout"] == "channels_last" and info["layout_from"] == "dense"
    with torch.inference_mode():
        assert torch.allclose(torch.as_tensor(fn(x)), masked(x), atol=1e-4, rtol=1e-4)
    smaller = copy.deepcopy(dense)  # never run: the stubbed race only records its candidates
    smaller[2] = nn.Conv2d(16, 16, 1)  # another layer shape: another structure
    assert structure_digest(smaller) != digest
    _, info = prepare(backend, smaller, x, threads=1, dense_layout="channels_last",
                      dense_structure=digest)  # fmt: skip
    assert raced == [["channels_last", "nchw"]] and "layout_from" not in info


def test_eager_races_masked_dense_in_the_dense_layout_only_when_given(monkeypatch):
    """Masked dense runs dense's convs: given dense's faster layout, only that one is raced."""
    from gkp import metrics

    pruned, x, want = grouped_case("eager")
    raced = []

    def race(fns, example, **kw):
        raced.append(sorted(fns))
        return {k: 1.0 if k == "masked-dense|nchw" else 2.0 for k in fns}

    monkeypatch.setattr(metrics, "fastest_of", race)
    fn, info = prepare("eager", pruned, x, threads=1, dense_layout="nchw")
    assert raced == [["channels_last", "masked-dense|nchw", "nchw"]]
    assert info["form"] == "masked-dense" and info["layout"] == "nchw"
    with torch.inference_mode():
        assert torch.allclose(torch.as_tensor(fn(x)), want, atol=1e-4, rtol=1e-4)
    prepare("eager", pruned, x, threads=1, dense_layout="sideways")  # unknown: both raced
    assert raced[-1] == ["channels_last", "masked-dense|channels_last", "masked-dense|nchw",
                         "nchw"]  # fmt: skip


@pytest.mark.parametrize("winner", ["channels_last", "masked-dense|nchw"])
def test_autotune_decides_layout_and_dense_in_one_race(winner, monkeypatch):
    """autotune tunes each layout's layers, then one network race (the tuned layouts and the
    masked dense network in dense's layout) picks both the layout and tuned-or-dense: autotune's
    own network race is not run. A layout whose layers all kept dense is not raced twice."""
    from gkp import autotune as tune
    from gkp import metrics

    pruned, x, want = grouped_case("autotune")
    keep = {"nchw": "dense", "channels_last": "torch"}  # NCHW keeps dense everywhere

    def layer_ms(layer, backends, inp, rounds, threads, *_):
        best = keep["channels_last" if inp.is_contiguous(memory_format=torch.channels_last)
                    and not inp.is_contiguous() else "nchw"]  # fmt: skip
        return {b: 1.0 if b == best else 2.0 for b in backends}

    def no_network_race(*a, **k):
        raise AssertionError("autotune raced the network itself")

    raced = []

    def race(fns, example, **kw):
        raced.append((sorted(fns), kw["rounds"]))
        return {k: 1.0 if k == winner else 2.0 for k in fns}

    monkeypatch.setattr(tune, "_median_ms", layer_ms)
    monkeypatch.setattr(tune, "_whole_network_ms", no_network_race)
    monkeypatch.setattr(metrics, "fastest_of", race)
    fn, info = prepare("autotune", pruned, x, threads=1, dense_layout="nchw")
    assert raced == [(["channels_last", "masked-dense|nchw"], 5)]
    assert info["layout"] == winner.rpartition("|")[2]
    if winner == "channels_last":
        assert info["form"] == "grouped" and info["autotune"] == {"torch": 1}
    else:
        assert info["form"] == "masked-dense"
    with torch.inference_mode():
        assert torch.allclose(torch.as_tensor(fn(x)), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "ms,picked",
    [
        ({"grouped": 1.9, "masked-dense": 2.0}, "grouped"),  # 5% faster: grouped
        ({"grouped": 1.95, "masked-dense": 2.0}, "masked-dense"),  # 2.5%: within the margin
        ({"grouped": 2.1, "masked-dense": 2.0}, "masked-dense"),
        ({"nchw": 1.0, "channels_last": 1.98, "masked-dense|nchw": 1.02}, "masked-dense|nchw"),
        ({"nchw": 1.0, "channels_last": 0.9, "masked-dense|nchw": 1.0}, "channels_last"),
        ({"nchw": 1.0, "channels_last": 0.99}, "channels_last"),  # dense layouts: the fastest
    ],
)
def test_a_grouped_form_must_beat_masked_dense_by_the_margin(ms, picked):
    from benchmarks.backends import pick_form

    assert pick_form(ms) == picked


def test_runtimes_keep_masked_dense_within_the_margin(monkeypatch):
    from gkp import metrics

    pruned, x, want = grouped_case("onnxruntime")
    monkeypatch.setattr(
        metrics, "fastest_of", lambda fns, example, **kw: {"grouped": 0.99, "masked-dense": 1.0}
    )
    fn, info = prepare("onnxruntime", pruned, x, threads=1)
    assert info["form"] == "masked-dense" and info["forms_ms"]["grouped"] == 0.99
    assert torch.allclose(torch.as_tensor(fn(x)), want, atol=1e-4, rtol=1e-4)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        missing("tensorrt")


def good_row(**change):
    row = {
        "run_id": "untrained-0123456789ab", "model": "resnet56", "method": "gkp-l2",
        "config": '{"method":"gkp-l2"}', "input_shape": "3x32x32", "backend": "eager",
        "form": "grouped", "backend_info": {}, "device": "cpu", "batch": 1, "threads": 1,
        "rounds": 5, "dense_ms": 2.0, "dense_iqr_ms": 0.1, "pruned_ms": 1.0, "pruned_iqr_ms": 0.1,
        "speedup": 2.0, "macs_dense": 100, "macs": 50, "ideal": 2.0, "fraction_of_ideal": 1.0,
        "engine": "torch 2", "date": "2026-01-01T00:00:00Z", "command": "test",
    }  # fmt: skip
    row.update(change)
    return row


def test_rows_append_and_read_back(tmp_path):
    path = tmp_path / "latency.csv"
    assert append_rows(path, [good_row(), good_row(batch=64, backend="onnxruntime")]) == 2
    append_rows(path, [good_row(threads=2)])
    frame = read_latency(path)
    assert list(frame.columns) == list(COLUMNS)
    assert frame["batch"].tolist() == [1, 64, 1] and frame["threads"].tolist() == [1, 1, 2]
    assert frame["backend"].tolist() == ["eager", "onnxruntime", "eager"]


@pytest.mark.parametrize(
    "change,message",
    [({"backend": "tensorrt"}, "backend"), ({"speedup": -1.0}, "speedup"),
     ({"batch": "many"}, "batch"), ({"dense_ms": None}, "dense_ms is empty")],
)  # fmt: skip
def test_a_bad_row_appends_nothing(tmp_path, change, message):
    path = tmp_path / "latency.csv"
    append_rows(path, [good_row()])
    before = path.read_bytes()
    with pytest.raises(LeaderboardError, match=message):
        append_rows(path, [good_row(batch=2), good_row(**change)])
    assert path.read_bytes() == before


def test_a_malformed_file_is_named_and_left_alone(tmp_path):
    path = tmp_path / "latency.csv"
    append_rows(path, [good_row()])
    broken = path.read_bytes().replace(b",eager,", b",eagre,")
    path.write_bytes(broken)
    with pytest.raises(LeaderboardError, match="row 1.*backend"):
        read_latency(path)
    with pytest.raises(LeaderboardError, match="nothing appended"):
        append_rows(path, [good_row()])
    assert path.read_bytes() == broken


def test_a_gpu_runs_rows_are_imported_whole_or_not_at_all(tmp_path):
    gpu_run, dest = tmp_path / "gpu_latency.csv", tmp_path / "latency.csv"
    cuda = {"device": "cuda", "backend_info": {"gpu": "NVIDIA H200", "tf32": True}}
    append_rows(gpu_run, [good_row(**cuda), good_row(batch=64, **cuda)])
    append_rows(dest, [good_row()])
    assert import_rows(gpu_run, dest) == 2
    frame = read_latency(dest)
    assert frame["device"].tolist() == ["cpu", "cuda", "cuda"]
    assert frame["batch"].tolist() == [1, 1, 64]
    assert frame["backend_info"].iloc[2] == read_latency(gpu_run)["backend_info"].iloc[1]
    before = dest.read_bytes()
    gpu_run.write_bytes(gpu_run.read_bytes().replace(b",cuda,", b",tpu,", 1))
    named = r"gpu_latency.csv: .*nothing imported: row 1.*device: 'tpu'"
    with pytest.raises(LeaderboardError, match=named):
        import_rows(gpu_run, dest)
    with pytest.raises(LeaderboardError, match="no such latency CSV"):
        import_rows(tmp_path / "missing.csv", dest)
    assert dest.read_bytes() == before


def test_a_gpu_row_with_its_host_processor_replaces_one_without(tmp_path):
    path = tmp_path / "latency.csv"
    old = good_row(device="cuda", speedup=0.5, pruned_ms=4.0)
    new = good_row(device="cuda", speedup=1.0, pruned_ms=2.0, cpu_name="Intel(R) Xeon(R)")
    cpu = [good_row(cpu_name="AMD EPYC"), good_row(cpu_name="Intel(R) Xeon(R)", speedup=1.5)]
    append_rows(path, [old, *cpu, new])
    last = last_rows(read_latency(path))
    assert sorted(last["machine"]) == ["AMD EPYC", "Intel(R) Xeon(R)", "cuda"]
    assert last.loc[last["machine"] == "cuda", "speedup"].tolist() == [1.0]
    table = latency_markdown(read_latency(path))
    assert "0.50×" not in table and table.count("(cuda)") == 1


def test_latency_rows_time_dense_and_pruned_on_the_same_backend():
    dense, pruned = small_grouped()
    ident = {"run_id": "r1", "model": "m", "method": "gkp-l2", "config": "{}"}
    rows = latency_rows(dense, pruned, sample_shape=(3, 12, 12), backends=["eager"],
                        batches=[1, 4], threads=1, rounds=3, ident=ident)  # fmt: skip
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["ideal"] == pytest.approx(r["macs_dense"] / r["macs"]) and r["ideal"] > 1
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["pruned_ms"])
        assert r["fraction_of_ideal"] == pytest.approx(r["speedup"] / r["ideal"])
        assert r["speedup_low"] is None and r["speedup_high"] is None  # 3 rounds: too few
    # hand count: conv1 3*16*9*144, conv2 16*16*9*144 dense vs 16*9*9*144 grouped, linear 160
    assert rows[0]["macs_dense"] == 3 * 16 * 9 * 144 + 16 * 16 * 9 * 144 + 160
    assert rows[0]["macs"] == 3 * 16 * 9 * 144 + 16 * 9 * 9 * 144 + 160


def suite_json(tmp_path):
    def entry(method, median, macs, form):
        return {
            "stats": {"median": median, "iqr": 0.001, "rounds": 7},
            "extra_info": {
                "model": "resnet56", "method": method, "config": None if method == "dense"
                else '{"method":"gkp-l2"}', "backend": "onnxruntime", "form": form,
                "backend_info": {}, "input_shape": [3, 32, 32], "batch": 1, "threads": 2,
                "macs": macs, "macs_dense": 100, "device": "cpu", "engine": "onnxruntime 1",
            },
        }  # fmt: skip

    path = tmp_path / "bench.json"
    data = {"benchmarks": [entry("dense", 0.004, 100, "dense"),
                           entry("gkp-l2", 0.002, 50, "grouped")]}  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def test_suite_json_becomes_rows_and_the_figure_has_a_panel_per_backend(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["bench", "--from-json", str(suite_json(tmp_path)), "--save", "--out", str(out)]
    assert main(argv) == 0
    frame = read_latency(out / "latency.csv")
    assert len(frame) == 1
    row = frame.iloc[0]
    assert row["speedup"] == pytest.approx(2.0) and row["ideal"] == pytest.approx(2.0)
    assert row["run_id"] == untrained_run_id("resnet56", '{"method":"gkp-l2"}', [3, 32, 32])
    append_rows(out / "latency.csv", [good_row(backend="eager"), good_row(backend="openvino")])
    fig = latency_figure(out / "latency.csv")
    assert [ax.get_title() for ax in fig.axes] == ["eager", "onnxruntime", "openvino"]
    append_rows(out / "latency.csv", [good_row(backend="eager", device="cuda")])
    fig = latency_figure(out / "latency.csv")  # GPU rows get their own panel, after the CPU ones
    assert [ax.get_title() for ax in fig.axes] == ["eager", "onnxruntime", "openvino",
                                                   "eager (cuda)"]  # fmt: skip
    assert len(fig.axes[-1].lines) == 2 + 1  # the two guide lines and the one GPU point


def test_the_figure_leaves_out_cpu_rows_of_the_earlier_machine(tmp_path):
    path = tmp_path / "latency.csv"
    append_rows(path, [good_row(date="2026-11-27T12:00:00Z"),  # the AMD machine's
                       good_row(backend="openvino", date="2026-11-27T18:00:00Z"),
                       good_row(device="cuda", date="2026-11-27T12:00:00Z")])  # fmt: skip
    titles = [ax.get_title() for ax in latency_figure(path).axes]
    assert titles == ["eager", "openvino", "eager (cuda)"]
    titles = [ax.get_title() for ax in latency_figure(path, cpu_since=CPU_SINCE).axes]
    assert titles == ["openvino", "eager (cuda)"]  # GPU rows are kept whatever their date
    frame = current_cpu_rows(read_latency(path))
    assert list(frame["backend"]) == ["openvino", "eager"] and CPU_SINCE == "2026-11-27T17:00:00Z"


def test_rows_from_suite_skip_pairs_without_macs():
    assert rows_from_suite([{"model": "m", "ideal": None, "engine": None}], "cmd") == []


@pytest.mark.parametrize(
    "flag,message",
    [("tensorrt", "unknown backend 'tensorrt'")]
    + ([("openvino", "openvino is not installed")]
       if importlib.util.find_spec("openvino") is None else []),
)  # fmt: skip
def test_cli_rejects_bad_backends(tmp_path, capsys, flag, message):
    code = main(["bench", "--dataset", "synthetic", "--backends", flag, "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 2 and message in err
    assert not (tmp_path / "latency.csv").exists()


def test_interleaved_suite_entries_give_one_row_each(tmp_path):
    info = {
        "model": "resnet56", "method": "gkp-l2", "config": '{"method":"gkp-l2"}',
        "backend": "autotune", "form": "grouped", "backend_info": {"autotune": {"fused": 54}},
        "input_shape": [3, 32, 32], "batch": 64, "threads": 2, "macs": 50, "macs_dense": 100,
        "device": "cpu", "engine": "torch 2", "interleaved": True, "rounds": 9,
        "dense_ms": 30.0, "pruned_ms": 20.0, "dense_iqr_ms": 1.0, "pruned_iqr_ms": 1.0,
        "speedup": 1.5,
    }  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [
        {"stats": {"median": 0.05, "iqr": 0.001, "rounds": 9}, "extra_info": info}]}))  # fmt: skip
    out = tmp_path / "results"
    assert main(["bench", "--from-json", str(path), "--save", "--out", str(out)]) == 0
    row = read_latency(out / "latency.csv").iloc[0]
    assert row["speedup"] == 1.5 and row["ideal"] == 2.0 and row["fraction_of_ideal"] == 0.75
    assert row["dense_ms"] == 30.0 and row["rounds"] == 9 and row["backend"] == "autotune"
    assert row["cpu_name"] == ""  # neither the entry nor the file's machine_info names one
    older = {k: v for k, v in info.items() if k != "cpu_name"} | {"batch": 1}
    entries = [{"stats": {"median": 0.05, "iqr": 0.001, "rounds": 9}, "extra_info": e}
               for e in (info | {"cpu_name": "Suite CPU"}, older)]  # fmt: skip
    # the suite records its processor; an older suite's entries get the file's machine_info one
    machine = {"cpu": {"brand_raw": "Info CPU"}}
    path.write_text(json.dumps({"machine_info": machine, "benchmarks": entries}))
    assert main(["bench", "--from-json", str(path), "--save", "--out", str(out)]) == 0
    assert read_latency(out / "latency.csv")["cpu_name"].tolist() == ["", "Suite CPU", "Info CPU"]
    assert read_latency(out / "latency.csv")["speedup_low"].isna().all()  # none recorded
    entry = {"stats": {"median": 0.05, "iqr": 0.001, "rounds": 9},
             "extra_info": info | {"speedup_low": 1.4, "speedup_high": 1.6,
                                   "speedup_paired": 1.45}}  # fmt: skip
    path.write_text(json.dumps({"benchmarks": [entry]}))
    assert main(["bench", "--from-json", str(path), "--save", "--out", str(out)]) == 0
    last = read_latency(out / "latency.csv").iloc[-1]
    assert (last["speedup_low"], last["speedup_high"], last["speedup_paired"]) == (1.4, 1.6, 1.45)


def test_rows_record_the_processor_that_timed_them():
    dense, pruned = small_grouped()
    ident = {"run_id": "r1", "model": "m", "method": "gkp-l2", "config": "{}"}
    (row,) = latency_rows(dense, pruned, sample_shape=(3, 12, 12), backends=["eager"],
                          batches=[1], threads=1, rounds=3, ident=ident)  # fmt: skip
    assert row["cpu_name"] == cpu_name() != ""


def test_a_file_without_the_cpu_column_reads_and_is_upgraded_on_append(tmp_path):
    """latency.csv files older than ``cpu_name``: read with it empty; the next append writes the
    current header and keeps every old record byte for byte, with empty fields added (``cpu_name``
    and the later interval columns)."""
    path = tmp_path / "latency.csv"
    old = LEGACY_HEADERS[0]
    record = csv_line([good_row()[c] if c != "backend_info" else "{}" for c in old])
    path.write_bytes(csv_line(list(old)) + record)
    assert read_latency(path)["cpu_name"].tolist() == [""]
    append_rows(path, [good_row(cpu_name="AMD EPYC")])
    lines = path.read_bytes().splitlines(keepends=True)
    assert lines == [csv_line(list(COLUMNS)), record[:-1] + b",,,,\n", lines[2]]
    assert read_latency(path)["cpu_name"].tolist() == ["", "AMD EPYC"]


def test_tables_goals_and_figure_keep_processors_apart(tmp_path):
    """Rows of two CPUs never share a table line, a goal line or a figure panel."""
    path = tmp_path / "latency.csv"
    r56 = {"model": "resnet56", "backend": "autotune", "batch": 64, "threads": 2,
           "date": "2026-11-28T00:00:00Z"}  # fmt: skip
    append_rows(path, [good_row(**r56, speedup=1.5, dense_ms=3.0, fraction_of_ideal=0.75,
                                cpu_name="Xeon"),
                       good_row(**r56, speedup=1.2, dense_ms=2.4, fraction_of_ideal=0.6,
                                cpu_name="EPYC")])  # fmt: skip
    frame = read_latency(path)
    assert cpu_names(frame) == ["Xeon", "EPYC"]
    table = latency_markdown(frame)
    assert "| resnet56 (Xeon) | 64 | 2 | gkp-l2 | 2.00× | 1.50× |" in table
    assert "| resnet56 (EPYC) | 64 | 2 | gkp-l2 | 2.00× | 1.20× |" in table
    goals = goals_markdown(frame).splitlines()
    batch64 = [g for g in goals if g.startswith("| ResNet-56 GKP") and "batch 64" in g]
    assert batch64 == [
        "| ResNet-56 GKP (G=8, p=0.4375), autotune, batch 64 | ≥ 1.30× | Xeon | 2 | "
        "1.50–1.50× over 1 rows | yes |",
        "| ResNet-56 GKP (G=8, p=0.4375), autotune, batch 64 | ≥ 1.30× | EPYC | 2 | "
        "1.20–1.20× over 1 rows, 1 below (1 without an interval) | no |",
    ]
    fig = latency_figure(path)
    assert [ax.get_title() for ax in fig.axes] == ["autotune (Xeon)", "autotune (EPYC)"]
    assert [ax.get_subplotspec().rowspan.start for ax in fig.axes] == [0, 1]  # a row each
    assert all(len(ax.lines) == 2 + 1 for ax in fig.axes)  # guide lines and one point each
    one = read_latency(path).iloc[:1]  # one processor: plain titles and model cells
    assert "| resnet56 | 64 |" in latency_markdown(one)


@pytest.mark.parametrize("deploy", ["torch", "fused", "autotune"])
def test_leaderboard_timed_forms_compute_what_the_networks_compute(deploy):
    """What the leaderboard's latency columns time (benchmarks.measure.timed_forms) is the same
    function as the networks, for every --deploy; autotune's choices land in the cache given."""
    from benchmarks.measure import timed_forms

    dense, pruned = small_grouped()
    x = torch.randn(2, 3, 12, 12)
    cache: dict = {}
    also = {"masked_dense": copy.deepcopy(dense)}
    fns, picked = timed_forms(dense, pruned, deploy, x, threads=1, tune_cache=cache, also=also)
    assert set(fns) == {"dense", "pruned", "masked_dense"}
    with torch.inference_mode():
        for name, net in (("dense", dense), ("pruned", pruned), ("masked_dense", dense)):
            torch.testing.assert_close(fns[name](x), net(x), atol=1e-4, rtol=1e-4)
    if deploy == "autotune":  # the suite's autotune backend: layouts raced, epilogues fused
        assert picked["form"] in ("grouped", "masked-dense") and picked["epilogues"] == 2
        assert picked["dense_layout"] in ("nchw", "channels_last") and cache["forms"]
    else:
        assert cache == {}


def test_leaderboard_timed_forms_refuse_an_unknown_deploy():
    from benchmarks.measure import timed_forms

    dense, pruned = small_grouped()
    with pytest.raises(ValueError, match="unknown --deploy 'onnx'; choose one of torch, fused"):
        timed_forms(dense, pruned, "onnx", torch.randn(1, 3, 12, 12), threads=1)


def test_bench_text_names_the_layout_each_row_ran_in():
    """`gkp-bench bench` prints the input layout: a row's own memory format, else the layout the
    backend's race (suite rows) or the deploy (`bench --deploy autotune`) chose, else NCHW."""
    from benchmarks.commands import _layout

    assert _layout({"memory_format": "channels_last", "backend_info": {"layout": "nchw"}}) == (
        "channels_last"
    )
    assert _layout({"backend_info": {"layout": "channels_last"}}) == "channels_last"
    assert _layout({"deploy_choices": {"layout": "channels_last"}}) == "channels_last"
    assert _layout({"backend_info": None, "deploy_choices": {}}) == "nchw"


def test_rows_of_enough_rounds_carry_the_speedup_interval(monkeypatch):
    """The interval is the sign test's of the per-round ratios of the very rounds timed."""
    from gkp import metrics

    seen = {}
    real = metrics.time_interleaved

    def spy(*args, **kwargs):
        seen.update(real(*args, **kwargs))
        return seen

    monkeypatch.setattr(metrics, "time_interleaved", spy)
    dense, pruned = small_grouped()
    ident = {"run_id": "r1", "model": "m", "method": "gkp-l2", "config": "{}"}
    (row,) = latency_rows(dense, pruned, sample_shape=(3, 12, 12), backends=["eager"],
                          batches=[2], threads=1, rounds=10, ident=ident)  # fmt: skip
    d, p = seen["dense"].times_ms, seen["pruned"].times_ms
    assert len(d) == len(p) == 10 and row["dense_ms"] == seen["dense"].median_ms
    ratios = sorted(a / b for a, b in zip(d, p, strict=True))
    assert (row["speedup_low"], row["speedup_high"]) == (ratios[1], ratios[8])
    assert row["speedup_paired"] == (ratios[4] + ratios[5]) / 2  # the median of 10


@pytest.mark.parametrize("first_missing", ["speedup_low", "speedup_paired"])
def test_a_file_without_the_interval_columns_reads_and_is_upgraded_on_append(
    tmp_path, first_missing
):
    """Files from before the interval (or before the paired median): read with those columns
    empty; the next append writes the current header and pads the old records."""
    path = tmp_path / "latency.csv"
    old = COLUMNS[: COLUMNS.index(first_missing)]
    assert old in LEGACY_HEADERS and COLUMNS[-3:] == ("speedup_low", "speedup_high",
                                                      "speedup_paired")  # fmt: skip
    row = good_row(cpu_name="EPYC", speedup_low=1.8, speedup_high=2.2)
    record = csv_line([row[c] if c != "backend_info" else "{}" for c in old])
    path.write_bytes(csv_line(list(old)) + record)
    assert read_latency(path)[first_missing].isna().all()
    append_rows(path, [good_row(cpu_name="EPYC", speedup_low=1.9, speedup_high=2.1,
                                speedup_paired=2.0)])  # fmt: skip
    lines = path.read_bytes().splitlines(keepends=True)
    pad = b"," * (len(COLUMNS) - len(old))
    assert lines == [csv_line(list(COLUMNS)), record[:-1] + pad + b"\n", lines[2]]
    frame = read_latency(path)
    assert frame["speedup_paired"].tolist()[1] == 2.0 and frame["speedup_paired"].isna()[0]
    assert frame["speedup_high"].tolist()[1] == 2.1
    for column in ("speedup_low", "speedup_paired"):
        with pytest.raises(LeaderboardError, match=column):
            append_rows(path, [good_row(**{column: "wide"})])


def test_goals_count_the_rows_below_beyond_noise(tmp_path):
    """A row under a goal is below it beyond noise when its interval's upper end is under it too;
    one whose interval reaches the goal is not; one without an interval is counted apart."""
    path = tmp_path / "latency.csv"
    base = {"model": "resnet50", "method": "filter-l1", "batch": 16, "threads": 2,
            "date": "2026-11-29T00:00:00Z", "cpu_name": "EPYC"}  # fmt: skip
    rows = [good_row(**base, run_id=f"r{i}", speedup=s, speedup_low=lo, speedup_high=hi)
            for i, (s, lo, hi) in enumerate([(0.95, 0.93, 0.97), (0.97, 0.94, 0.99),
                                             (0.96, None, None), (1.01, 0.99, 1.03)])]  # fmt: skip
    append_rows(path, rows)
    (line,) = [g for g in goals_markdown(read_latency(path)).splitlines() if "every method" in g]
    assert line == ("| every method, every backend | ≥ 0.98× | EPYC | 2 | 0.95–1.01× over 4 rows, "
                    "3 below (1 beyond noise, 1 without an interval) | no |")  # fmt: skip
    append_rows(path, [good_row(**base, run_id="r2", speedup=0.96, speedup_low=0.9,
                                speedup_high=0.99)])  # the last row of r2 counts  # fmt: skip
    (line,) = [g for g in goals_markdown(read_latency(path)).splitlines() if "every method" in g]
    assert line.endswith("3 below (1 beyond noise) | no |")


def test_the_figure_draws_each_rows_interval_where_it_has_one(tmp_path):
    path = tmp_path / "latency.csv"
    append_rows(path, [good_row(speedup=1.9, speedup_low=1.8, speedup_high=2.05),
                       good_row(run_id="untrained-other", speedup=1.5)])  # fmt: skip
    (ax,) = latency_figure(path).axes
    assert len(ax.lines) == 2 + 2  # the guide lines and the two points
    (bars,) = ax.collections  # one bar: the second row has no interval
    assert [seg.tolist() for seg in bars.get_segments()] == [[[2.0, 1.8], [2.0, 2.05]]]


@pytest.mark.parametrize(
    "seconds,once,rounds",
    [(1, 0.006, 30), (1, 0.05, 20), (1, 0.17, 6), (1, 0.2, 6), (1, 0.25, 6), (1, 0.33, 6),
     (1, 0.34, 3), (1, 0.7, 3), (1, 1.4, 3), (8, 0.17, 30), (8, 1.4, 6), (20, 1.4, 14),
     (1, 0.0, 30)],
)  # fmt: skip
def test_suite_rounds_give_an_interval_where_six_fit_twice_the_budget(seconds, once, rounds):
    assert suite_rounds(seconds, once) == rounds
