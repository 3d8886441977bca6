"""train.cpu_allocator: caching — freed CPU blocks are reused instead of being faulted in again."""

import subprocess
import sys

import pytest

# A step-like pattern: a few large buffers allocated, written and freed, over and over. Two
# rounds of warm-up let the heap reach its working size (glibc keeps a freed aligned block one
# alignment short of the same request, so reuse needs neighbours to coalesce first).
PROBE = r"""
import resource, sys
import torch
if sys.argv[1] == "caching":
    from megacpt.train.cpu_alloc import use_caching_malloc
    assert use_caching_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rounds(n):
    for _ in range(n):
        bufs = [torch.ones(m) for m in (16 * 2**20, 9 * 2**20, 3 * 2**20)]  # 64, 36, 12 MiB
        del bufs
rounds(10)
before = faults()
rounds(10)
print(faults() - before)
"""
PAGES = 10 * (64 + 36 + 12) * 2**20 // 4096


def _faults(mode: str) -> int:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_caching_malloc_reuses_freed_blocks():
    # With malloc's defaults the 64 and 36 MiB blocks are fresh mmaps every time: their pages fault again.
    assert _faults("system") > 0.8 * PAGES
    # Kept in the heap, the same memory is reused: (almost) no new pages.
    assert _faults("caching") < 0.02 * PAGES
