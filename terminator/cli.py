"""Command line: ``terminator build`` / ``python -m terminator build``, ``info``."""

from __future__ import annotations

import argparse
import os
import platform
import sys


def _cmd_build(args: argparse.Namespace) -> int:
    """Builds (or loads from the cache) the compiled ops and says what is active."""
    from .ops import _build

    try:
        import terminator.ops as ops
    except _build.BuildError as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    info = ops.backend()
    want_cuda, cuda_reason = _build.cuda_build_status()
    print(f"backend: {info.name}")
    print(f"reason:  {info.reason}")
    print(f"library: {info.library or '-'}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="terminator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="compile the C++/CUDA ops now and report the active backend")
    sub.add_parser("info", help="versions, backend, threads, devices")
    args = parser.parse_args(argv)
    return {"build": _cmd_build, "info": _cmd_info}[args.command](args)
