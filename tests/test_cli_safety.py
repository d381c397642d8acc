"""Bad input is refused up front in one line; run folders, resumes and latency JSON are bound to
their run; nothing already written is touched."""

import json

import pytest
import torch

from benchmarks import commands
from benchmarks.cli import build_parser, main
from benchmarks.measure import bench_key
from benchmarks.runner import RunConfig
from gkp.checkpoint import load_checkpoint, save_checkpoint
from gkp.recipes import get_recipe

SMOKE = ["--dataset", "synthetic", "--recipe", "smoke", "--no-progress"]
BENCH = ["--bench-rounds", "2"]  # prune and run only


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke baseline and one pruned + fine-tuned gkp-l2 run, in a folder of their own."""
    root = tmp_path_factory.mktemp("safety")
    folders = ["--runs", root / "runs", "--out", root / "results"]
    args = [*SMOKE, *BENCH, *folders]
    assert main([str(a) for a in ["prune", *args]]) == 2  # no baseline yet
    assert main([str(a) for a in ["train", *SMOKE, *folders[:2]]]) == 0
    assert main([str(a) for a in ["prune", *args]]) == 0
    return root, args


def one_line_error(code, out, err):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--epochs", "0"], "--epochs must be at least 1"),
        (["train", "--epochs", "-3"], "--epochs must be at least 1"),
        (["prune", "--ft-epochs", "-1"], "--ft-epochs must be at least 0"),
        (["prune", "--threads", "-1"], "--threads must be at least 1"),
        (["prune", "--bench-rounds", "0"], "--bench-rounds must be at least 1"),
        (["prune", "--bench-batch", "0"], "--bench-batch must be at least 1"),
        (["train", "--seed", str(2**70)], "--seed must be in"),
        (["train", "--seed", "-1"], "--seed must be in"),
        (["train", "--device", "tpu"], "--device 'tpu'"),
        (["prune", "--model", "x" * 5000], "unknown model"),
        (["prune", "--option", "a" * 300 + "=1"], "unknown option"),
        (["prune", "--option", "groups=[8]"], "groups"),
        (["prune", "--option", "groups=2.5"], "groups"),
        (["prune", "--option", "rate=null"], "rate"),
        (["prune", "--option", "rate=0.8.1"], "rate"),
        (["prune", "--option", "all_bottleneck_convs=maybe"], "all_bottleneck_convs"),
        (["prune", "--option", 'layers=["nope"]'], "layers"),
        (["prune", "--option", "layers=7"], "layers"),
        (["prune", "--method", "tmi-gkp", "--option", "equal_size=sometimes"], "equal_size"),
        (["prune", "--method", "sr-gkp", "--option", "beam_width=0"], "beam_width"),
        (["prune", "--option", "bad key=1"], "not a knob name"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    command, flags = argv[0], argv[1:]
    argv = [command, *SMOKE, "--runs", tmp_path / "runs"]
    if command != "train":
        argv += [*BENCH, "--out", tmp_path / "results"]
    argv += flags  # last, so the bad value wins
    err = one_line_error(*run_cli(capsys, *argv))
    assert message in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(capsys, tmp_path):
    err = one_line_error(*run_cli(capsys, "train", *SMOKE, "--device", "cuda", "--runs", tmp_path))
    assert "no CUDA GPU" in err and "--device cpu" in err


def test_json_errors_are_json(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", *SMOKE, "--epochs", "0", "--json", "--runs", tmp_path)
    assert code == 2
    assert json.loads(out) == {"command": "train", "error": "--epochs must be at least 1, got 0"}


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def broken(args):
        raise KeyError("model")

    monkeypatch.setattr(commands, "dispatch", broken)
    with pytest.raises(KeyError):
        main(["methods"])


def test_output_folders_must_be_writable_folders(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv in (["train", "--runs", a_file], ["prune", *BENCH, "--out", a_file / "sub"]):
        err = one_line_error(*run_cli(capsys, *argv, *SMOKE))
        assert str(a_file) in err
    assert a_file.read_text() == "x"


def test_groups_are_checked_before_the_baseline_is_trained(capsys, tmp_path):
    argv = [
        "run",
        *SMOKE,
        *BENCH,
        "--method",
        "gkp-l2",
        "--groups",
        "3",
        "--runs",
        tmp_path / "runs",
        "--out",
        tmp_path,
    ]
    err = one_line_error(*run_cli(capsys, *argv))
    assert "3 groups do not divide" in err
    assert not list(tmp_path.rglob("*.pt"))


def config(*argv):
    args = build_parser().parse_args(["prune", *map(str, argv)])
    args.command_line = "test"
    return commands.config(args)


def test_names_are_case_normalised():
    a = config("--dataset", "SYNTHETIC", "--model", "ResNet20", "--method", "GKP-L2")
    b = config("--dataset", "synthetic", "--model", "resnet20", "--method", "gkp-l2")
    assert (a.dataset, a.model, a.method) == ("synthetic", "resnet20", "gkp-l2")
    assert a.prune_dir() == b.prune_dir()


def test_option_text_never_reaches_paths(tmp_path):
    recipe = get_recipe("smoke")
    for value in ("/../../../../etc", "../" * 40, "x" * 1000, "a/b\\c\x00d"):
        cfg = RunConfig(runs_dir=tmp_path, recipe=recipe, native={"layers": value})
        folder = cfg.prune_dir()
        assert folder.parent == cfg.baseline_dir() / "pruned"
        assert folder.resolve().parent == (cfg.baseline_dir() / "pruned").resolve()
        assert len(folder.name) < 80 and "/" not in folder.name and ".." not in folder.name
    a = RunConfig(runs_dir=tmp_path, recipe=recipe, native={"rate": 0.5})
    b = RunConfig(runs_dir=tmp_path, recipe=recipe, native={"rate": "0.5"})
    assert a.prune_dir() != b.prune_dir()  # the digest, not the readable prefix, decides


def test_finetune_overrides_keep_the_baseline_folder():
    plain = config(*SMOKE)
    longer = config(*SMOKE, "--ft-epochs", "5")
    assert longer.baseline_dir() == plain.baseline_dir()
    assert longer.prune_dir() != plain.prune_dir()
    assert config(*SMOKE, "--epochs", "5").baseline_dir() != plain.baseline_dir()


@pytest.fixture
def pruned_file(trained):
    """The trained run's pruned.pt, restored after the test changes it."""
    root, args = trained
    path = config(*args[:-4], "--runs", root / "runs").prune_dir() / "pruned.pt"
    original = path.read_bytes()
    yield path
    path.write_bytes(original)


