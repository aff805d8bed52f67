"""Seconds per JSB epoch: dmm_jax against the PyTorch/Pyro reference, in one run, and the
VRNN, the NADE emission and the multi-sample objectives beside the DMM (``--impls
dmm_jax,vrnn,dmm_nade,dmm_iwae4,dmm_fivo4,vrnn_fivo4``).

Each implementation lives in its own worker process (so its threads, memory peak and compile
cache are its own); the driver asks the workers for one epoch at a time, alternating between
them, so that both see the same machine. Every worker trains on the same data with the same
hyperparameters and seed. Reported: the median seconds per epoch after warm-up, compile time,
shapes compiled, peak memory, achieved GFLOP/s against a large matmul measured in the same run,
the training loss after the same number of epochs, the ratio reference / dmm_jax, and a floor:
what an epoch would take if it did nothing but its matmuls, the step-by-step ones at the rate
of a lone [20, 600] x [600, 600] matmul in a loop and the rest at the large matmul's rate, both
measured in the same run (``floor_seconds``).

    python benchmarks/epoch_time.py --epochs 7 --out epoch_time.json
    python benchmarks/epoch_time.py --impls dmm_jax,dmm_jax_bucketed   # without the reference
    python benchmarks/epoch_time.py --impls dmm_jax,dmm_nade,dmm_fivo4,vrnn,vrnn_fivo4
    python benchmarks/epoch_time.py --table-from epoch_time.json      # docs/PERFORMANCE.md's table

On a GPU: `--reference-device cuda` runs the reference there too (its `--cuda`), and
`--matmul-precision highest` keeps dmm_jax's float32 matmuls float32 (JAX's default lets a
GPU use TF32); `benchmarks/gpu_check.sh` is the whole run on a GPU machine.

Needs `pip install -e .[bench]` for the reference (torch 2.13.0 CPU + pyro-ppl).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

# dmm_jax's variants: (family, model config changes, train config changes) from the defaults
# (the DMM at the reference's settings, the VRNN at its own), random batches unless bucketed.
VARIANTS = {
    "dmm_jax": ("dmm", {}, {}),
    "dmm_jax_bucketed": ("dmm", {}, {"length_bucketing": True}),
    "vrnn": ("vrnn", {}, {}),
    "dmm_nade": ("dmm", {"emission": "nade"}, {}),
    "dmm_iwae4": ("dmm", {}, {"objective": "iwae", "particles": 4}),
    "dmm_fivo4": ("dmm", {}, {"objective": "fivo", "particles": 4}),
    "vrnn_fivo4": ("vrnn", {}, {"objective": "fivo", "particles": 4}),
}
IMPLS = ("pyro_reference", *VARIANTS)
DMM_IMPLS = ("pyro_reference", "dmm_jax", "dmm_jax_bucketed")  # the FLOP count is theirs
HERE = Path(__file__).resolve().parent


def forward_flops_per_step(obs=88, z=100, emission=100, transition=200, rnn=600) -> int:
    """Multiply-adds x 2 of one (sequence, time step) through every network, forward."""
    rnn_flops = obs * rnn + rnn * rnn
    combiner = z * rnn + 2 * rnn * z
    trans = 2 * (z * transition + transition * z) + z * z + z * z
    emitter = z * emission + emission * emission + emission * obs
    return 2 * (rnn_flops + combiner + trans + emitter)


def loop_flops_per_step(batch: int = 20, z: int = 100, rnn: int = 600) -> int:
    """Multiply-adds x 2 of the matmuls that run step by step, per loop step of a batch: the
    RNN's [batch, rnn] x [rnn, rnn] and the combiner's z -> rnn and rnn -> (loc, scale), each
    forward and again in the backward loop (which carries only the state's cotangent)."""
    return 2 * 2 * batch * (rnn * rnn + z * rnn + 2 * rnn * z)


def loop_steps_per_epoch(
    lengths, batch_size: int = 20, length_grouped: bool = False, epochs: int = 16
) -> float:
    """Loop steps of an epoch (the sum of its batches' longest lengths: the recurrences stop
    there), averaged over ``epochs`` simulated epochs of the training's own batching."""
    import jax
    import numpy as np

    from dmm_jax.data.batching import epoch_batches

    lengths = np.asarray(lengths)
    totals = [
        sum(int(lengths[b].max()) for b in epoch_batches(key, lengths, batch_size, length_grouped))
        for key in (jax.random.PRNGKey(epoch) for epoch in range(epochs))
    ]
    return float(np.mean(totals))


def floor_seconds(
    loop_steps: float,
    real_steps: int,
    loop_gflops: float,
    matmul_gflops: float,
    batch_size: int = 20,
) -> float:
    """A lower bound on an epoch's time on this machine: the loops' matmuls at the rate of a
    lone recurrent matmul, every other FLOP of the real steps at the large matmul's rate, and
    nothing else (no elementwise work, no padding)."""
    sequential = loop_flops_per_step(batch_size) * loop_steps
    batched = (3 * forward_flops_per_step() - loop_flops_per_step(1)) * real_steps
    return sequential / loop_gflops / 1e9 + batched / matmul_gflops / 1e9


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (Linux; empty elsewhere), read once."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_signature() -> str:
    """The CPU's family, model and stepping numbers (Linux; '' elsewhere): they tell apart
    machines whose model name is only a brand, as 'AMD EPYC' on some virtual machines."""
    fields = _cpuinfo()
    return " ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)


def minutes_for_5000_epochs(seconds_per_epoch: float) -> float:
    """The reference's 5000 training epochs at this speed, in minutes (aim on a GPU: <= 10)."""
    return 5000 * seconds_per_epoch / 60


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a figure depends on (absent ones left out)."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "numpyro", "flax", "optax", "torch", "pyro-ppl"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def provenance(script: str, argv: list[str]) -> dict:
    """What a saved figure carries: its command, date, machine and package versions."""
    return {
        "command": shlex.join(["python", f"benchmarks/{script}", *argv]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_signature": cpu_signature(),
            "cpu_count": len(os.sched_getaffinity(0)),  # the cores this process may use
            "cpus_on_machine": os.cpu_count(),
        },
        "versions": package_versions(),
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- workers


def _jax_worker(args, impl: str):
    import jax

    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)

    from dmm_jax.config import DMMConfig, TrainConfig, VRNNConfig
    from dmm_jax.data import load_dataset
    from dmm_jax.data.batching import PaddedSequences
    from dmm_jax.runtime import retain_freed_memory
    from dmm_jax.train import UpdateStep, build_svi, init_train_state, train_epoch

    retain_freed_memory()  # as dmm-jax train does
    data = load_dataset("jsb_chorales", args.data)
    train = PaddedSequences(data.train.sequences)
    family, model_changes, train_changes = VARIANTS[impl]
    model_config = (VRNNConfig if family == "vrnn" else DMMConfig)(**model_changes)
    train_config = TrainConfig(seed=args.seed, **train_changes)
    svi = build_svi(model_config, train_config)
    state = init_train_state(svi, train_config.seed, model_config.obs_dim)
    update = UpdateStep(svi)
    info = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend()}
    if args.matmul_precision:
        info["platform"] += f", matmul precision {args.matmul_precision}"

    def run_epoch():
        nonlocal state
        start = time.perf_counter()
        state, loss, _ = train_epoch(update, state, train, train_config)
        return {
            "seconds": time.perf_counter() - start,
            "train_loss_per_step": loss / train.num_steps,
            "compiled_shapes": len(update.compiled_shapes),
            "compile_seconds": update.compile_seconds,
        }

    return info, run_epoch


