"""The on-the-fly build: cache key, rebuilds, the lock, fallbacks, the CLI.

Builds use a tiny extension of their own (a few seconds to compile) in a private
cache directory, in subprocesses, so the suite's own loaded library is untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from terminator.ops import _build

TINY_SOURCE = """
#include <ATen/ATen.h>
#include <torch/library.h>
at::Tensor plus_n(const at::Tensor& x) {{ return x + {value}; }}
TORCH_LIBRARY({namespace}, m) {{ m.def("plus_n(Tensor x) -> Tensor", &plus_n); }}
"""

BUILD_TINY = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from terminator.ops import _build
    src, namespace = Path(sys.argv[1]), sys.argv[2]
    result = _build.build_and_load(namespace, src, ["tiny.cpp"], cflags=("-O0",))
    value = getattr(torch.ops, namespace).plus_n(torch.zeros(1)).item()
    print(json.dumps({"built": result.built, "dir": str(result.library.parent), "value": value}))
    """
)


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, TERMINATOR_CACHE_DIR=str(cache), **extra)
    env.setdefault("TERMINATOR_BACKEND", "reference")  # don't build the real ops in helpers
    return env


def _write_tiny(src: Path, namespace: str, value: int) -> None:
    src.mkdir(parents=True, exist_ok=True)
    (src / "tiny.cpp").write_text(TINY_SOURCE.format(namespace=namespace, value=value))


