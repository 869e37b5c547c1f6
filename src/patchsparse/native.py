"""The compiled C++ kernels: built on first use, cached, optional — one loader for all of them.

`torch.utils.cpp_extension.load` compiles a kernel's source with the machine's C++ compiler (and
`ninja`) into a cache folder keyed by the source, the torch version, the flags and the CPU, so a
cache shared between machines never runs code built for another CPU. Builds are serialised by one
lock (torch also locks the folder against other processes).

When a kernel cannot be built (no compiler, no ninja, a build error), callers use their pure-PyTorch
reference; one line on stderr says so, and `status()` says why. Two environment variables:

* PATCHSPARSE_NO_KERNELS=1 — never build or load a compiled kernel (the references everywhere).
* PATCHSPARSE_REQUIRE_KERNELS=1 — a kernel that cannot be loaded is an error (`KernelBuildError`),
  not a fallback. The test suite runs with it in CI, so a broken kernel fails the suite instead
  of skipping its tests.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path
from types import ModuleType
from typing import Sequence

OFF_SWITCH = "PATCHSPARSE_NO_KERNELS"
REQUIRE = "PATCHSPARSE_REQUIRE_KERNELS"

_lock = threading.Lock()  # one build at a time, for every kernel


class KernelBuildError(RuntimeError):
    """A compiled kernel is required (PATCHSPARSE_REQUIRE_KERNELS=1) but could not be loaded."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def kernels_required() -> bool:
    return _flag(REQUIRE)


def _cpu_identity() -> str:
    """The CPU model and feature flags (Linux), else the platform string."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _put_ninja_on_path() -> None:
    """torch looks for `ninja` on PATH; the PyPI package's binary is not there unless the venv is active."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


def _summary(exc: BaseException) -> str:
    """One line for a failed build: the compiler's first error, else the exception's last line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    first_error = next((ln for ln in lines if " error: " in ln), None)
    return f"{type(exc).__name__}: {(first_error or lines[-1])[:200]}"


class NativeKernel:
    """One C++ source built into one Python module on first use (thread-safe, tried once)."""

    def __init__(self, name: str, source: Path, cflags: Sequence[str], ldflags: Sequence[str] = ("-fopenmp",),
                 label: str | None = None):
        self.name = name              # module name is patchsparse_<name>; cache folder <name>-<key>
        self.source = Path(source)
        self.cflags = list(cflags)
        self.ldflags = list(ldflags)
        self.label = label or name    # for messages
        self._module: ModuleType | None = None
        self._status: str | None = None  # None = not tried yet
        self._error: BaseException | None = None  # the build's own error (compiler output)

    def build_directory(self) -> Path:
        import torch

        from patchsparse.utils import cache_root

        key = hashlib.sha256(b"\0".join([self.source.read_bytes(), torch.__version__.encode(),
                                         " ".join(self.cflags).encode(), _cpu_identity().encode()])).hexdigest()[:16]
        return cache_root() / "kernels" / f"{self.name}-{key}"

    def load(self) -> ModuleType | None:
        """The compiled module, building it the first time; None when it cannot be built here
        (KernelBuildError instead when PATCHSPARSE_REQUIRE_KERNELS=1)."""
        if self._status is None:  # checked before taking the lock: load() runs on every forward
            with _lock:
                if self._status is None:
                    self._try_load()
        if self._module is None and kernels_required():
            raise KernelBuildError(f"the {self.label} kernel is required ({REQUIRE}=1) but {self._status}") \
                from self._error
        return self._module

    def _try_load(self) -> None:
        from patchsparse.utils import log

        if _flag(OFF_SWITCH):
            self._status = f"disabled by {OFF_SWITCH}"
            return
        try:
            from torch.utils.cpp_extension import load

            _put_ninja_on_path()
            directory = self.build_directory()
            directory.mkdir(parents=True, exist_ok=True)
            if not any(directory.glob("*.so")):
                log(f"building the {self.label} kernel (once per machine, about a minute) …")
            self._module = load(name=f"patchsparse_{self.name}", sources=[str(self.source)],
                                extra_cflags=self.cflags, extra_ldflags=self.ldflags,
                                build_directory=str(directory), verbose=False)
            self._status = "built"
        except Exception as exc:  # no compiler, no ninja, a build error: the reference still works
            self._module, self._error = None, exc
            self._status = f"could not be built ({_summary(exc)})"
            if not kernels_required():
                log(f"patchsparse: the {self.label} kernel {self._status}; using the PyTorch reference")

    def status(self) -> str:
        """'built', 'disabled by …' or 'could not be built (…)'. Never raises."""
        try:
            self.load()
        except KernelBuildError:
            pass
        return self._status or "unknown"

    def reset(self) -> None:
        """Forget the outcome, so the next load() tries again (tests)."""
        with _lock:
            self._module, self._status, self._error = None, None, None
