"""retain_freed_memory: a freed large buffer is reused without page faults (glibc only)."""

import subprocess
import sys

import pytest

# Allocates, writes and frees a 64 MiB buffer, and prints the page faults of later rounds.
_FAULTS = """
import resource, sys
import numpy as np
from dmm_jax.runtime import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory() is True
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = np.ones(16 * 2**20, np.float32)
    del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(min(faults() for _ in range(3)))
"""


def _minor_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_large_buffers_are_reused_instead_of_faulted_in_again():
    fresh, retained = _minor_faults("default"), _minor_faults("retain")
    assert fresh > 100, "glibc maps a 64 MiB buffer anew on every allocation by default"
    assert retained < fresh / 10