def _reference_worker(args):
    import torch

    sys.path.insert(0, str(HERE))
    from pyro_reference import ReferenceTrainer, load_jsb

    if args.threads:
        torch.set_num_threads(args.threads)
    splits, _ = load_jsb(args.data)
    device = torch.device(args.reference_device)
    trainer = ReferenceTrainer(splits["train"], seed=args.seed, device=device)
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        info = {
            "device": torch.cuda.get_device_name(device),
            "platform": f"torch {torch.__version__}, TF32 matmul/cuDNN {tf32[0]}/{tf32[1]}",
        }
    else:
        info = {
            "device": "cpu",
            "platform": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        }

    def run_epoch():
        record = trainer.run_epoch()
        return {"seconds": record["seconds"], "train_loss_per_step": record["train_loss_per_step"]}

    return info, run_epoch


def worker_main(args) -> None:
    if args.worker == "pyro_reference":
        info, run_epoch = _reference_worker(args)
    else:
        info, run_epoch = _jax_worker(args, args.worker)
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        if line.strip() != "epoch":
            break
        print(json.dumps({**run_epoch(), "peak_rss_mib": peak_rss_mib()}), flush=True)


# ----------------------------------------------------------------------------- driver


def median_seconds(f, *args, repeats: int) -> float:
    """Median wall time of ``f(*args)`` (an array or a pytree of them) over ``repeats``
    calls, after one warm-up call."""
    import jax

    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(n: int = 2048, repeats: int = 10, precision: str | None = None) -> float:
    """GFLOP/s of an n x n float32 matmul under jit: the machine's practical ceiling."""
    import jax

    if precision:
        jax.config.update("jax_default_matmul_precision", precision)

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    return 2 * n**3 / median_seconds(jax.jit(lambda a: a @ a), a, repeats=repeats) / 1e9


