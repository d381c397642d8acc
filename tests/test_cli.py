"""The command line end to end on synthetic data, and its errors on bad input."""

import json

import pytest

from benchmarks.cli import main
from benchmarks.leaderboard import read_leaderboard
from benchmarks.measure import bench_key


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One smoke-recipe `run` on synthetic data: baseline, prune, fine-tune, row, plots."""
    root = tmp_path_factory.mktemp("cli")
    args = [
        "--dataset",
        "synthetic",
        "--recipe",
        "smoke",
        "--out",
        str(root / "results"),
        "--runs",
        str(root / "runs"),
        "--bench-rounds",
        "2",
        "--no-progress",
        "--method",
        "gkp-l2",
    ]
    assert main(["run", *args, "--json"]) == 0
    return root, args


def test_run_writes_row_and_figures(pipeline):
    root, _ = pipeline
    frame = read_leaderboard(root / "results" / "leaderboard.csv")
    assert len(frame) == 1
    row = frame.iloc[0]
    assert row["method"] == "gkp-l2" and row["source"] == "measured"
    assert row["macs"] == 23_003_776  # METHODS.md: resnet20 after G=8, p=0.4375 is 23.00 M MACs
    assert row["command"].startswith("gkp-bench run --dataset synthetic")
    assert row["speedup_b1"] > 0 and row["threads"] >= 1
    figures = sorted(p.name for p in (root / "results" / "figures").iterdir())
    assert "acc_vs_macs_resnet20_synthetic.png" in figures


def test_prune_resumes_from_saved_steps(pipeline, capsys):
    root, args = pipeline
    base = root / "runs" / "synthetic-resnet20-smoke-s0" / "final.pt"
    stamp = base.stat().st_mtime_ns
    code, out, _ = run_cli(capsys, "prune", *args, "--json")
    assert code == 0
    assert json.loads(out)["top1"] is not None
    assert base.stat().st_mtime_ns == stamp  # the baseline was loaded, not retrained
    assert len(read_leaderboard(root / "results" / "leaderboard.csv")) == 2


def test_autotuned_choices_are_saved_with_the_model(pipeline, capsys):
    """--deploy autotune (the default): the choices of both timed batches (layout race and
    per-layer picks, keyed by where they were made) go into final.pt; preparing the rebuilt
    model with them times nothing."""
    import torch

    from benchmarks.backends import prepare
    from gkp.checkpoint import load_checkpoint, rebuild
    from gkp.models import get_model

    root, args = pipeline
    argv = [*args, "--target", "0.3", "--deploy", "autotune", "--threads", "1", "--json"]
    code, out, _ = run_cli(capsys, "prune", *argv)
    assert code == 0, out
    assert json.loads(json.loads(out)["prune_info"])["deploy"]["deploy"] == "autotune"
    saved = [
        load_checkpoint(p)
        for p in (root / "runs").rglob("final.pt")
        if "autotune" in torch.load(p, weights_only=True)
        and "0.3" in json.dumps(torch.load(p, weights_only=True)["meta"])
    ]
    assert len(saved) == 1
    ckpt = saved[0]
    forms = ckpt["autotune"]["forms"]
    for shape in ("1x3x32x32", "32x3x32x32"):  # batch 1 and --bench-batch
        assert any(f"|{shape}|" in k for k in forms), (shape, list(forms))
    model = rebuild(get_model("resnet20", num_classes=10), ckpt["structure"])
    model.load_state_dict(ckpt["state_dict"])
    x = torch.randn(32, 3, 32, 32)
    _, info = prepare("autotune", model.eval(), x, threads=1, cache=ckpt["autotune"])
    assert info["cached"] and "layouts_ms" not in info  # reused, not raced again


def test_deploy_is_part_of_the_run_id(pipeline, capsys):
    """The same pruned, fine-tuned model timed with another --deploy is a run of its own (a new
    row, the fine-tuning not repeated); the summary keeps the two deploys apart."""
    root, args = pipeline
    before = read_leaderboard(root / "results" / "leaderboard.csv")
    ft = next((root / "runs").rglob("finetune*"), None)
    stamp = {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("*.pt")}
    code, out, _ = run_cli(capsys, "run", *args, "--deploy", "torch", "--json")
    assert code == 0, out
    after = read_leaderboard(root / "results" / "leaderboard.csv")
    assert len(after) == len(before) + 1
    new = after.iloc[-1]
    assert new["run_id"] not in set(before["run_id"])
    assert "deploy" not in json.loads(new["prune_info"])  # torch rows say nothing, as before
    base = before[(before["method"] == "gkp-l2") & (before["target"].isna())].iloc[0]
    assert new["top1"] == base["top1"]  # the same fine-tuned model ...
    changed = [p for p, t in stamp.items() if p.exists() and p.stat().st_mtime_ns != t]
    assert not [p for p in changed if "finetune" in p.name or "epoch" in p.name], (changed, ft)
    code, out, _ = run_cli(capsys, "leaderboard", "summary", "--out", str(root / "results"),
                           "--json")  # fmt: skip
    assert code == 0, out
    deploys = {r["deploy"] for r in json.loads(out) if r["method"] == "gkp-l2"}
    assert deploys == {"autotune", "torch"}


def test_listing_commands(capsys):
    code, out, _ = run_cli(capsys, "methods", "--json")
    assert code == 0 and "gkp-l2" in {m["name"] for m in json.loads(out)}
    code, out, _ = run_cli(capsys, "models", "--json")
    assert "resnet56" in json.loads(out)
    code, out, _ = run_cli(capsys, "datasets")
    assert "fashion-mnist" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["prune", "--method", "nope"], "unknown method 'nope'; known methods: "),
        (["prune", "--model", "resnet7"], "unknown model 'resnet7'"),
        (["prune", "--dataset", "mnist3"], "mnist3"),
        (["prune", "--target", "1.5"], "outside (0, 1)"),
        (["prune", "--recipe", "long"], "unknown recipe"),
        (["prune", "--option", "noequals"], "KEY=VALUE"),
    ],
)
def test_bad_input_is_a_clear_error(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err


def prune_in(capsys, folder):
    """`gkp-bench prune` on synthetic/smoke with runs and results in ``folder``."""
    args = ["--dataset", "synthetic", "--recipe", "smoke", "--runs", str(folder)]
    return run_cli(capsys, "prune", *args, "--out", str(folder))


def test_missing_baseline_names_the_command(tmp_path, capsys):
    code, _, err = prune_in(capsys, tmp_path)
    assert code == 2 and "gkp-bench train --model resnet20 --dataset synthetic" in err


def test_corrupt_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "synthetic-resnet20-smoke-s0"
    run_dir.mkdir()
    (run_dir / "final.pt").write_bytes(b"\x00garbage")
    code, _, err = prune_in(capsys, tmp_path)
    assert code == 2 and "corrupt" in err


def test_groups_not_dividing(pipeline, capsys, tmp_path):
    root, args = pipeline
    args = [a if a != str(root / "results") else str(tmp_path) for a in args]
    code, _, err = run_cli(capsys, "prune", *args, "--groups", "5")
    assert code == 2 and "do not divide" in err
    assert not (tmp_path / "leaderboard.csv").exists()


def test_malformed_leaderboard_is_reported_and_kept(tmp_path, capsys):
    bad = tmp_path / "leaderboard.csv"
    bad.write_text("method,top1\ngkp-l2,not-a-number\n")
    before = bad.read_bytes()
    code, _, err = run_cli(capsys, "leaderboard", "validate", "--out", str(tmp_path))
    assert code == 2 and "leaderboard.csv" in err
    assert bad.read_bytes() == before


def test_bench_from_pytest_benchmark_json(tmp_path, capsys):
    def entry(method, median):
        return {
            "stats": {"median": median, "iqr": 0.001},
            "extra_info": {"model": "resnet56", "method": method, "batch": 1, "threads": 2},
        }

    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [entry("dense", 0.010), entry("gkp-l2", 0.020)]}))
    code, out, _ = run_cli(capsys, "bench", "--from-json", str(path), "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert row["speedup"] == pytest.approx(0.5)
    path.write_text("{not json")
    code, _, err = run_cli(capsys, "bench", "--from-json", str(path))
    assert code == 2 and "pytest-benchmark" in err


def test_overrides_and_retrained_baselines_are_not_mixed_up(pipeline, capsys):
    root, args = pipeline
    runs = root / "runs"
    train_args = [a for a in args if a not in ("--bench-rounds", "2", "--method", "gkp-l2")]
    # a recipe override trains into its own folder, never reusing the plain smoke baseline
    code, out, _ = run_cli(capsys, "train", *train_args, "--epochs", "1", "--json")
    assert code == 0
    assert json.loads(out)["run_dir"] != str(runs / "synthetic-resnet20-smoke-s0")
    # retraining the baseline makes the old pruned model stale: a clear error, not silent reuse
    code, _, _ = run_cli(capsys, "train", *train_args, "--restart")
    assert code == 0
    snaps = sorted(p.name for p in (runs / "synthetic-resnet20-smoke-s0" / "snapshots").iterdir())
    assert snaps == ["epoch_001.pt"]  # smoke: 2 epochs, window 1-1; nothing stale left
    code, _, err = run_cli(capsys, "prune", *args)
    assert code == 2 and "older baseline" in err and "--restart" in err


def test_latency_columns_from_benchmark_json(pipeline, capsys, tmp_path):
    root, args = pipeline

    def entry(method, batch, median):
        info = {
            "model": "resnet20",
            "method": method,
            "config": bench_key(method, None, {}) if method != "dense" else None,
            "input_shape": [3, 32, 32],
            "device": "cpu",
            "batch": batch,
            "threads": 2,
        }
        return {"stats": {"median": median, "iqr": 0.0001}, "extra_info": info}

    bench = tmp_path / "bench.json"
    entries = [
        entry("dense", 1, 0.004),
        entry("gkp-l2", 1, 0.008),
        entry("dense", 32, 0.040),
        entry("gkp-l2", 32, 0.050),
    ]
    bench.write_text(json.dumps({"benchmarks": entries}))
    code, out, _ = run_cli(
        capsys, "prune", *args, "--restart", "--latency-json", str(bench), "--json"
    )
    assert code == 0
    row = json.loads(out)
    assert row["latency_b1_ms"] == pytest.approx(8.0) and row["speedup_b1"] == pytest.approx(0.5)
    assert row["bench_batch"] == 32 and row["speedup_bN"] == pytest.approx(0.8)
    assert "deploy" not in json.loads(row["prune_info"])  # nothing was deployed here ...
    code, out, _ = run_cli(capsys, "prune", *args, "--deploy", "torch", "--json")
    assert code == 0 and json.loads(out)["run_id"] == row["run_id"]  # ... nor is it in the id


@pytest.mark.parametrize(
    "command",
    [
        "methods",
        "models",
        "datasets",
        "recipes",
        "train",
        "prune",
        "bench",
        "run",
        "leaderboard",
        "plot",
    ],
)
def test_every_command_has_help_and_json(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "--json" in capsys.readouterr().out


def test_bench_untrained_reports_ratios(capsys):
    code, out, _ = run_cli(
        capsys,
        "bench",
        "--dataset",
        "synthetic",
        "--bench-rounds",
        "2",
        "--bench-batch",
        "4",
        "--threads",
        "1",
        "--json",
    )
    assert code == 0
    rows = json.loads(out)
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["pruned_ms"])
        assert r["threads"] == 1
        assert r["speedup_low"] is None and r["speedup_high"] is None  # 2 rounds: too few
        assert r["speedup_paired"] > 0


def test_bench_text_gives_the_speedup_interval_with_enough_rounds(capsys):
    code, out, _ = run_cli(capsys, "bench", "--dataset", "synthetic", "--bench-rounds", "6",
                           "--bench-batch", "2", "--threads", "1")  # fmt: skip
    assert code == 0
    lines = [line for line in out.splitlines() if "speed-up" in line]
    assert len(lines) == 2
    for line in lines:  # 6 rounds: the smallest and the largest per-round speed-up
        low, high = (float(v) for v in line.split(" [")[1].split("]")[0].split("–"))
        paired = float(line.split("(paired x")[1].split(" ")[0])
        assert 0 < low <= float(line.split("speed-up x")[1].split(" ")[0]) <= high
        assert low <= paired <= high


def test_tmi_without_snapshots_names_the_command(pipeline, capsys):
    root, args = pipeline
    snaps = root / "runs" / "synthetic-resnet20-smoke-s0" / "snapshots"
    moved = snaps.with_name("snapshots.away")
    snaps.rename(moved)
    try:
        code, _, err = run_cli(capsys, "prune", *args, "--method", "tmi-gkp")
    finally:
        moved.rename(snaps)
    assert code == 2 and "needs training snapshots" in err and "gkp-bench train" in err


def test_main_job_compares_one_method_per_granularity(tmp_path, capsys):
    from benchmarks.compare import DEFAULT_METHODS, DEFAULT_TARGET

    argv = ["run", "--dataset", "synthetic", "--recipe", "smoke", "--no-progress"]
    argv += ["--bench-rounds", "2", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    frame = read_leaderboard(tmp_path / "leaderboard.csv")
    assert sorted(frame["method"]) == sorted(DEFAULT_METHODS)
    assert set(frame["granularity"]) == {"weight", "kernel", "grouped_kernel", "filter", "channel"}
    assert set(frame["target"]) == {DEFAULT_TARGET} and frame["run_id"].is_unique
    assert frame["top1_dense"].nunique() == 1  # one baseline for all
    for method in DEFAULT_METHODS:
        assert any(line.startswith(method) for line in out.splitlines())
    # every method met the common target within one point (masked ones in non-zero MACs)
    masked = frame["macs_nonzero"] < frame["macs"]
    removed = (1 - frame["macs_nonzero"] / frame["macs_dense"]).where(
        masked, frame["macs_reduction_pct"] / 100
    )
    assert ((removed - DEFAULT_TARGET).abs() <= 0.012).all(), removed.tolist()
    assert (frame.loc[masked, "macs"] == frame.loc[masked, "macs_dense"]).all()
    # resumable: a second run finds every run already recorded and appends nothing
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "0 row(s) appended" in out
    assert len(read_leaderboard(tmp_path / "leaderboard.csv")) == len(DEFAULT_METHODS)
