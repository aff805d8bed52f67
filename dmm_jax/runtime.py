"""Settings that make jitted training faster on CPU without changing what it computes.

XLA's CPU runtime asks ``malloc`` for one large scratch buffer on every call of a compiled
step (about 60 MB for a JSB mini-batch of 96 steps). glibc serves any request above 32 MB with
a fresh ``mmap`` and unmaps it on ``free``, so every update page-faults its whole scratch
space back in and the kernel zeroes it: about a tenth of a bucketed JSB epoch on a 2-core CPU.
``retain_freed_memory`` makes glibc serve such buffers from its heap and keep freed memory for
the next call instead. It also puts every thread on the one main heap: XLA's worker threads
allocate from arenas of their own, whose heaps are at most 64 MB, and glibc serves anything
larger there with mmap whatever M_MMAP_MAX says (a JSB mini-batch padded to 144 steps needs
more: an update of 20 sequences of 8 real steps took 77 ms instead of 40). The peak resident
memory is unchanged (the same buffers are live at once); memory freed after the peak is not
handed back to the system until the process exits. That is not free everywhere: it raised the
peak of ``dmm-jax evaluate`` (1.4 GB resident without it, 1.8-2.4 GB with it, for the same
importance-sampled JSB evaluation), so ``dmm-jax`` applies it to ``train`` only.

The one arena costs compile time: compiling the three shapes of a bucketed JSB run took
14.4-14.5 s with these settings and 11.5-11.9 s without (2-core Intel Xeon, 2026-12-03);
the arena limit alone makes that difference, presumably because XLA's compile threads then
contend for one heap's lock. Applying them only after compiling does not work: the threads
that run the step have arenas of their own by then, and an update of a 144-step batch
page-faulted 20,400 times instead of 2,000.

``compiler_options`` holds the XLA options dmm_jax compiles its training step with: on CPU,
XLA's older loop emitters for elementwise fusions instead of the MLIR fusion emitters (jaxlib
0.10's default), which compile a JSB training step in 50-60% of the time. A loop-emitter
kernel whose output buffer is one of its inputs (XLA reuses a dying operand's buffer) runs
unvectorized: LLVM guards the vector loop with a runtime overlap check that in-place
operands fail. ``dmm_jax.scans`` keeps the one such kernel found to matter (the tanh in the
guide's sampling loop) off its input's buffer; since then, the four loops run as fast with
these emitters as with the fusion emitters, and three bucketed updates took the same time
with either (min of 40, alternating in one process: 583 and 578 ms on a 2-core Xeon).
"""

from __future__ import annotations

import ctypes
import functools
import sys

import jax

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_freed_memory() -> bool:
    """Have glibc's malloc reuse freed memory for large buffers (one arena, no mmap, no trimming).

    Returns True when the setting was applied, False where the C library is not glibc
    (macOS, musl, Windows): there it does nothing. Call it once, early (before the threads that
    allocate start); ``dmm-jax train`` does, and the benchmarks do for dmm_jax's workers.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError where libc is not glibc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return (
        bool(mallopt(_M_ARENA_MAX, 1))
        and bool(mallopt(_M_MMAP_MAX, 0))
        and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    )


# Measured on 2-core Intel Xeon machines, 2026-12-03. One JSB update (20 x 96 steps, real-step
# rows), three alternating runs each: 6.6-7.8 s to compile instead of 11.2-15.3 s, 103-138 ms
# per update against 112-148 ms. Three bucketed updates alternating in one
# process: 17.3 s to compile instead of 33.5 s, 344 ms against 329 ms (min of 40).
_CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def compiler_options(platform: str) -> dict[str, bool]:
    """XLA compile options for dmm_jax's training step on ``platform`` ("cpu", "gpu", "tpu").

    On CPU: ``xla_cpu_use_fusion_emitters=False`` (see the module docstring), where the
    installed jaxlib knows the option; elsewhere, and with a jaxlib that does not, {} (XLA's
    defaults). Pass the result to ``jax.jit(..., compiler_options=...)``.
    """
    if platform != "cpu" or not _cpu_options_supported():
        return {}
    return dict(_CPU_COMPILER_OPTIONS)


@functools.cache
def _cpu_options_supported() -> bool:
    """Whether this jaxlib's CPU compiler accepts ``_CPU_COMPILER_OPTIONS`` (older ones raise
    "No such compile option")."""
    try:
        probe = jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS)
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        probe.lower(jax.ShapeDtypeStruct((), "float32", sharding=cpu)).compile()
    except Exception:  # noqa: BLE001 - any refusal means: compile with XLA's defaults
        return False
    return True