def recurrent_matmul_gflops(
    batch: int = 20, hidden: int = 600, steps: int = 64, repeats: int = 20
) -> float:
    """GFLOP/s of the RNN's step, a [batch, hidden] x [hidden, hidden] matmul chained through a
    ``lax.fori_loop`` of ``steps`` (median over ``repeats``): the ceiling of sequential work."""
    import jax
    import jax.numpy as jnp

    # An orthogonal matrix keeps the chained state's scale (no overflow, no denormals).
    w, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(0), (hidden, hidden)))
    h0 = jax.random.normal(jax.random.PRNGKey(1), (batch, hidden))
    f = jax.jit(lambda h, w: jax.lax.fori_loop(0, steps, lambda _, h: h @ w, h))
    return 2 * batch * hidden * hidden * steps / median_seconds(f, h0, w, repeats=repeats) / 1e9


class Worker:
    def __init__(self, impl: str, args):
        cmd = [sys.executable, __file__, "--worker", impl, "--seed", str(args.seed)]
        if args.data:
            cmd += ["--data", args.data]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += ["--reference-device", args.reference_device]
        if args.matmul_precision:
            cmd += ["--matmul-precision", args.matmul_precision]
        self.impl = impl
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.impl} exited (code {self.proc.wait()})")
        return json.loads(line)

    def epoch(self) -> dict:
        self.proc.stdin.write("epoch\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def summarize(
    impl: str,
    info: dict,
    epochs: list[dict],
    warmup: int,
    real_steps: int,
    ceiling: float,
    floor: float | None = None,
):
    """One table row; ``floor``: ``floor_seconds`` for this implementation's batching."""
    steady = [e["seconds"] for e in epochs[warmup:]]
    median = statistics.median(steady)
    # forward + backward ~ 3x forward; counted for the DMM only
    flops = 3 * forward_flops_per_step() * real_steps if impl in DMM_IMPLS else None
    row = {
        "impl": impl,
        "where": f"{info['device']} ({info['platform']})",
        "seconds_per_epoch": median,
        "epochs_timed": len(steady),
        "first_epoch_seconds": epochs[0]["seconds"],
        "compile_seconds": epochs[-1].get("compile_seconds"),
        "compiled_shapes": epochs[-1].get("compiled_shapes"),
        "peak_rss_mib": epochs[-1]["peak_rss_mib"],
        "minutes_for_5000_epochs": minutes_for_5000_epochs(median),
        "useful_gflops_per_s": None if flops is None else flops / median / 1e9,
        "fraction_of_matmul": None if flops is None else flops / median / 1e9 / ceiling,
        "floor_seconds": floor,
        "loss_per_epoch": [e["train_loss_per_step"] for e in epochs],
    }
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}"
    )
    parser.add_argument("--epochs", type=int, default=7, help="epochs per implementation")
    parser.add_argument(
        "--warmup", type=int, default=2, help="leading epochs left out of the median"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data", default=None, help="JSB file or directory (default: $DMM_JAX_DATA_DIR)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--reference-device", default="cpu", help="torch device of the reference (cpu, cuda)"
    )
    parser.add_argument(
        "--matmul-precision",
        default=None,
        choices=("default", "high", "highest"),
        help="jax_default_matmul_precision for dmm_jax and the matmul ceiling (default: JAX's)",
    )
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument(
        "--table-from",
        default=None,
        metavar="JSON",
        help="print the markdown table of an earlier --out file and exit",
    )
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        print(format_table(saved["rows"], saved["epochs"]))
        return 0
    if args.worker:
        worker_main(args)
        return 0
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --impls {sorted(unknown)}; choose from {IMPLS}")
    if args.epochs <= args.warmup:
        parser.error("--epochs must exceed --warmup")

    from dmm_jax.data import load_dataset

    train = load_dataset("jsb_chorales", args.data).train
    real_steps = train.num_steps
    ceiling = matmul_gflops(precision=args.matmul_precision)
    loop_rate = recurrent_matmul_gflops()
    loop_steps = {
        impl: loop_steps_per_epoch(train.lengths, length_grouped=impl == "dmm_jax_bucketed")
        for impl in impls
    }
    floors = {
        impl: floor_seconds(steps, real_steps, loop_rate, ceiling) if impl in DMM_IMPLS else None
        for impl, steps in loop_steps.items()
    }
    print(
        f"large matmul: {ceiling:.0f} GFLOP/s; [20, 600] x [600, 600] in a loop: "
        f"{loop_rate:.0f} GFLOP/s",
        flush=True,
    )
    workers = [Worker(impl, args) for impl in impls]
    epochs = {w.impl: [] for w in workers}
    try:
        for epoch in range(args.epochs):
            for w in workers:
                record = w.epoch()
                epochs[w.impl].append(record)
                print(
                    f"{w.impl:18s} epoch {epoch}: {record['seconds']:.3f} s, "
                    f"loss {record['train_loss_per_step']:.4f}",
                    flush=True,
                )
    finally:
        for w in workers:
            w.close()
    rows = [
        summarize(w.impl, w.info, epochs[w.impl], args.warmup, real_steps, ceiling, floors[w.impl])
        for w in workers
    ]
    for r in rows:
        r["loop_steps_per_epoch"] = loop_steps[r["impl"]]
    reference = next((r for r in rows if r["impl"] == "pyro_reference"), None)
    for r in rows:
        r["speedup_vs_reference"] = (
            reference["seconds_per_epoch"] / r["seconds_per_epoch"] if reference else None
        )
    print(format_table(rows, args.epochs))
    if args.out:
        result = {
            "command": shlex.join(["python", "benchmarks/epoch_time.py", *(argv or sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d"),
            "versions": package_versions(),
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpu_model": cpu_model(),
            },
            "matmul_gflops_per_s": ceiling,
            "recurrent_matmul_gflops_per_s": loop_rate,
            "epochs": args.epochs,
            "warmup": args.warmup,
            "seed": args.seed,
            "reference_device": args.reference_device,
            "matmul_precision": args.matmul_precision,
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def format_table(rows: list[dict], epochs: int) -> str:
    head = (
        f"| impl | where | s/epoch (median) | compile s | shapes | peak RSS MiB | GFLOP/s (% of matmul) "
        f"| loss after {epochs} epochs | reference / impl | 5000 epochs, min | floor s (impl / floor) |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        compile_s = "-" if r["compile_seconds"] is None else f"{r['compile_seconds']:.1f}"
        floor = r.get("floor_seconds")  # absent from runs saved before it was measured
        floor = "-" if floor is None else f"{floor:.3f} ({r['seconds_per_epoch'] / floor:.1f}x)"
        shapes = "-" if r["compiled_shapes"] is None else str(r["compiled_shapes"])
        ratio = "-" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.2f}x"
        gflops = r.get("useful_gflops_per_s")
        gflops = "-" if gflops is None else f"{gflops:.1f} ({100 * r['fraction_of_matmul']:.0f}%)"
        lines.append(
            f"| {r['impl']} | {r['where']} | {r['seconds_per_epoch']:.3f} | {compile_s} | {shapes} | "
            f"{r['peak_rss_mib']:.0f} | {gflops} | "
            f"{r['loss_per_epoch'][-1]:.4f} | {ratio} | {minutes_for_5000_epochs(r['seconds_per_epoch']):.1f} | {floor} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
