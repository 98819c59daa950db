"""Build faults: a build killed midway, a damaged cache, a read-only cache, no ninja, no
compiler, a sanitizer build without its runtime. Each must end in a working build or
in the reference backend with one warning that says what to do, never in a hang or a
crash.

Builds use a plain C++ library (no torch headers: about a second to compile) through
``_build.build_and_load`` in a private cache (TERMINATOR_CACHE_DIR in tmp), in
subprocesses; the import probes fail before compiling anything.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from terminator.ops import _build

PLAIN_SOURCE = 'extern "C" int plus_n(int x) {{ return x + {value}; }}\n'

BUILD = textwrap.dedent(
    """
    import ctypes, json, sys, time
    from pathlib import Path
    from terminator.ops import _build
    src, name = Path(sys.argv[1]), sys.argv[2]
    start = time.monotonic()
    try:
        result = _build.build_and_load(name, src, ["tiny.cpp"], cflags=("-O0",))
    except _build.BuildError as exc:
        print(json.dumps({"error": str(exc)}))
        raise SystemExit(0)
    value = ctypes.CDLL(str(result.library)).plus_n(0)
    print(json.dumps({"built": result.built, "dir": str(result.library.parent), "value": value,
                      "seconds": time.monotonic() - start}))
    """
)

# `import terminator.ops` in a fresh process; prints the backend and the RuntimeWarnings.
PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    for hidden in sys.argv[1:]:
        sys.modules[hidden] = None  # import of it fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import terminator.ops as ops
        except Exception as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
            raise SystemExit(0)
    print(json.dumps({"backend": ops.backend().name, "reason": ops.backend().reason,
                      "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning]}))
    """
)


def _name() -> str:
    return f"plain_{uuid.uuid4().hex[:8]}"


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, TERMINATOR_CACHE_DIR=str(cache), **extra)
    env.setdefault("TERMINATOR_BACKEND", "reference")  # importing terminator.ops builds nothing
    for key in ("TERMINATOR_SANITIZE", "TERMINATOR_BUILD_TIMEOUT"):
        if key not in extra:
            env.pop(key, None)
    return env


def _write(src: Path, value: int) -> Path:
    src.mkdir(parents=True, exist_ok=True)
    (src / "tiny.cpp").write_text(PLAIN_SOURCE.format(value=value))
    return src


def _build_in_subprocess(src: Path, name: str, cache: Path, preexec_fn=None, **env: str) -> tuple[dict, str]:
    out = subprocess.run(
        [sys.executable, "-c", BUILD, str(src), name],
        env=_env(cache, **env),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=preexec_fn,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def _probe(cache: Path, *hidden_modules: str, **env: str) -> dict:
    environment = _env(cache, **env)
    environment["TERMINATOR_BACKEND"] = env.get("TERMINATOR_BACKEND", "auto")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *hidden_modules], env=environment, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _library(result: dict, name: str) -> Path:
    return Path(result["dir"]) / f"{name}.so"


# ---- a build killed midway -----------------------------------------------------------

SLOW_COMPILER = """#!/bin/sh
# A compiler that hangs in the compile step (not in the version checks).
for arg in "$@"; do
  if [ "$arg" = "-c" ]; then touch "{mark}"; sleep 300; fi
done
exec c++ "$@"
"""


