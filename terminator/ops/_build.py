"""On-the-fly build of the compiled backends, and the choice of backend.

The C++ (and, where a GPU and a CUDA toolkit exist, CUDA) sources are compiled
with ninja through ``torch.utils.cpp_extension`` the first time they are needed,
into a cache directory keyed by the torch version, the CUDA version, the Python
ABI, the compile flags and a hash of the sources. One process builds while the
others wait on an inter-process lock (``flock``: released by the kernel if the
builder dies, so a killed build never leaves a lock behind). Later starts load
the cached library directly, without ninja or a compiler.

Environment:
    TERMINATOR_BACKEND        auto (default) | cpp | cuda | reference
    TERMINATOR_CACHE_DIR      cache root (default: $XDG_CACHE_HOME/terminator-hyperzzw)
    TERMINATOR_BUILD_TIMEOUT  seconds to wait for another process's build (default 900)
    TERMINATOR_VERBOSE_BUILD  1 to show the compiler's output
    TERMINATOR_SANITIZE       1 to build with AddressSanitizer + UndefinedBehaviorSanitizer
                              (-O1 -g, its own cache entry); the process must have the ASan
                              runtime preloaded (tools/ci/sanitize.sh shows how)

A cached build is used only when its COMPLETE marker is present and the library's size
and SHA-256 match the ones the marker recorded (a truncated library would crash the
process in dlopen, not raise); a damaged entry, or a cached library that fails to load,
is deleted and rebuilt once, under the lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch

BACKENDS = ("auto", "cpp", "cuda", "reference")
EXTENSION_NAME = "terminator_ops"
# The C++ sources at the top of csrc/; cpp_sources() adds every cpu/*.cpp (one file per op
# family), so a new CPU kernel file is compiled without being listed here.
CPP_SOURCES = ("terminator.cpp", "fft_conv.cpp")
# -fopenmp: ATen's parallel_for is OpenMP in the headers. -march=native on x86-64
# Linux: the build runs on the machine that uses it, and the blocked conv loops are
# twice as fast with its vector width (docs/PERFORMANCE.md); the cache key then
# includes the CPU, so a cache shared between machines never hands one CPU code
# built for another.
NATIVE_FLAGS = ("-march=native",) if sys.platform.startswith("linux") and os.uname().machine == "x86_64" else ()
CPP_FLAGS = ("-O3", "-fopenmp", *NATIVE_FLAGS)
CUDA_FLAGS = ("-O3", "--expt-relaxed-constexpr")
LD_FLAGS = ("-fopenmp",)
# TERMINATOR_SANITIZE=1: ASan + UBSan, with frame pointers and debug info for readable reports,
# for the same target as the normal build (the CPU kernels' vector code depends on it).
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1", "-fopenmp", *NATIVE_FLAGS)
SANITIZE_LD_FLAGS = ("-fsanitize=address,undefined", "-fopenmp")
LOCK_POLL_SECONDS = 0.2
# After this long waiting for another process's build, say so on stderr (once).
LOCK_ANNOUNCE_SECONDS = 10.0
_CACHE_HINT = "set TERMINATOR_CACHE_DIR to a writable directory (or TERMINATOR_BACKEND=reference to skip the build)"
# Marks a finished build: written last, so a half-built directory is never used.
COMPLETE_MARKER = "COMPLETE.json"


class BuildError(RuntimeError):
    """A compiled backend could not be built or loaded; the message says why."""


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """Which backend ``terminator.ops`` runs on, and why.

    Attributes:
        name: "cpp", "cuda" (CUDA kernels and the C++ CPU kernels) or "reference".
        reason: why this backend was chosen (or why a compiled one was not).
        requested: the value of TERMINATOR_BACKEND ("auto" when unset).
        library: path of the loaded shared library, or None.
        devices: device types with compiled kernels, e.g. ("cpu",) or ("cpu", "cuda").
    """

    name: str
    reason: str
    requested: str
    library: str | None = None
    devices: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = f" [{self.library}]" if self.library else ""
        return f"{self.name} (requested {self.requested}): {self.reason}{where}"


@dataclasses.dataclass(frozen=True)
class BuildResult:
    library: Path
    built: bool  # False when loaded from the cache
    seconds: float


# ---- where things are ---------------------------------------------------------


def source_dir() -> Path:
    """The C++/CUDA sources: packaged as ``terminator/_csrc`` in a wheel, ``csrc/`` in a checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / "terminator.cpp").is_file():
            return candidate
    raise BuildError(f"C++ sources not found next to the package {package} (looked for _csrc/ and ../csrc/)")


