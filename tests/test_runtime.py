"""dmm_jax.runtime: retain_freed_memory reuses a freed large buffer without page faults (glibc
only), on the main thread and on others (XLA's scratch buffers are allocated by its worker
threads); compiler_options picks XLA options the installed jaxlib accepts, on CPU only."""

import subprocess
import sys

import pytest

# Allocates, writes and frees a 96 MiB buffer, on the main thread or on a new thread each round,
# and prints the page faults of later rounds. 96 MiB is above glibc's 64 MiB heap size for
# threads' own arenas, which it serves with mmap whatever M_MMAP_MAX says.
_FAULTS = """
import ctypes, resource, sys, threading
from dmm_jax.runtime import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory() is True
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def allocate():  # as XLA's runtime does (numpy would madvise huge pages)
    buffer = libc.malloc(96 * 2**20)
    ctypes.memset(buffer, 1, 96 * 2**20)
    libc.free(buffer)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if sys.argv[2] == "thread":
        worker = threading.Thread(target=allocate)
        worker.start()
        worker.join()
    else:
        allocate()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(min(faults() for _ in range(3)))
"""


def _minor_faults(mode: str, where: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode, where], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
@pytest.mark.parametrize("where", ["main", "thread"])
def test_freed_large_buffers_are_reused_instead_of_faulted_in_again(where):
    fresh, retained = _minor_faults("default", where), _minor_faults("retain", where)
    assert fresh > 100, "glibc maps a 96 MiB buffer anew on every allocation by default"
    assert retained < fresh / 10


def test_compiler_options_are_for_cpu_only_and_leave_the_values_alone():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dmm_jax.runtime import compiler_options

    assert compiler_options("gpu") == {} and compiler_options("tpu") == {}
    options = compiler_options("cpu")
    assert options in ({}, {"xla_cpu_use_fusion_emitters": False})  # {}: a jaxlib without it
    if jax.__version_info__ >= (0, 10):  # the installed jaxlib knows the option
        assert options == {"xla_cpu_use_fusion_emitters": False}

    def fn(x):
        return jnp.tanh(x) * jax.nn.softplus(x[::-1]) + jnp.exp(-(x**2))

    x = jnp.linspace(-4.0, 4.0, 1001)
    tuned = jax.jit(fn, compiler_options=options or None)(x)
    np.testing.assert_allclose(tuned, jax.jit(fn)(x), rtol=1e-6, atol=1e-7)
