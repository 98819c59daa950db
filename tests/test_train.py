"""Training CLI: train → checkpoint → resume → eval, kill/resume, refused pickles, missing data, DDP.

Tiny models on scikit-learn's digits (8×8) or idx files the tests write; seconds each.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("yaml")
pytest.importorskip("sklearn")

from helpers import TINY_TRAIN_ARGS  # noqa: E402

from terminator.cli import main  # noqa: E402
from terminator.train import TrainConfig, load_checkpoint, load_config, load_dataset  # noqa: E402
from terminator.train.config import parse_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "terminator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=ROOT,
    )


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: digits\nepochs: 3\nmodel:\n  global_hidden: 16\n  mode: dot\n")
    cfg = load_config(path, parse_set(["epochs=5", "model.global_hidden=8", "betas=[0.4, 0.9]"]))
    assert cfg.dataset == "digits" and cfg.epochs == 5 and cfg.betas == (0.4, 0.9)
    assert cfg.model == {"global_hidden": 8, "mode": "dot"}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown configuration keys"):
        load_config(None, {"epoch": 3})


def test_config_optimizers_betas_and_numbers_written_without_a_dot(tmp_path):
    assert TrainConfig().betas == (0.5, 0.95) and TrainConfig(optimizer="kar2").betas == (0.5, 0.95)
    assert TrainConfig(optimizer="adam").betas == (0.9, 0.999)
    # YAML 1.1 reads 2e-3 as a string
    cfg = load_config(None, parse_set(["lr=2e-3", "l2=1e-4", "warmup_epochs=2"]))
    assert cfg.lr == 2e-3 and cfg.l2 == 1e-4 and isinstance(cfg.warmup_epochs, float)
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5E-3\nmodel:\n  omega_0: 1e3\n  channels: [1, 4]\n")
    cfg = load_config(path, parse_set(["model.global_hidden=8", "val_fraction=2e-1"]))
    assert cfg.lr == 5e-3 and cfg.model["omega_0"] == 1000.0 and isinstance(cfg.model["omega_0"], float)
    assert cfg.model["channels"] == [1, 4] and cfg.model["global_hidden"] == 8 and cfg.val_fraction == 0.2
    with pytest.raises(ValueError, match="lr must be a number, got 'fast'"):
        TrainConfig(lr="fast")
    with pytest.raises(ValueError, match="optimizer must be 'kar3', 'kar2' or 'adam', got 'sgd'"):
        TrainConfig(optimizer="sgd")


def test_adam_run_resumes_exactly(tmp_path):
    """Adam's moments are saved with the run: stop after 1 epoch + resume equals 2 epochs at once."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--dataset", "digits", "--epochs", "2", "--set", "optimizer=adam", "--set", "lr=2e-3", *TINY_TRAIN_ARGS]
    assert main(["train", "--out", str(a), "--set", "stop_after=1", *args]) == 0
    assert main(["train", "--out", str(a), "--resume"]) == 0
    assert main(["train", "--out", str(b), *args]) == 0
    sa, sb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert sa["epoch"] == sb["epoch"] == 2 and sa["config"]["optimizer"] == "adam"
    assert set(sa["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    for key in sb["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key


def test_train_resume_eval_exact(tmp_path, capsys):
    """Two epochs in two sessions (stop after 1, resume) equal two epochs in one session, bit for bit."""
    a, b = tmp_path / "a", tmp_path / "b"
    # run a also logs test accuracy each epoch (track_test): that must not change training
    assert (
        main(
            [
                "train",
                "--dataset",
                "digits",
                "--epochs",
                "2",
                "--out",
                str(a),
                "--set",
                "stop_after=1",
                "--set",
                "track_test=true",
                *TINY_TRAIN_ARGS,
            ]
        )
        == 0
    )
    ck = load_checkpoint(a / "last.pt")
    assert ck["epoch"] == 1 and len(ck["history"]) == 1
    assert {"model", "optimizer", "scheduler", "rng", "config", "model_config"} <= set(ck)
    for name in ("config.yaml", "metrics.csv", "best.pt", "results.json"):
        assert (a / name).is_file(), name
    assert main(["train", "--out", str(a), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from epoch 1" in out
    assert _last_line(out).startswith("result: test_acc=")
    assert main(["train", "--dataset", "digits", "--epochs", "2", "--out", str(b), *TINY_TRAIN_ARGS]) == 0
    sa, sb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert sa["epoch"] == sb["epoch"] == 2
    for key in sb["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    rows = (a / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_ce,train_acc,slow_loss,val_loss,val_acc,lr,seconds")
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    with open(a / "metrics.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    assert all(0 <= float(r["test_acc"]) <= 1 for r in hist)
    # training seconds accumulate across the two sessions
    assert float(hist[1]["train_seconds"]) == pytest.approx(float(hist[0]["seconds"]) + float(hist[1]["seconds"]))
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(a / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert "confusion matrix" in out
    assert _last_line(out).startswith("result: test_acc=")
    r = json.loads((a / "eval.json").read_text())
    assert r["n"] == 120 and sum(map(sum, r["confusion"])) == 120
    assert abs(r["accuracy"] - r["correct"] / 120) < 1e-12


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_eval_refuses_pickled_payload(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--out", str(run), *TINY_TRAIN_ARGS]) == 0
    ck = load_checkpoint(run / "last.pt")
    ck["extra"] = _Payload()
    torch.save(ck, run / "evil.pt")
    r = _cli("eval", "--checkpoint", str(run / "evil.pt"))
    assert r.returncode == 2
    assert "refusing to load" in r.stderr
    assert not (ROOT / "PWNED_MARKER").exists() and not (tmp_path / "PWNED_MARKER").exists()


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_missing_dataset_message(tmp_path, capsys):
    assert (
        main(["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    )
    err = capsys.readouterr().err
    assert "Fashion-MNIST not found" in err and "apt-get install dataset-fashion-mnist" in err
    assert "--data-dir" in err and "train-images-idx3-ubyte.gz" in err


def _write_fashion_idx(folder: Path, n_train: int, n_test: int) -> None:
    """Random 28×28 images and labels as the four Fashion-MNIST idx .gz files."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))


def test_fashion_idx_variants(tmp_path):
    _write_fashion_idx(tmp_path, n_train=50, n_test=20)
    cfg = TrainConfig(data_dir=str(tmp_path), val_fraction=0.2)
    img = load_dataset(cfg, "fashion-mnist")
    assert img.train_x.shape == (40, 1, 28, 28) and img.val_x.shape == (10, 1, 28, 28)
    assert img.test_x.shape == (20, 1, 28, 28)
    assert abs(float(img.train_x.mean())) < 1e-5 and abs(float(img.train_x.std()) - 1) < 1e-4
    seq = load_dataset(cfg, "fashion-mnist-seq")
    assert seq.train_x.shape == (40, 1, 784) and torch.equal(seq.train_x, img.train_x.flatten(2))
    p1, p2 = load_dataset(cfg, "fashion-mnist-pseq"), load_dataset(cfg, "fashion-mnist-pseq")
    assert p1.info["pseq_seed"] == 0 and torch.equal(p1.test_x, p2.test_x)
    assert not torch.equal(p1.train_x, seq.train_x)
    assert torch.equal(p1.train_x.sort(-1).values, seq.train_x.sort(-1).values)


@pytest.mark.parametrize("dataset", ["fashion-mnist", "fashion-mnist-seq"])
def test_baseline_cnn_trains_and_writes_its_curve(tmp_path, dataset):
    _write_fashion_idx(tmp_path, n_train=64, n_test=32)
    script = ROOT / "tools" / "experiments" / "baseline_cnn.py"
    out = tmp_path / "run"
    args = ["--dataset", dataset, "--data-dir", str(tmp_path), "--epochs", "2", "--threads", "1", "--out", str(out)]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, cwd=ROOT)
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"] == dataset and 0 <= result["test_acc"] <= 1 and result["epochs"] == 2
    assert (out / "metrics.csv").read_text().splitlines()[0] == "epoch,train_seconds,test_acc"


def test_killed_mid_epoch_then_resumed(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--epochs", "6", "--out", str(run), *TINY_TRAIN_ARGS]
    args += ["--set", "limit_train=640"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "terminator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    deadline = time.monotonic() + 180
    try:
        while not (run / "last.pt").exists():  # wait until epoch 1 is saved, then kill during epoch 2
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.25)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    ck = load_checkpoint(run / "last.pt")  # not corrupted
    done = ck["epoch"]
    assert 1 <= done < 6
    r = _cli("train", "--out", str(run), "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from epoch {done}" in r.stdout
    assert _last_line(r.stdout).startswith("result: test_acc=")
    assert load_checkpoint(run / "last.pt")["epoch"] == 6
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["1", "2", "3", "4", "5", "6"]
    assert not list(run.glob(".*.tmp"))


def test_ddp_two_processes_identical_parameters(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "terminator",
            "train",
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--out",
            str(run),
            *TINY_TRAIN_ARGS,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["world_size"] == 2
    assert res["diagnostics"]["ddp_max_param_diff"] == 0.0
    assert r.stdout.count("result: test_acc=") == 1  # rank 0 only
    ck = load_checkpoint(run / "last.pt")
    assert len(ck["rng"]) == 2 and ck["world_size"] == 2


def test_compiled_training_matches_eager_and_saves_the_same_keys(tmp_path):
    """compile=true trains the same network as eager (no dropout: compiled graphs draw their own
    random numbers) and checkpoints the plain model's state_dict."""
    same_batches = ["--set", "model.dropout=[0,0]", "--set", "val_fraction=0", "--set", "limit_train=256"]
    common = ["train", "--dataset", "digits", "--epochs", "1", *TINY_TRAIN_ARGS, *same_batches]
    runs = {name: tmp_path / name for name in ("eager", "compiled")}
    for name, extra in (("eager", []), ("compiled", ["--set", "compile=true"])):
        r = _cli(*common, "--out", str(runs[name]), *extra, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    eager, compiled = (load_checkpoint(runs[name] / "last.pt") for name in ("eager", "compiled"))
    assert compiled["model"].keys() == eager["model"].keys()
    # Parameters are not compared: the biases before a standardization get gradients of pure
    # rounding noise, which Kar3's normalized steps turn into ±lr updates either way.
    for field in ("train_loss", "train_acc", "slow_loss"):
        assert compiled["history"][0][field] == pytest.approx(eager["history"][0][field], rel=1e-4), field
    results = [json.loads((runs[name] / "results.json").read_text()) for name in ("eager", "compiled")]
    assert results[1]["test_loss"] == pytest.approx(results[0]["test_loss"], rel=1e-3)


def test_cli_help_lists_the_commands():
    r = _cli("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "eval", "build", "info"))


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40)])
def test_plots_write_pngs(tmp_path, shape):
    pytest.importorskip("matplotlib")
    from terminator.train.checkpoint import write_csv_atomic
    from terminator.train.loop import build_model
    from terminator.train.plots import plot_curves, plot_kernels, plot_scores, plot_time_to_accuracy
    from terminator.train.run import METRIC_FIELDS

    overrides = parse_set([a for a in TINY_TRAIN_ARGS[1::2] if a.startswith("model.")])
    cfg = TrainConfig(dataset="digits" if len(shape) == 3 else "mnist1d", model=overrides["model"])
    torch.manual_seed(0)
    model = build_model(cfg, shape, 10)
    history = [{k: float(i + 1) for k in METRIC_FIELDS} for i in range(3)]
    plot_curves(history, tmp_path / "curves.png")
    plot_kernels(model, tmp_path / "kernels.png")
    plot_scores(model, torch.randn(3, *shape), torch.tensor([0, 1, 2]), tmp_path / "scores.png")
    write_csv_atomic(tmp_path / "metrics.csv", history, METRIC_FIELDS)
    plot_time_to_accuracy(
        {"a": tmp_path / "metrics.csv", "b": tmp_path / "metrics.csv"}, tmp_path / "tta.png", targets=(0.935,)
    )
    for name in ("curves.png", "kernels.png", "scores.png", "tta.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_minutes_to_accuracy_reads_the_first_epoch_at_each_level(tmp_path):
    from terminator.train.plots import accuracy_curve, minutes_to_accuracy

    (tmp_path / "m.csv").write_text("epoch,train_seconds,test_acc\n1,60,0.80\n2,120,nan\n3,180,0.91\n4,240,0.90\n")
    curve = accuracy_curve(tmp_path / "m.csv")
    assert curve == [(1.0, 0.8), (3.0, 0.91), (4.0, 0.9)]
    assert minutes_to_accuracy(curve, (0.8, 0.9, 0.91, 0.95)) == [1.0, 3.0, 3.0, None]


def test_main_job_config_parses():
    cfg = load_config(ROOT / "configs" / "mnist1d.yaml")
    assert cfg.dataset == "mnist1d" and cfg.preset == "mnist1d" and cfg.out == "runs/mnist1d"


def test_fashion_mnist_config_names_a_preset_and_trains_on_all_images():
    from terminator.models import PRESETS

    cfg = load_config(ROOT / "configs" / "fmnist.yaml")
    assert cfg.dataset == "fashion-mnist" and cfg.preset in PRESETS and cfg.val_fraction == 0 and cfg.track_test


def test_keep_freed_memory_sets_glibc_thresholds_unless_the_user_did(monkeypatch):
    from terminator.train.allocator import USER_SETTINGS, keep_freed_memory

    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    try:
        glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        glibc = False
    assert keep_freed_memory() is glibc
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert keep_freed_memory() is False  # the user's setting decides
