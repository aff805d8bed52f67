"""How close the Latent ODE's function evaluations come to the machine's matmul peak.

The solver's arithmetic is the ODE network (10 -> 100 -> 100 -> 10, two tanh layers, the
periodic command's sizes) evaluated again and again on a batch of states. This times 100
evaluations chained in a ``lax.scan`` (forward, and forward with the gradient) for batches of
50 (one batch of series), 150 (with 3 draws of z_0) and 600, and reports microseconds and
GFLOP/s per evaluation beside a large float32 matmul measured in the same run. Medians of
``--repeats`` after one warm-up call.

    taskset -c 0 python benchmarks/ode_function_flops.py --out FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from epoch_time import matmul_gflops, median_seconds, provenance

EVALUATIONS = 100


def measure(batch: int, z_dim: int, units: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from dmm_jax.models.latent_ode.networks import ODEFunction

    f = ODEFunction(z_dim, units)
    params = f.init(jax.random.PRNGKey(0), jnp.zeros((1, z_dim)))["params"]
    z = jax.random.normal(jax.random.PRNGKey(1), (batch, z_dim))

    def chain(p, z):  # Euler-like steps, so no evaluation can be skipped or hoisted
        step = lambda z, _: (z + 0.01 * f.apply({"params": p}, z), None)
        return jax.lax.scan(step, z, None, length=EVALUATIONS)[0]

    flops = 2 * batch * (z_dim * units + units * units + units * z_dim)
    row = {"batch": batch}
    runs = (
        ("forward", jax.jit(chain), 1),
        ("gradient", jax.jit(jax.grad(lambda p, z: jnp.sum(chain(p, z)))), 3),
    )
    for name, fn, passes in runs:  # a gradient: the forward pass and two products per layer
        per_evaluation = median_seconds(fn, params, z, repeats=repeats) / EVALUATIONS
        row[f"{name}_microseconds"] = per_evaluation * 1e6
        row[f"{name}_gflops_per_s"] = passes * flops / per_evaluation / 1e9
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[50, 150, 600])
    parser.add_argument("--z-dim", type=int, default=10)
    parser.add_argument("--units", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = [measure(b, args.z_dim, args.units, args.repeats) for b in args.batches]
    result = {
        **provenance("ode_function_flops.py", argv or sys.argv[1:]),
        "matmul_gflops_per_s": matmul_gflops(),
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
