"""Command line (``terminator`` or ``python -m terminator``): train, eval, build, info.

    terminator train [--config FILE] [--dataset NAME] [--preset NAME] [--epochs N] [--batch-size N]
                     [--out DIR] [--resume [CKPT]] [--data-dir DIR] [--set key=value ...]
    terminator eval --checkpoint FILE [--dataset NAME] [--data-dir DIR] [--split test|val]
    terminator build | info

Under ``torchrun --nproc_per_node=N -m terminator train ...`` training runs with DDP.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys


def _cmd_build(args: argparse.Namespace) -> int:
    """Builds (or loads from the cache) the compiled ops and says what is active."""
    try:  # importing terminator.ops builds (or loads) the ops
        import terminator.ops as ops
    except (RuntimeError, ValueError) as exc:  # BuildError, or a bad TERMINATOR_* setting
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    from .ops import _build

    info = ops.backend()
    want_cuda, cuda_reason = _build.cuda_build_status()
    print(f"backend: {info.name}")
    print(f"reason:  {info.reason}")
    print(f"library: {info.library or '-'}")
    if info.library:
        print(f"flags:   {' '.join(_build.build_flags()['cflags'])}")
    print(f"cpu:     {'C++ kernels' if 'cpu' in info.devices else 'reference (pure PyTorch)'}")
    print(f"cuda:    {'CUDA kernels' if 'cuda' in info.devices else 'not built'} ({cuda_reason})")
    if info.name == "reference" and info.requested != "reference":
        return 1
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import terminator

    print(f"terminator-hyperzzw {terminator.__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), threads {torch.get_num_threads()}")
    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    print(f"cuda devices: {', '.join(devices) or 'none'}")
    print(f"TERMINATOR_BACKEND={os.environ.get('TERMINATOR_BACKEND', 'auto')}")
    print(f"backend: {terminator.ops.backend()}")
    return 0


def _train_overrides(args: argparse.Namespace) -> dict:
    from .train.config import apply_overrides, parse_set

    flags = {
        "dataset": args.dataset,
        "preset": args.preset,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "out": args.out,
        "data_dir": args.data_dir,
        "seed": args.seed,
        "lr": args.lr,
        "threads": args.threads,
        "device": args.device,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    if args.no_progress:
        overrides["progress"] = False
    return apply_overrides(overrides, parse_set(args.set))


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from .train import CheckpointRefused, DatasetNotFound, load_checkpoint, load_config, train

    try:
        overrides = _train_overrides(args)
        base = None
        resume = None
        if args.resume is not None:
            resume = args.resume
            # the run's own configuration, then whatever this command line changes
            path = args.resume
            if path == "auto":
                from .train.run import run_dir

                path = str(run_dir(load_config(args.config, overrides)) / "last.pt")
            if os.path.isfile(path):
                base = {**load_checkpoint(path)["config"], "stop_after": None}
                resume = path
        cfg = load_config(None if base is not None and args.config is None else args.config, overrides, base=base)
        result = train(cfg, resume=resume, log=_log_rank0)
    except (DatasetNotFound, CheckpointRefused, FileNotFoundError, ValueError) as exc:
        print(f"terminator train: error: {exc}", file=sys.stderr)
        return 2
    if _rank() == 0:
        short = {k: v for k, v in result.items() if k != "confusion"}
        print(
            f"result: test_acc={result['test_acc']:.4f} ({result['test_correct']}/{result['test_n']}) "
            f"test_loss={result['test_loss']:.4f} best_epoch={result['best_epoch']} "
            f"params={result['parameters']} run={result['run']} {json.dumps(short)}"
        )
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _log_rank0(msg: str) -> None:
    if _rank() == 0:
        print(msg, flush=True)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .train import CheckpointRefused, DatasetNotFound, evaluate_checkpoint
    from .train.evaluation import format_confusion

    try:
        r = evaluate_checkpoint(
            args.checkpoint,
            dataset=args.dataset,
            data_dir=args.data_dir,
            split=args.split,
            out=args.out,
            threads=args.threads,
        )
    except (DatasetNotFound, CheckpointRefused, FileNotFoundError, ValueError) as exc:
        print(f"terminator eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_confusion(r["confusion"]))
    print(
        f"result: {r['split']}_acc={r['accuracy']:.4f} ({r['correct']}/{r['n']}) loss={r['loss']:.4f} "
        f"dataset={r['dataset']} epoch={r['epoch']} checkpoint={r['checkpoint']}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="terminator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="compile the C++/CUDA ops now and report the active backend")
    sub.add_parser("info", help="versions, backend, threads, devices")
    t = sub.add_parser("train", help="train a Terminator (DDP under torchrun)")
    t.add_argument("--config", help="YAML file of TrainConfig fields")
    t.add_argument("--dataset", help="mnist1d | fashion-mnist | fashion-mnist-seq | fashion-mnist-pseq | digits")
    t.add_argument(
        "--preset",
        help="cifar10 | fmnist | fmnist-wide | fmnist-large | fmnist-patch | seq784 | mnist1d (default: the dataset's)",
    )
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, help="global batch (split over processes)")
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int, help="torch intra-op threads")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"])
    t.add_argument("--out", help="run directory (default runs/<dataset>-<preset>)")
    t.add_argument("--data-dir", help="folder with the Fashion-MNIST idx .gz files")
    t.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CKPT",
        help="continue from CKPT (default OUT/last.pt; starts fresh when there is none)",
    )
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field (YAML value; model.FIELD for the network), repeatable",
    )
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    e = sub.add_parser("eval", help="accuracy and confusion matrix of a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--dataset", help="evaluate on another dataset of the same shape")
    e.add_argument("--data-dir")
    e.add_argument("--split", choices=["test", "val"], default="test")
    e.add_argument("--out", help="where eval.json goes (default: the checkpoint's folder)")
    e.add_argument("--threads", type=int, help="torch intra-op threads (default: the run's setting)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return {"build": _cmd_build, "info": _cmd_info, "train": _cmd_train, "eval": _cmd_eval}[args.command](args)