@pytest.mark.slow
def test_builder_killed_mid_compile_does_not_wedge_the_next_start(tmp_path):
    name, cache = _name(), tmp_path / "cache"
    src = _write(tmp_path / "src", 4)
    mark = tmp_path / "compiling"
    slow = tmp_path / "slow-c++"
    slow.write_text(SLOW_COMPILER.format(mark=mark))
    slow.chmod(0o755)
    first = subprocess.Popen(
        [sys.executable, "-c", BUILD, str(src), name],
        env=_env(cache, CXX=str(slow)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not mark.exists():
            assert first.poll() is None, first.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the slow compiler never started"
            time.sleep(0.1)
        first.kill()  # SIGKILL the builder itself, mid-compile; its compiler lives on
        first.wait()
        leftover = list(cache.glob(f"{name}-*"))
        assert any(p.is_dir() for p in leftover) and any(p.suffix == ".lock" for p in leftover)
        # The next start: the orphaned compiler still runs, the half-built directory is
        # there; it must neither wait for the lock nor trip over the leftovers.
        again, err = _build_in_subprocess(src, name, cache, TERMINATOR_BUILD_TIMEOUT="60")
        assert again.get("built") is True and again["value"] == 4, (again, err[-2000:])
        assert again["seconds"] < 60
        assert os.path.isfile(Path(again["dir"]) / _build.COMPLETE_MARKER)
        third, _ = _build_in_subprocess(src, name, cache)
        assert third["built"] is False and third["value"] == 4
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # the orphaned slow compiler
        except ProcessLookupError:
            pass


def test_a_lock_held_past_the_timeout_names_its_holder(tmp_path):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom pathlib import Path\nfrom terminator.ops import _build\n"
            f"with _build.build_lock(Path({str(lock)!r}), 5):\n    print('held', flush=True); time.sleep(60)",
        ],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            _build.BuildError, match=rf"held by process {holder.pid} since \d+ s\).*TERMINATOR_BUILD_TIMEOUT"
        ):
            with _build.build_lock(lock, timeout=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()
    with _build.build_lock(lock, timeout=2):  # the kernel released it with its process
        pass


def test_a_lock_kept_by_an_orphan_is_reported_as_such(tmp_path):
    """A builder that died while a child it started kept the lock's file open."""
    lock = tmp_path / "x.lock"
    handle = open(lock, "a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write("999999999 " + os.uname().nodename + f" {time.time():.0f}\n")  # a pid that does not exist
    handle.flush()
    orphan = subprocess.Popen(["sleep", "60"], pass_fds=(handle.fileno(),))
    handle.close()  # our copy closed: only the child keeps the lock
    try:
        with pytest.raises(
            _build.BuildError,
            match=r"process 999999999 that took it since \d+ s is gone, "
            r"so a process it started holds it",
        ):
            with _build.build_lock(lock, timeout=0.3):
                pass
    finally:
        orphan.kill()
        orphan.wait()
    with _build.build_lock(lock, timeout=2):
        pass


# ---- a damaged cache -----------------------------------------------------------------------


def _damage_and_rebuild(tmp_path, damage) -> tuple[dict, str]:
    name, cache = _name(), tmp_path / "cache"
    src = _write(tmp_path / "src", 5)
    first, _ = _build_in_subprocess(src, name, cache)
    assert first["built"] and first["value"] == 5
    damage(_library(first, name), Path(first["dir"]) / _build.COMPLETE_MARKER)
    again, err = _build_in_subprocess(src, name, cache)
    assert again.get("built") is True and again["value"] == 5 and again["dir"] == first["dir"], (again, err)
    third, _ = _build_in_subprocess(src, name, cache)
    assert third["built"] is False and third["value"] == 5
    return again, err


@pytest.mark.slow
def test_truncated_library_is_rebuilt(tmp_path):
    # Without the recorded size/checksum, dlopen of a truncated library dies with SIGBUS.
    def truncate(library, marker):
        data = library.read_bytes()
        library.write_bytes(data[: len(data) // 2])

    _, err = _damage_and_rebuild(tmp_path, truncate)
    assert "is damaged" in err and "bytes, the build wrote" in err


@pytest.mark.slow
def test_garbage_library_of_the_same_size_is_rebuilt(tmp_path):
    def scramble(library, marker):
        library.write_bytes(os.urandom(library.stat().st_size))

    _, err = _damage_and_rebuild(tmp_path, scramble)
    assert "differs from what the build wrote" in err


@pytest.mark.slow
def test_unreadable_marker_is_rebuilt(tmp_path):
    _, err = _damage_and_rebuild(tmp_path, lambda library, marker: marker.write_text("{not json"))
    assert "marker COMPLETE.json is unreadable" in err


@pytest.mark.slow
def test_library_that_fails_to_load_is_rebuilt(tmp_path):
    """A marker from an older version (no checksum) over a broken library: the load fails,
    the directory is deleted and rebuilt once, under the lock."""

    def old_marker_bad_library(library, marker):
        info = json.loads(marker.read_text())
        del info["library_size"], info["library_sha256"]
        marker.write_text(json.dumps(info))
        library.write_bytes(b"\x7fELF but not really" * 100)

    _, err = _damage_and_rebuild(tmp_path, old_marker_bad_library)
    assert "does not load" in err


@pytest.mark.slow
def test_a_library_that_never_loads_fails_once_with_the_cause(tmp_path):
    name, cache = _name(), tmp_path / "cache"
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.cpp").write_text(
        'extern "C" int not_defined_anywhere();\nextern "C" int plus_n(int x) { return not_defined_anywhere(); }\n'
    )
    result, _ = _build_in_subprocess(src, name, cache)
    assert "failed" in result["error"] and "TERMINATOR_VERBOSE_BUILD" in result["error"]


# ---- read-only cache ---------------------------------------------------------------------------


def _unprivileged():
    """preexec_fn under which file permissions bind root too (drops CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the bounding set before exec); None when not root."""
    if os.geteuid() != 0:
        return None

    def drop():
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return drop


def _read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)


def _require_unwritable(path: Path, preexec_fn) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", f"import os; print(os.access({str(path)!r}, os.W_OK))"],
        capture_output=True,
        text=True,
        preexec_fn=preexec_fn,
    )
    if probe.stdout.strip() != "False":
        pytest.skip(f"cannot make {path} read-only for a subprocess here ({probe.stderr.strip()[-200:]})")


def test_read_only_cache_without_a_build_falls_back_with_advice(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    _read_only(cache)
    preexec = _unprivileged()
    _require_unwritable(cache, preexec)
    try:
        environment = _env(cache, TERMINATOR_BACKEND="auto")
        out = subprocess.run(
            [sys.executable, "-c", PROBE],
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
            preexec_fn=preexec,
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["backend"] == "reference"
        assert len(result["warnings"]) == 1
        assert "cannot create the build lock" in result["warnings"][0]
        assert "Permission denied" in result["warnings"][0]
        assert "set TERMINATOR_CACHE_DIR to a writable directory" in result["warnings"][0]
    finally:
        cache.chmod(0o755)


@pytest.mark.slow
def test_read_only_cache_with_a_build_loads_it(tmp_path):
    name, cache = _name(), tmp_path / "cache"
    src = _write(tmp_path / "src", 6)
    first, _ = _build_in_subprocess(src, name, cache)
    assert first["built"]
    _read_only(cache)
    preexec = _unprivileged()
    _require_unwritable(cache, preexec)
    try:
        again, err = _build_in_subprocess(src, name, cache, preexec_fn=preexec)
        assert again.get("built") is False and again["value"] == 6, (again, err)
    finally:
        for p in [cache, *cache.rglob("*")]:
            p.chmod(0o755)


# ---- missing tools ------------------------------------------------------------------------------


def _bin_with(tmp_path: Path, *tools: str) -> str:
    """A PATH holding only these tools (symlinks to the real ones)."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        real = shutil.which(tool)
        assert real, f"{tool} not found"
        (bin_dir / tool).symlink_to(real)
    return str(bin_dir)


def test_missing_ninja_falls_back_with_advice(tmp_path):
    result = _probe(tmp_path / "cache", "ninja", PATH=_bin_with(tmp_path, "c++"))
    assert result["backend"] == "reference" and len(result["warnings"]) == 1
    assert "ninja is not installed and not on PATH: pip install ninja" in result["warnings"][0]


def test_missing_compiler_falls_back_with_advice(tmp_path):
    result = _probe(tmp_path / "cache", CXX="/nonexistent/c++")
    assert result["backend"] == "reference" and len(result["warnings"]) == 1
    assert "no C++ compiler: CXX='/nonexistent/c++' is not an executable" in result["warnings"][0]
    assert "set CXX to a compiler" in result["warnings"][0]
    no_cxx = _probe(tmp_path / "cache", PATH=_bin_with(tmp_path, "ninja"))
    assert "no C++ compiler: no 'c++' on PATH; install one (e.g. apt-get install g++" in no_cxx["warnings"][0]


def test_forcing_cpp_without_a_compiler_is_an_error_that_says_why(tmp_path):
    result = _probe(tmp_path / "cache", CXX="/nonexistent/c++", TERMINATOR_BACKEND="cpp")
    assert result["error"] == "BuildError" and "no C++ compiler" in result["message"]


# ---- the sanitizer build ----------------------------------------------------------------------


def test_sanitizer_build_has_its_own_cache_entry():
    src = _build.source_dir()
    sources = _build.cpp_sources(src)
    normal = _build.build_dir_for("t", src, sources, _build.CPP_FLAGS)
    sanitized = _build.build_dir_for("t", src, sources, _build.SANITIZE_FLAGS)
    assert normal != sanitized
    assert "-fsanitize=address,undefined" in _build.SANITIZE_FLAGS and "-O1" in _build.SANITIZE_FLAGS
    assert "-fsanitize=address,undefined" in _build.SANITIZE_LD_FLAGS


def test_sanitizer_build_without_its_runtime_says_how_to_preload_it(tmp_path):
    if _build.asan_runtime_loaded():
        pytest.skip("this process runs with the ASan runtime preloaded")
    env = {"TERMINATOR_SANITIZE": "1", "LD_PRELOAD": ""}
    forced = _probe(tmp_path / "cache", TERMINATOR_BACKEND="cpp", **env)
    assert forced["error"] == "BuildError"
    assert "LD_PRELOAD=$(gcc -print-file-name=libasan.so)" in forced["message"]
    auto = _probe(tmp_path / "cache", **env)
    assert auto["backend"] == "reference" and "tools/ci/sanitize.sh" in auto["warnings"][0]
    assert not any((tmp_path / "cache").glob("*/*.so"))  # nothing built that would abort at load


def test_sanitize_value_is_checked(tmp_path):
    result = _probe(tmp_path / "cache", TERMINATOR_SANITIZE="maybe")
    assert result["error"] == "ValueError" and "TERMINATOR_SANITIZE must be 0 or 1" in result["message"]


# ---- the target architecture --------------------------------------------------------------


def test_march_replaces_native_and_has_its_own_cache_entry(monkeypatch):
    monkeypatch.delenv("TERMINATOR_MARCH", raising=False)
    assert _build.cpp_flags() == _build.CPP_FLAGS
    monkeypatch.setenv("TERMINATOR_MARCH", "x86-64-v3")
    flags = _build.cpp_flags()
    assert "-march=x86-64-v3" in flags and "-march=native" not in flags and "-O3" in flags
    src = _build.source_dir()
    sources = _build.cpp_sources(src)
    assert _build.build_dir_for("t", src, sources, flags) != _build.build_dir_for("t", src, sources, _build.CPP_FLAGS)


@pytest.mark.parametrize("value", ["x86-64 -O0", "native;rm", "-mtune=x"])
def test_march_that_is_not_one_value_is_an_error_naming_it(monkeypatch, value):
    monkeypatch.setenv("TERMINATOR_MARCH", value)
    with pytest.raises(ValueError, match="TERMINATOR_MARCH must be a -march value"):
        _build.cpp_flags()
