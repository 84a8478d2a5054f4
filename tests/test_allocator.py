"""The glibc allocator setting that CPU runs of the command line make."""

import os
import pathlib
import subprocess
import sys

import pytest

import main_feat_maps
from engine import keep_freed_memory
from engine.allocator import _glibc_version, allocator_setting

ROOT = pathlib.Path(__file__).resolve().parent.parent
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def _has_glibc():
    return sys.platform == "linux" and _glibc_version().startswith("glibc")


needs_glibc = pytest.mark.skipif(not _has_glibc(), reason="the setting exists only in glibc")

# Allocates and frees 256 MiB, then prints how many MiB of it stay resident.
_PROBE = """
import os, sys
import numpy as np
from engine import keep_freed_memory
from engine.allocator import _glibc_version, allocator_setting

if sys.argv[1] == "1":
    assert keep_freed_memory()

def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = resident_bytes()
array = np.ones(32 << 20)
del array
print((resident_bytes() - before) // (1 << 20))
"""


@pytest.fixture
def default_environment(monkeypatch):
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)


def _memory_kept_after_free(setting):
    environment = {name: value for name, value in os.environ.items() if name not in USER_SETTINGS}
    completed = subprocess.run(
        [sys.executable, "-c", _PROBE, setting],
        capture_output=True, text=True, cwd=ROOT, env=environment, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    return int(completed.stdout.split()[-1])


@needs_glibc
def test_setting_applies_under_glibc(default_environment):
    assert keep_freed_memory() is True


@needs_glibc
def test_freed_memory_stays_with_setting():
    assert _memory_kept_after_free("1") >= 200


@needs_glibc
def test_freed_memory_returns_without_setting():
    assert _memory_kept_after_free("0") < 32


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ("MALLOC_TOP_PAD_", "131072"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
    ],
)
def test_environment_setting_wins(default_environment, monkeypatch, name, value):
    monkeypatch.setenv(name, value)

    assert keep_freed_memory() is False


@needs_glibc
def test_other_tunables_do_not_block(default_environment, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcap_mask=0")

    assert keep_freed_memory() is True


def test_command_line_sets_allocator_for_cpu_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(main_feat_maps, "keep_freed_memory", lambda: calls.append("set") or True)

    status = main_feat_maps.main([
        "--models_names", "resnet18", "--torchvision", "1", "--pretrained", "0", "--input_shape", "32",
        "--layers_depth", "1", "--CKA_type", "linear_CKA", "--dataset", "sample_photos", "--device", "-1",
        "--batch_size", "4", "--dataloader_size", "1", "--no_progress", "--output_path", str(tmp_path / "out"),
    ])

    assert status == 0
    assert calls == ["set"]


class _FakeLibc:
    """A C library whose mallopt accepts mmap thresholds up to ``largest`` bytes."""

    def __init__(self, largest):
        self.calls = []

        # A function rather than a method, so that the code under test can set argtypes.
        def mallopt(parameter, value):
            self.calls.append((parameter, value))
            return int(parameter != -3 or value <= largest)

        self.mallopt = mallopt


def _with_fake_libc(monkeypatch, libc):
    import engine.allocator

    monkeypatch.setattr(engine.allocator, "_applied_setting", None)
    monkeypatch.setattr(engine.allocator.sys, "platform", "linux")
    monkeypatch.setattr(engine.allocator, "_glibc_version", lambda: "glibc 2.30")
    monkeypatch.setattr(engine.allocator.ctypes, "CDLL", lambda name: libc)


def test_large_threshold_rejected_falls_back(default_environment, monkeypatch):
    libc = _FakeLibc(largest=32 << 20)
    _with_fake_libc(monkeypatch, libc)

    assert keep_freed_memory() is True
    assert libc.calls == [(-3, 1 << 30), (-3, 32 << 20), (-1, 2**31 - 1)]
    assert "mmap threshold 33554432 bytes" in allocator_setting()


def test_every_threshold_rejected_keeps_defaults(default_environment, monkeypatch):
    # Setting the trim threshold alone would freeze the mmap threshold at 128 KiB.
    libc = _FakeLibc(largest=0)
    _with_fake_libc(monkeypatch, libc)

    assert keep_freed_memory() is False
    assert [parameter for parameter, _ in libc.calls] == [-3, -3]
    assert allocator_setting() == "the C library's defaults"


def test_setting_names_environment_variables(default_environment, monkeypatch):
    import engine.allocator

    monkeypatch.setattr(engine.allocator, "_applied_setting", None)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")

    assert allocator_setting() == "set by the environment: MALLOC_TOP_PAD_"
