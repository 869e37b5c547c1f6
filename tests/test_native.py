"""The loader of the compiled kernels: a build that fails is a one-line fallback for users and an
error where kernels are required (CI), never a silent skip."""

from pathlib import Path

import pytest

from patchsparse import native
from patchsparse.learn import fused
from patchsparse.kernels import cpu as cpu_kernel
from patchsparse.native import KernelBuildError, NativeKernel

BROKEN_SOURCE = "this is not C++ at all;\n"  # fails at once, before any header is read


@pytest.fixture
def broken_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(native.OFF_SWITCH, raising=False)
    monkeypatch.delenv(native.REQUIRE, raising=False)
    source = tmp_path / "broken.cpp"
    source.write_text(BROKEN_SOURCE)
    return NativeKernel("broken_for_test", source, ["-O0"], label="broken test")


def test_a_failed_build_falls_back_with_one_line(broken_kernel, capsys):
    assert broken_kernel.load() is None
    assert broken_kernel.status().startswith("could not be built (")
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "could not be built" in ln]
    assert len(warnings) == 1
    assert warnings[0].startswith("patchsparse: the broken test kernel could not be built (")
    assert warnings[0].endswith("; using the PyTorch reference")
    assert broken_kernel.load() is None          # tried once: no second build, no second warning
    assert "could not be built" not in capsys.readouterr().err


def test_a_failed_build_is_an_error_where_kernels_are_required(broken_kernel, monkeypatch, capsys):
    monkeypatch.setenv(native.REQUIRE, "1")
    with pytest.raises(KernelBuildError, match=r"broken test kernel is required .* could not be built") as info:
        broken_kernel.load()
    assert info.value.__cause__ is not None      # the compiler's own error travels with it
    with pytest.raises(KernelBuildError):        # and every later call fails too
        broken_kernel.load()
    assert broken_kernel.status().startswith("could not be built")  # status never raises
    assert "using the PyTorch reference" not in capsys.readouterr().err


def test_the_off_switch_builds_nothing(broken_kernel, tmp_path, monkeypatch):
    monkeypatch.setenv(native.OFF_SWITCH, "1")
    assert broken_kernel.load() is None
    assert broken_kernel.status() == "disabled by PATCHSPARSE_NO_KERNELS"
    assert not (tmp_path / "cache").exists()
    broken_kernel.reset()
    monkeypatch.setenv(native.REQUIRE, "1")      # required and switched off: an error, not a skip
    with pytest.raises(KernelBuildError, match="disabled by PATCHSPARSE_NO_KERNELS"):
        broken_kernel.load()


def test_build_folder_is_keyed_by_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHSPARSE_CACHE", str(tmp_path))
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int f() { return 1; }\n")
    b.write_text("int f() { return 2; }\n")
    folder = NativeKernel("k", a, ["-O3"]).build_directory()
    assert folder.parent == tmp_path / "kernels" and folder.name.startswith("k-")
    assert NativeKernel("k", a, ["-O3"]).build_directory() == folder
    assert NativeKernel("k", b, ["-O3"]).build_directory() != folder          # an edited source rebuilds
    assert NativeKernel("k", a, ["-O2"]).build_directory() != folder          # so do other flags


def test_both_kernels_use_the_shared_loader_and_ci_requires_them():
    assert isinstance(cpu_kernel.KERNEL, NativeKernel) and isinstance(fused.KERNEL, NativeKernel)
    assert cpu_kernel.KERNEL.source.is_file() and fused.KERNEL.source.is_file()
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "PATCHSPARSE_REQUIRE_KERNELS=1" in ci
