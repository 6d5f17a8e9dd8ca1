"""``cpu_allocator: keep`` (gin_adapter/compare/allocator.py): a freed large CPU tensor stays mapped and the next
one reuses it without page faults; ``system`` leaves glibc's defaults, which give it back to the OS at once.

Each setting runs in a fresh interpreter: it is process-wide and cannot be undone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gin_adapter.compare.allocator import _glibc, configure_cpu_allocator
from gin_adapter.compare.config import TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
PAGES_64_MIB = 64 * MIB // 4096

REUSE = """
import json, resource, sys, torch
from gin_adapter.compare.allocator import configure_cpu_allocator
from gin_adapter.compare.memory import resident_bytes
setting = configure_cpu_allocator(sys.argv[1])
def touch():  # 64 MiB, every page written
    t = torch.empty(16 * 2**20)
    t.fill_(1.0)
    return t
t = touch()
before = resident_bytes(); del t; given_back = before - resident_bytes()
for _ in range(2):  # warm-up: the first reuse may still fault the block in once (the heap's top grows into it)
    t = touch(); del t
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    t = touch(); del t
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"setting": setting, "given_back": given_back, "faults": faults}))
"""

# a trial measured after a larger one: with "keep" the larger one's freed memory is still resident
TRIALS = """
import json, sys, torch
from gin_adapter.compare.allocator import configure_cpu_allocator
from gin_adapter.compare.memory import PeakMemory
configure_cpu_allocator(sys.argv[1])
def trial(mib):
    with PeakMemory(torch.device("cpu"), interval_s=60.0) as peak:  # read on exit, with the blocks still alive
        blocks = [torch.ones(2**18) for _ in range(mib)]  # 1 MiB each, every page written
    del blocks
    return peak.result()["increase_mb"]
print(json.dumps({"large": trial(512), "small": trial(64)}))
"""


def run_script(script: str, choice: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, choice], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None or not Path("/proc/self/statm").exists(), reason="mallopt is glibc's; resident set from /proc")
def test_keep_reuses_freed_memory_without_page_faults() -> None:
    kept, system = run_script(REUSE, "keep"), run_script(REUSE, "system")
    if kept["setting"] == "keep (mmap threshold 32 MiB)":
        pytest.skip("this glibc (< 2.35) caps the mmap threshold at 32 MiB: a 64 MiB tensor is its own mmap either way")
    assert kept["setting"] == "keep" and system["setting"] == "system"
    # glibc's defaults: a 64 MiB block is its own mmap, unmapped on free, faulted in again every time
    assert system["given_back"] >= 56 * MIB
    assert system["faults"] >= 5 * 32  # at least one fault per 2 MiB (huge pages), 5 x 16384 with 4 KiB pages
    # keep: the block stays in the heap and is reused (well under 1 % of its pages fault again)
    assert kept["given_back"] < 8 * MIB
    assert kept["faults"] < 5 * PAGES_64_MIB // 100


@pytest.mark.skipif(_glibc() is None or not Path("/proc/self/statm").exists(), reason="malloc_trim is glibc's; resident set from /proc")
@pytest.mark.parametrize("choice", ["keep", "system"])
def test_each_trial_peak_is_its_own(choice: str) -> None:
    """PeakMemory gives kept free pages back first, so a 64 MiB trial after a 512 MiB one reports about 64 MiB."""
    peaks = run_script(TRIALS, choice)
    assert peaks["large"] >= 480
    assert 48 <= peaks["small"] < 160, peaks


def test_unknown_choice_says_what_to_use() -> None:
    with pytest.raises(ValueError, match=r"cpu_allocator='fast' is not supported; use one of \['keep', 'system'\]"):
        configure_cpu_allocator("fast")
    with pytest.raises(ValueError, match=r"cpu_allocator='fast' is not supported; use one of \['keep', 'system'\]"):
        TrainingConfig.from_dict({"method": "gin", "cpu_allocator": "fast"})
    assert TrainingConfig.from_dict({"method": "gin"}).cpu_allocator == "keep"
    assert "cpu_allocator" not in TrainingConfig.from_dict({"method": "gin"}).comparable_dict()  # may change on --resume