def test_finetune_resume_is_bound_to_the_pruned_model(trained, pruned_file, capsys):
    _, args = trained
    path = pruned_file
    saved = load_checkpoint(path)
    state = saved["state_dict"]
    key = next(k for k in state if k.endswith("conv.weight"))
    state[key] = state[key] + 1.0  # pruned.pt re-made with other weights
    save_checkpoint(path, {k: v for k, v in saved.items() if k != "format"})
    err = one_line_error(*run_cli(capsys, "prune", *args))
    assert "checkpoint.pt belongs to another run" in err and "pruned" in err


def test_a_pruned_file_of_another_model_is_refused(trained, pruned_file, capsys, tmp_path):
    _, args = trained
    path = pruned_file
    saved = load_checkpoint(path)
    saved["meta"] = {**saved["meta"], "model": "resnet32"}
    save_checkpoint(path, {k: v for k, v in saved.items() if k != "format"})
    out = tmp_path / "results"
    err = one_line_error(*run_cli(capsys, "prune", *args[:-2], "--out", out))
    assert "model 'resnet32', this run needs 'resnet20'" in err
    assert not (out / "leaderboard.csv").exists()


def test_mismatched_latency_json_is_refused_before_work(trained, capsys, tmp_path):
    root, args = trained

    def entry(method, batch, config):
        info = {
            "model": "resnet20",
            "method": method,
            "config": config,
            "batch": batch,
            "threads": 1,
            "input_shape": [3, 32, 32],
            "device": "cpu",
        }
        return {"stats": {"median": 0.01, "iqr": 0.001}, "extra_info": info}

    key = bench_key("gkp-l2", None, {"groups": 8, "rate": 0.4375})
    bench = tmp_path / "bench.json"
    entries = [
        entry(m, b, key if m != "dense" else None) for m in ("dense", "gkp-l2") for b in (1, 8)
    ]
    bench.write_text(json.dumps({"benchmarks": entries}))
    out = tmp_path / "results"
    argv = ["prune", *args[:-2], "--out", out, "--latency-json", bench]
    err = one_line_error(*run_cli(capsys, *argv, "--target", "0.6"))
    assert "another configuration" in err
    code, _, err = run_cli(capsys, *argv, "--rate", "0.4375", "--groups", "8")
    assert code == 0, err
    code, _, err = run_cli(capsys, *argv, "--rate", "0.4375", "--groups", "8", "--device", "cpu")
    assert code == 0, err