def _start_tiny_build(src: Path, namespace: str, cache: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", BUILD_TINY, str(src), namespace],
        env=_env(cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _namespace() -> str:
    return f"tiny_{uuid.uuid4().hex[:8]}"


def test_cache_key_follows_sources_and_flags(tmp_path):
    ns = _namespace()
    _write_tiny(tmp_path / "src", ns, 1)
    first = _build.build_dir_for(ns, tmp_path / "src", ["tiny.cpp"], ("-O0",))
    assert first == _build.build_dir_for(ns, tmp_path / "src", ["tiny.cpp"], ("-O0",))
    assert first != _build.build_dir_for(ns, tmp_path / "src", ["tiny.cpp"], ("-O1",))
    (tmp_path / "src" / "extra.h").write_text("// a header change matters too\n")
    assert first != _build.build_dir_for(ns, tmp_path / "src", ["tiny.cpp"], ("-O0",))
    assert first.parent == _build.cache_root()


def test_cpu_sources_are_every_cpp_file_in_cpu(tmp_path):
    (tmp_path / "cpu").mkdir()
    for name in ("b_family.cpp", "a_family.cpp", "helpers.h"):
        (tmp_path / "cpu" / name).write_text("// a CPU kernel file\n")
    assert _build.cpp_sources(tmp_path) == [*_build.CPP_SOURCES, "cpu/a_family.cpp", "cpu/b_family.cpp"]
    checkout = _build.cpp_sources(_build.source_dir())
    assert "cpu/global_dot.cpp" in checkout and "cpu/register.cpp" in checkout


def test_cpu_source_named_like_another_is_an_error(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "fft_conv.cpp").write_text("// its object would overwrite fft_conv.cpp's\n")
    with pytest.raises(_build.BuildError, match=r"cpu/fft_conv\.cpp, fft_conv\.cpp in .* same object file"):
        _build.cpp_sources(tmp_path)


@pytest.mark.slow
def test_changed_source_rebuilds_and_unchanged_loads_from_cache(tmp_path):
    ns, src, cache = _namespace(), tmp_path / "src", tmp_path / "cache"
    _write_tiny(src, ns, 1)
    first = _finish(_start_tiny_build(src, ns, cache))
    assert first["built"] and first["value"] == 1
    again = _finish(_start_tiny_build(src, ns, cache))
    assert not again["built"] and again["dir"] == first["dir"] and again["value"] == 1
    _write_tiny(src, ns, 2)
    changed = _finish(_start_tiny_build(src, ns, cache))
    assert changed["built"] and changed["dir"] != first["dir"] and changed["value"] == 2


@pytest.mark.slow
def test_processes_started_together_build_once(tmp_path):
    ns, src, cache = _namespace(), tmp_path / "src", tmp_path / "cache"
    _write_tiny(src, ns, 3)
    procs = [_start_tiny_build(src, ns, cache) for _ in range(3)]
    results = [_finish(p) for p in procs]
    assert sorted(r["built"] for r in results) == [False, False, True]
    assert {r["dir"] for r in results} == {results[0]["dir"]}
    assert all(r["value"] == 3 for r in results)


def test_compile_error_names_the_cause(tmp_path):
    ns = _namespace()
    (tmp_path / "tiny.cpp").write_text("this is not C++;\n")
    os.environ["TERMINATOR_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        with pytest.raises(_build.BuildError, match=r"building .* failed: .*error"):
            _build.build_and_load(ns, tmp_path, ["tiny.cpp"], cflags=("-O0",))
    finally:
        del os.environ["TERMINATOR_CACHE_DIR"]


def test_lock_waits_then_times_out_with_a_clear_message(tmp_path):
    lock = tmp_path / "x.lock"
    with _build.build_lock(lock, timeout=1):
        start = time.monotonic()
        with pytest.raises(
            _build.BuildError, match=r"waited 0 s for another process building in .*TERMINATOR_BUILD_TIMEOUT"
        ):
            with _build.build_lock(lock, timeout=0.3):
                pass
        assert time.monotonic() - start >= 0.3
    with _build.build_lock(lock, timeout=0.3):  # released: free again
        pass


def test_lock_of_a_killed_builder_is_released(tmp_path):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom terminator.ops import _build\n"
            f"with _build.build_lock(__import__('pathlib').Path({str(lock)!r}), 5):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    with _build.build_lock(lock, timeout=2):  # not blocked by the dead process
        pass


# ---- backend choice, in fresh processes ------------------------------------------------

PROBE = textwrap.dedent(
    """
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import terminator.ops as ops
        except Exception as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
            raise SystemExit(0)
    import torch
    y = ops.hyperzzw_global(torch.ones(2, 3), torch.ones(1, 2, 3), mode="conv")
    print(json.dumps({"backend": ops.backend().name, "reason": ops.backend().reason,
                      "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
                      "value": y.sum().item()}))
    """
)


def _probe(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=dict(os.environ, **env), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_auto_falls_back_to_reference_with_one_warning_naming_the_cause():
    result = _probe(TERMINATOR_BACKEND="auto", TERMINATOR_CACHE_DIR="/dev/null/not-a-dir")
    assert result["backend"] == "reference"
    assert len(result["warnings"]) == 1
    assert "using the pure-PyTorch reference backend because cannot create the build cache" in result["warnings"][0]
    assert "TERMINATOR_CACHE_DIR" in result["warnings"][0]
    assert result["value"] == 14.0  # "same" conv of ones(3) with ones(3) is [2, 3, 2]; 2 channels


def test_forcing_an_unavailable_backend_is_an_error():
    result = _probe(TERMINATOR_BACKEND="cpp", TERMINATOR_CACHE_DIR="/dev/null/not-a-dir")
    assert result["error"] == "BuildError" and "cannot create the build cache" in result["message"]


def test_forcing_cuda_without_a_gpu_is_an_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = _probe(TERMINATOR_BACKEND="cuda")
    assert result["error"] == "BuildError"
    assert (
        "TERMINATOR_BACKEND=cuda but the CUDA backend is unavailable: torch.cuda.is_available() is False"
        in result["message"]
    )


def test_unknown_backend_value_is_an_error():
    result = _probe(TERMINATOR_BACKEND="tpu")
    assert result["error"] == "ValueError"
    assert "TERMINATOR_BACKEND must be one of auto, cpp, cuda, reference, got 'tpu'" in result["message"]


def test_reference_backend_compiles_nothing(tmp_path):
    result = _probe(TERMINATOR_BACKEND="reference", TERMINATOR_CACHE_DIR=str(tmp_path / "cache"))
    assert result["backend"] == "reference" and result["warnings"] == []
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "env", [{"TERMINATOR_MARCH": "a b"}, {"TERMINATOR_MARCH": "no-such-cpu", "TERMINATOR_BACKEND": "cpp"}]
)
def test_build_cli_says_why_a_build_fails_without_a_traceback(tmp_path, env):
    out = subprocess.run(
        [sys.executable, "-m", "terminator", "build"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TERMINATOR_CACHE_DIR": str(tmp_path), **env},
    )
    assert out.returncode == 1
    assert "build failed: " in out.stderr and "Traceback" not in out.stderr
    assert "TERMINATOR_MARCH must be" in out.stderr or "no-such-cpu" in out.stderr


def test_build_cli_reports_the_active_backend():
    out = subprocess.run([sys.executable, "-m", "terminator", "build"], capture_output=True, text=True, timeout=600)
    import terminator.ops as ops

    expected = ops.backend().name
    assert f"backend: {expected}" in out.stdout
    assert "cuda:" in out.stdout
    assert out.returncode == (0 if expected != "reference" or ops.backend().requested == "reference" else 1)
