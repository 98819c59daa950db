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
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
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
CPP_SOURCES = ("terminator.cpp", "fft_conv.cpp", "cpu/kernels.cpp")
CPP_FLAGS = ("-O3", "-fopenmp")  # ATen's parallel_for is OpenMP in the headers
CUDA_FLAGS = ("-O3", "--expt-relaxed-constexpr")
LOCK_POLL_SECONDS = 0.2
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
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "terminator-hyperzzw"


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


# ---- the cache key ------------------------------------------------------------


def source_hash(src: Path, sources: list[str]) -> str:
    """Hash of every source and header under ``src`` that a build may include."""
    digest = hashlib.sha256()
    files = sorted(
        p for p in src.rglob("*") if p.is_file() and p.suffix in {".h", ".cuh", ".cpp", ".cu"}
    )
    for path in files:
        digest.update(str(path.relative_to(src)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    digest.update(repr(sorted(sources)).encode())
    return digest.hexdigest()[:16]


def build_dir_for(name: str, src: Path, sources: list[str], flags: tuple[str, ...]) -> Path:
    cuda = f"cu{torch.version.cuda}" if any(s.endswith(".cu") for s in sources) else "cpu"
    abi = sysconfig.get_config_var("SOABI") or f"py{sys.version_info.major}{sys.version_info.minor}"
    key = hashlib.sha256(f"{source_hash(src, sources)}|{' '.join(flags)}".encode()).hexdigest()[:16]
    return cache_root() / f"{name}-torch{torch.__version__}-{cuda}-{abi}-{key}"


# ---- the lock -----------------------------------------------------------------


@contextlib.contextmanager
def build_lock(path: Path, timeout: float) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (flock), waiting at most ``timeout`` s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise BuildError(
                        f"waited {timeout:.0f} s for another process building in {path.parent}; "
                        "raise TERMINATOR_BUILD_TIMEOUT or check for a hung build"
                    ) from None
                time.sleep(LOCK_POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_timeout() -> float:
    raw = os.environ.get("TERMINATOR_BUILD_TIMEOUT", "900")
    try:
        return float(raw)
    except ValueError:
        raise BuildError(f"TERMINATOR_BUILD_TIMEOUT must be a number of seconds, got {raw!r}") from None


# ---- build and load -----------------------------------------------------------


def _load_library(path: Path) -> None:
    torch.ops.load_library(str(path))


def build_and_load(
    name: str,
    src: Path,
    sources: list[str],
    *,
    cflags: tuple[str, ...] = CPP_FLAGS,
    cuda_cflags: tuple[str, ...] = CUDA_FLAGS,
    verbose: bool = False,
) -> BuildResult:
    """Builds ``sources`` (paths relative to ``src``) into a cached library and loads it.

    The library registers its ops with the dispatcher (``torch.ops.<namespace>``).
    Raises BuildError naming the cause when the build or the load fails.
    """
    from torch.utils import cpp_extension

    start = time.monotonic()
    with_cuda = any(s.endswith(".cu") for s in sources)
    build_dir = build_dir_for(name, src, sources, cflags + (cuda_cflags if with_cuda else ()))
    library = build_dir / f"{name}.so"
    marker = build_dir / COMPLETE_MARKER

    def finished() -> bool:
        return marker.is_file() and library.is_file()

    if finished():
        _load_library(library)
        return BuildResult(library, built=False, seconds=time.monotonic() - start)
    try:
        build_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create the build cache {build_dir.parent}: {exc}; "
                         "set TERMINATOR_CACHE_DIR to a writable directory") from exc
    with build_lock(build_dir.with_name(build_dir.name + ".lock"), lock_timeout()):
        if finished():  # another process built it while we waited
            _load_library(library)
            return BuildResult(library, built=False, seconds=time.monotonic() - start)
        # We hold the lock, so anything here is left over from a build that died.
        shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True)
        _put_ninja_on_path()
        print(f"terminator: compiling {name} into {build_dir} (first use; about a minute)",
              file=sys.stderr, flush=True)
        try:
            cpp_extension.load(
                name=name,
                sources=[str(src / s) for s in sources],
                extra_cflags=list(cflags),
                extra_cuda_cflags=list(cuda_cflags),
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(src)],
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as exc:  # compiler errors, missing ninja/compiler, ...
            raise BuildError(f"building {name} in {build_dir} failed: {_first_line(exc)}") from exc
        info = {"torch": torch.__version__, "cuda": torch.version.cuda if with_cuda else None,
                "sources": sources, "cflags": list(cflags), "built_at": time.time(),
                "seconds": round(time.monotonic() - start, 1)}
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, marker)
    return BuildResult(library, built=True, seconds=time.monotonic() - start)


def _put_ninja_on_path() -> None:
    """The PyPI ``ninja`` dependency lives in the environment's bin dir, which is not
    on PATH when Python runs without activating its virtual environment."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        raise BuildError("ninja is not installed: pip install ninja") from None
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if "error" in line.lower()] or text.splitlines()
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
    src = source_dir()
    sources = list(CPP_SOURCES) + (cuda_sources(src) if want_cuda else [])
    verbose = os.environ.get("TERMINATOR_VERBOSE_BUILD", "") == "1"
    try:
        result = build_and_load(EXTENSION_NAME, src, sources, verbose=verbose)
    except BuildError as exc:
        if requested != "auto":
            raise
        warnings.warn(f"terminator: using the pure-PyTorch reference backend because {exc}",
                      RuntimeWarning, stacklevel=3)
        return BackendInfo("reference", str(exc), requested)
    how = f"built in {result.seconds:.0f} s" if result.built else "loaded from the build cache"
    if want_cuda:
        return BackendInfo("cuda", f"{how}; {cuda_reason}", requested, str(result.library), ("cpu", "cuda"))
    return BackendInfo("cpp", f"{how}; CUDA kernels not built: {cuda_reason}", requested,
                       str(result.library), ("cpu",))