def cache_root() -> Path:
    explicit = os.environ.get("TERMINATOR_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except (RuntimeError, KeyError) as exc:  # no $HOME and no passwd entry for this uid
            raise BuildError(f"no home directory to put the build cache in ({exc}); {_CACHE_HINT}") from None
    return Path(base) / "terminator-hyperzzw"


def cpp_sources(src: Path) -> list[str]:
    """The C++ sources to compile, relative to ``src``: CPP_SOURCES, then cpu/*.cpp sorted."""
    sources = list(CPP_SOURCES) + sorted(str(p.relative_to(src)) for p in (src / "cpu").glob("*.cpp"))
    # cpp_extension names each object after its file's name alone: two would overwrite one another.
    stems = [Path(s).stem for s in sources]
    clashes = sorted({s for s in sources if stems.count(Path(s).stem) > 1})
    if clashes:
        raise BuildError(f"C++ sources {', '.join(clashes)} in {src} would compile to the same object file; rename one")
    return sources


def cuda_sources(src: Path) -> list[str]:
    return sorted(str(p.relative_to(src)) for p in (src / "cuda").glob("*.cu"))


def cuda_build_status() -> tuple[bool, str]:
    """Whether the CUDA kernels should be compiled here, and why (not)."""
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA support"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if not cuda_sources(source_dir()):
        return False, "no CUDA sources in this installation"
    return True, f"CUDA {torch.version.cuda} device and toolkit at {CUDA_HOME}"


def cpp_flags() -> tuple[str, ...]:
    """The C++ flags: CPP_FLAGS, or with TERMINATOR_MARCH=<arch> ``-march=<arch>`` in place
    of -march=native, e.g. x86-64-v3 (AVX2) or x86-64 (SSE2) to build and test the kernels'
    narrower-vector code on a machine with AVX-512, or to build for a family of machines."""
    arch = os.environ.get("TERMINATOR_MARCH", "").strip()
    if not arch:
        return CPP_FLAGS
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", arch):
        raise ValueError(f"TERMINATOR_MARCH must be a -march value such as x86-64-v3, got {arch!r}")
    return ("-O3", "-fopenmp", f"-march={arch}")


def build_flags() -> dict[str, tuple[str, ...]]:
    """build_and_load's compile (and link) flags for this process: the sanitizer's with
    TERMINATOR_SANITIZE=1 (always for this machine), else cpp_flags()."""
    if sanitize_requested():
        return dict(cflags=SANITIZE_FLAGS, ldflags=SANITIZE_LD_FLAGS)
    return dict(cflags=cpp_flags())


def sanitize_requested() -> bool:
    """TERMINATOR_SANITIZE=1: build the C++ ops with AddressSanitizer and UBSan."""
    raw = os.environ.get("TERMINATOR_SANITIZE", "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"TERMINATOR_SANITIZE must be 0 or 1, got {raw!r}")


def _wants_asan(flags: tuple[str, ...]) -> bool:
    return any(f.startswith("-fsanitize=") and "address" in f for f in flags)


def asan_runtime_loaded() -> bool | None:
    """Whether the ASan runtime is mapped into this process (None: cannot tell, no /proc)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return "libasan" in maps or "libclang_rt.asan" in maps


# ---- the cache key ------------------------------------------------------------


def source_hash(src: Path, sources: list[str]) -> str:
    """Hash of every source and header under ``src`` that a build may include."""
    digest = hashlib.sha256()
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in {".h", ".cuh", ".cpp", ".cu"})
    for path in files:
        digest.update(str(path.relative_to(src)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    digest.update(repr(sorted(sources)).encode())
    return digest.hexdigest()[:16]


def cpuinfo() -> str:
    """The first processor's block of /proc/cpuinfo (Linux), or "" where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return ""


def cpu_signature() -> str:
    """The CPU's model and instruction-set flags (Linux), for builds with -march=native."""
    info = cpuinfo()
    if not info:
        return os.uname().machine
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(keep)


def build_dir_for(name: str, src: Path, sources: list[str], flags: tuple[str, ...]) -> Path:
    cuda = f"cu{torch.version.cuda}" if any(s.endswith(".cu") for s in sources) else "cpu"
    abi = sysconfig.get_config_var("SOABI") or f"py{sys.version_info.major}{sys.version_info.minor}"
    cpu = cpu_signature() if "-march=native" in flags else ""
    key = hashlib.sha256(f"{source_hash(src, sources)}|{' '.join(flags)}|{cpu}".encode()).hexdigest()[:16]
    return cache_root() / f"{name}-torch{torch.__version__}-{cuda}-{abi}-{key}"


# ---- the lock -----------------------------------------------------------------


@contextlib.contextmanager
def build_lock(path: Path, timeout: float) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (flock), waiting at most ``timeout`` s.

    flock belongs to the open file, which the kernel closes when its process dies (the
    file is opened close-on-exec, so the compiler children never hold it): a killed
    builder leaves no lock. The holder writes its pid into the file, so a waiter can
    say who it is waiting for.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as exc:
        raise BuildError(f"cannot create the build lock {path}: {exc}; {_CACHE_HINT}") from exc
    with handle:
        start = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise BuildError(f"cannot lock {path}: {exc}; {_CACHE_HINT}") from exc
                waited = time.monotonic() - start
                if waited > timeout:
                    raise BuildError(
                        f"waited {timeout:.0f} s for another process building in {path.parent} "
                        f"({_lock_holder(handle)}); "
                        "raise TERMINATOR_BUILD_TIMEOUT or check for a hung build"
                    ) from None
                if not announced and waited > LOCK_ANNOUNCE_SECONDS:
                    print(
                        f"terminator: waiting for another build in {path.parent} "
                        f"({_lock_holder(handle)}; timeout {timeout:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                    announced = True
                time.sleep(LOCK_POLL_SECONDS)
        try:
            _record_holder(handle)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _record_holder(handle) -> None:
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {os.uname().nodename} {time.time():.0f}\n")
        handle.flush()
    except OSError:  # a read-only lock file still locks; the note is only informative
        pass


def _lock_holder(handle) -> str:
    """Who holds the lock, from the note its holder wrote, and whether that process lives."""
    try:
        handle.seek(0)
        pid_text, host, since = handle.read().split()[:3]
        pid = int(pid_text)
    except (OSError, ValueError):
        return "holder unknown"
    age = f"since {max(0.0, time.time() - float(since)):.0f} s"
    if host != os.uname().nodename:
        return f"held by process {pid} on {host} {age}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} that took it {age} is gone, so a process it started holds it"
    except PermissionError:
        pass
    return f"held by process {pid} {age}"


def lock_timeout() -> float:
    raw = os.environ.get("TERMINATOR_BUILD_TIMEOUT", "900")
    try:
        return float(raw)
    except ValueError:
        raise BuildError(f"TERMINATOR_BUILD_TIMEOUT must be a number of seconds, got {raw!r}") from None


# ---- build and load -----------------------------------------------------------


def _load_library(path: Path) -> None:
    torch.ops.load_library(str(path))


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache_state(library: Path, marker: Path) -> str | None:
    """None: a complete, intact build. "missing": nothing (usable) there. Else what is wrong."""
    if not (marker.is_file() and library.is_file()):
        return "missing"
    try:
        info = json.loads(marker.read_text())
        size, digest = info.get("library_size"), info.get("library_sha256")
    except (OSError, ValueError, AttributeError) as exc:
        return f"its marker {marker.name} is unreadable ({type(exc).__name__})"
    try:
        if size is not None and library.stat().st_size != size:
            return f"{library.name} has {library.stat().st_size} bytes, the build wrote {size}"
        if digest is not None and _file_digest(library) != digest:
            return f"{library.name} differs from what the build wrote (SHA-256)"
    except OSError:
        return "missing"  # removed under us: another process is rebuilding it
    return None


def build_and_load(
    name: str,
    src: Path,
    sources: list[str],
    *,
    cflags: tuple[str, ...] = CPP_FLAGS,
    cuda_cflags: tuple[str, ...] = CUDA_FLAGS,
    ldflags: tuple[str, ...] = LD_FLAGS,
    verbose: bool = False,
) -> BuildResult:
    """Builds ``sources`` (paths relative to ``src``) into a cached library and loads it.

    The library registers its ops with the dispatcher (``torch.ops.<namespace>``).
    Raises BuildError naming the cause, and what to do, when the build or the load fails.
    """
    start = time.monotonic()
    with_cuda = any(s.endswith(".cu") for s in sources)
    key_flags = cflags + (cuda_cflags if with_cuda else ()) + tuple(f"ld:{f}" for f in ldflags)
    build_dir = build_dir_for(name, src, sources, key_flags)
    library = build_dir / f"{name}.so"
    marker = build_dir / COMPLETE_MARKER
    if _wants_asan(cflags + ldflags) and asan_runtime_loaded() is False:
        raise BuildError(
            "TERMINATOR_SANITIZE=1 builds with AddressSanitizer, whose runtime must be loaded "
            "before anything else: run python with LD_PRELOAD=$(gcc -print-file-name=libasan.so) "
            "and ASAN_OPTIONS=detect_leaks=0 (tools/ci/sanitize.sh does this)"
        )

    # Fast path, no lock: an intact cached build.
    if _cache_state(library, marker) is None:
        try:
            _load_library(library)
            return BuildResult(library, built=False, seconds=time.monotonic() - start)
        except OSError:
            pass  # damaged in a way the checksum did not see: rebuilt below, under the lock
    try:
        build_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create the build cache {build_dir.parent}: {exc}; {_CACHE_HINT}") from exc
    with build_lock(build_dir.with_name(build_dir.name + ".lock"), lock_timeout()):
        state = _cache_state(library, marker)
        if state is None:  # intact: another process built it while we waited
            try:
                _load_library(library)
                return BuildResult(library, built=False, seconds=time.monotonic() - start)
            except OSError as exc:
                state = f"it does not load ({_first_line(exc.__cause__ or exc)})"
        if state != "missing":
            print(
                f"terminator: the cached build in {build_dir} is damaged: {state}; rebuilding it",
                file=sys.stderr,
                flush=True,
            )
        # We hold the lock, so anything here is left over from a build that died or a damaged one.
        shutil.rmtree(build_dir, ignore_errors=True)
        try:
            build_dir.mkdir(parents=True)
        except OSError as exc:
            raise BuildError(f"cannot create the build directory {build_dir}: {exc}; {_CACHE_HINT}") from exc
        _put_ninja_on_path()
        _check_compiler()
        print(f"terminator: compiling {name} into {build_dir} (first use; about a minute)", file=sys.stderr, flush=True)
        _compile(name, src, sources, build_dir, cflags, cuda_cflags, ldflags, with_cuda, verbose)
        info = {
            "torch": torch.__version__,
            "cuda": torch.version.cuda if with_cuda else None,
            "sources": sources,
            "cflags": list(cflags),
            "ldflags": list(ldflags),
            "built_at": time.time(),
            "seconds": round(time.monotonic() - start, 1),
            "library_size": library.stat().st_size,
            "library_sha256": _file_digest(library),
        }
        try:
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(info, indent=1))
            os.replace(tmp, marker)
        except OSError as exc:
            raise BuildError(f"cannot write {marker}: {exc}; {_CACHE_HINT}") from exc
    return BuildResult(library, built=True, seconds=time.monotonic() - start)


def _compile(name, src, sources, build_dir, cflags, cuda_cflags, ldflags, with_cuda, verbose) -> None:
    """Compiles and links with ninja, then loads the library (cpp_extension.load does both)."""
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            name=name,
            sources=[str(src / s) for s in sources],
            extra_cflags=list(cflags),
            extra_cuda_cflags=list(cuda_cflags),
            extra_ldflags=list(ldflags),
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # compiler errors, a compiler that cannot run, ...
        hint = "" if verbose else "; TERMINATOR_VERBOSE_BUILD=1 shows the compiler's output"
        raise BuildError(f"building {name} in {build_dir} failed: {_first_line(exc)}{hint}") from exc


def _check_compiler() -> None:
    """The C++ compiler cpp_extension will call ($CXX, else c++) must exist."""
    cxx = os.environ.get("CXX", "").strip()
    command = shlex.split(cxx)[0] if cxx else "c++"
    if shutil.which(command) is None:
        where = f"CXX={cxx!r} is not an executable" if cxx else "no 'c++' on PATH"
        raise BuildError(
            f"no C++ compiler: {where}; install one (e.g. apt-get install g++, or xcode-select "
            "--install on macOS) or set CXX to a compiler"
        )


def _put_ninja_on_path() -> None:
    """The PyPI ``ninja`` dependency lives in the environment's bin dir, which is not
    on PATH when Python runs without activating its virtual environment."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        raise BuildError(
            "ninja is not installed and not on PATH: pip install ninja (or apt-get install ninja-build)"
        ) from None
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def _first_line(exc: BaseException) -> str:
    """The most telling line of an error: a compiler diagnostic if there is one."""
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    for wanted in ("error:", "error"):
        found = [line.strip() for line in lines if wanted in line.lower()]
        if found:
            return found[0][:500]
    return lines[0][:500]


# ---- the backend choice ---------------------------------------------------------


def requested_backend() -> str:
    value = os.environ.get("TERMINATOR_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"TERMINATOR_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def select_backend() -> BackendInfo:
    """Builds/loads what TERMINATOR_BACKEND asks for and says what is active and why.

    auto: the compiled backend if it builds (with CUDA kernels where possible), else
    the reference with one warning naming the cause. cpp/cuda: that backend or a
    BuildError. reference: pure PyTorch, nothing is compiled.
    """
    requested = requested_backend()
    if requested == "reference":
        return BackendInfo("reference", "TERMINATOR_BACKEND=reference", requested)
    want_cuda, cuda_reason = cuda_build_status()
    if requested == "cuda" and not want_cuda:
        raise BuildError(f"TERMINATOR_BACKEND=cuda but the CUDA backend is unavailable: {cuda_reason}")
    sanitize = sanitize_requested()
    flags = build_flags()
    verbose = os.environ.get("TERMINATOR_VERBOSE_BUILD", "") == "1"
    try:
        src = source_dir()
        sources = cpp_sources(src) + (cuda_sources(src) if want_cuda else [])
        result = build_and_load(EXTENSION_NAME, src, sources, verbose=verbose, **flags)
    except BuildError as exc:
        if requested != "auto":
            raise
        warnings.warn(
            f"terminator: using the pure-PyTorch reference backend because {exc}", RuntimeWarning, stacklevel=3
        )
        return BackendInfo("reference", str(exc), requested)
    how = f"built in {result.seconds:.0f} s" if result.built else "loaded from the build cache"
    if sanitize:
        how += " (TERMINATOR_SANITIZE=1: ASan + UBSan build)"
    if want_cuda:
        return BackendInfo("cuda", f"{how}; {cuda_reason}", requested, str(result.library), ("cpu", "cuda"))
    return BackendInfo("cpp", f"{how}; CUDA kernels not built: {cuda_reason}", requested, str(result.library), ("cpu",))