def test_rows_record_run_id_and_commits(trained):
    root, _ = trained
    from benchmarks.leaderboard import read_leaderboard

    row = read_leaderboard(root / "results" / "leaderboard.csv").iloc[0]
    assert len(row["run_id"]) == 16
    assert row["prune_commit"] == ""  # pruned and fine-tuned by the same commit
    info = json.loads(row["prune_info"])
    assert set(info) == {"timed_form", "deploy"}  # nothing else to say
    assert info["timed_form"] == "grouped conv" and info["deploy"]["deploy"] == "autotune"
    assert set(info["deploy"]) == {"deploy", "b1", "bN"}  # what the default deploy chose
    assert json.loads(row["options"])["groups"] == 8


def test_a_knob_one_compared_method_lacks_names_that_method(capsys, tmp_path):
    argv = ["run", *SMOKE, *BENCH, "--groups", "4", "--runs", tmp_path, "--out", tmp_path]
    err = one_line_error(*run_cli(capsys, *argv))
    assert "weight-magnitude: unknown option(s) groups" in err
    assert not list(tmp_path.rglob("*.pt"))


def test_row_records_the_commit_that_pruned_when_it_differs(trained, pruned_file, capsys):
    _, args = trained
    saved = load_checkpoint(pruned_file)
    saved["commit"] = "0123abcd4567"  # pruned by another commit than the one fine-tuning now
    save_checkpoint(pruned_file, {k: v for k, v in saved.items() if k != "format"})
    code, out, err = run_cli(capsys, "prune", *args, "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["prune_commit"] == "0123abcd4567" and row["git_commit"] != row["prune_commit"]


def test_dropped_candidates_and_snapshots_reach_prune_info():
    from benchmarks.runner import decisions

    info = {
        "layers": {
            "a": {"dropped_candidates": {"tsne_dbscan": "no eps gives 4 clusters"}},
            "b": {"dropped_candidates": {}},
        },
        "snapshots": ["epoch_001.pt", "epoch_002.pt"],
    }
    assert decisions(info) == {
        "dropped_candidates": {"a": {"tsne_dbscan": "no eps gives 4 clusters"}},
        "snapshots": 2,
    }
    assert decisions({"layers": {"a": {"n_keep": 9}}}) == {}


def test_progress_never_reaches_stdout_under_json(capsys, tmp_path):
    argv = ["train", "--dataset", "synthetic", "--recipe", "smoke", "--runs", tmp_path, "--json"]
    code, out, err = run_cli(capsys, *argv)  # progress on: bars and epoch lines go to stderr
    assert code == 0, err
    assert json.loads(out)["top1"] is not None
