"""Runs data-parallel computations in a fresh process for tests/test_distributed.py.

A separate process because the device count is fixed when JAX starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and a multi-process run needs
``jax.distributed.initialize``; the rest of the suite keeps its one device.

    python tests/distributed_worker.py update OUT.json
        single process, 4 devices: one update on one device and on the 4-device mesh, and the
        gradient that empty padding sequences contribute
    python tests/distributed_worker.py single OUT.json
        single process, one device: the short fit and evaluation the multi-process run repeats
    python tests/distributed_worker.py fit OUT.json COORDINATOR NUM_PROCESSES PROCESS_ID
        one process of a multi-process run: the short fit and evaluation over the mesh of all
        processes' devices (process 0 writes OUT.json)
"""

from __future__ import annotations

import json
import sys

import numpy as np

TINY = {"obs_dim": 6, "z_dim": 3, "emission_dim": 8, "transition_dim": 8, "rnn_dim": 10}
# Evaluation in fit and after it share one shape (8 sequences x 5 draws): fewer compiles.
FIT = {
    "epochs": 2,
    "batch_size": 8,
    "learning_rate": 1e-2,
    "annealing_epochs": 1,
    "seed": 3,
    "eval_samples": 5,
    "eval_batch_size": 8,
    "transpose": 2,  # each process transposes the rows it holds, as one device does
}


def binary_sequences(seed: int, count: int, max_steps: int = 12, obs_dim: int = 6):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_steps + 1, count)
    return [(rng.random((n, obs_dim)) < 0.3).astype(np.uint8) for n in lengths]


def as_lists(tree) -> list:
    import jax

    return [np.asarray(leaf, np.float64).ravel().tolist() for leaf in jax.tree.leaves(tree)]


def short_fit(mesh) -> dict:
    """Two epochs on 14 sequences in batches of 8 (the last holds 6), then an IS evaluation."""
    import jax

    from dmm_jax.config import DMMConfig, TrainConfig
    from dmm_jax.evaluate import evaluate_split
    from dmm_jax.train import fit

    config = DMMConfig(**TINY)
    # Notes on the middle four of the six keys: room to transpose (FIT's transpose).
    train = [np.pad(s[:, :4], ((0, 0), (1, 1))) for s in binary_sequences(0, 14)]
    result = fit(
        train,
        binary_sequences(1, 5),
        model_config=config,
        train_config=TrainConfig(**FIT),
        mesh=mesh,
    )
    evaluation = evaluate_split(
        result.params,
        jax.random.PRNGKey(7),
        binary_sequences(2, 9),
        config,
        num_samples=5,
        estimator="is",
        batch_size=8,
        mesh=mesh,
    )
    return {
        "train_losses": [r["train_loss_per_step"] for r in result.history],
        "val_loss": result.history[-1]["val_loss_per_step"],
        "is_nll": evaluation["is_nll_per_step"],
        "elbo_nll": evaluation["elbo_nll_per_step"],
        "params": as_lists(result.params),
        "compiled_shapes": [list(s) for s in result.compiled_shapes],
    }


# The multi-sample objectives, one update each on 1 and 4 devices.
OBJECTIVES = {
    "iwae": {"objective": "iwae", "particles": 3},
    "fivo": {"objective": "fivo", "particles": 3, "resampling": "multinomial"},
}


def one_update(batch: int, mesh, **objective) -> dict:
    from dmm_jax.config import DMMConfig, TrainConfig
    from dmm_jax.train import UpdateStep, build_svi, init_train_state

    config = DMMConfig(**TINY)
    svi = build_svi(config, TrainConfig(learning_rate=1e-2, **objective))
    state = init_train_state(svi, 0, config.obs_dim).svi_state
    sequences = binary_sequences(batch, batch)
    lengths = np.array([len(s) for s in sequences], np.int32)
    x = np.zeros((batch, 16, config.obs_dim), np.float32)
    for i, s in enumerate(sequences):
        x[i, : len(s)] = s
    update = UpdateStep(svi, mesh)
    state, loss = update(state, x, lengths, 0.5)
    return {
        "loss": float(loss),
        "params": as_lists(svi.get_params(state)),
        "shapes": [list(s) for s in update.compiled_shapes],
    }


def padding_rows() -> dict:
    """What empty sequences appended to a batch add to the ELBO and its gradient, and how far
    the real rows' ELBO moves when they are appended."""
    import jax

    from dmm_jax.config import DMMConfig
    from dmm_jax.evaluate import elbo_per_sequence

    config = DMMConfig(**TINY)
    params, x, lengths = _padded_example(config)
    key = jax.random.PRNGKey(5)
    padding = lengths == 0

    def padded_rows_elbo(p):
        per_sequence = elbo_per_sequence(p, key, x, lengths, config)
        return per_sequence[padding].sum(), per_sequence

    (value, per_sequence), grads = jax.jit(jax.value_and_grad(padded_rows_elbo, has_aux=True))(
        params
    )
    real = np.flatnonzero(~padding)
    alone = jax.jit(elbo_per_sequence, static_argnames="config")(
        params, key, x[real], lengths[real], config=config
    )
    return {
        "padded_rows_elbo": float(value),
        "largest_padding_gradient": max(
            float(np.max(np.abs(np.asarray(g)))) for g in jax.tree.leaves(grads)
        ),
        "real_rows_with_padding": np.asarray(per_sequence)[real].tolist(),
        "real_rows_alone": np.asarray(alone).tolist(),
    }


def _padded_example(config):
    """Initial parameters and a batch of 4 real sequences followed by 2 empty ones, as batches
    and meshes pad (at the end)."""
    from dmm_jax.config import TrainConfig
    from dmm_jax.train import build_svi, init_train_state

    svi = build_svi(config, TrainConfig())
    params = svi.get_params(init_train_state(svi, 0, config.obs_dim).svi_state)
    sequences = binary_sequences(4, 4)
    lengths = np.array([len(s) for s in sequences] + [0, 0], np.int32)
    x = np.zeros((6, 16, config.obs_dim), np.float32)
    for i, s in enumerate(sequences):
        x[i, : len(s)] = s
    return params, x, lengths


def main(argv: list[str]) -> None:
    mode, out = argv[0], argv[1]
    if mode == "update":
        import jax

        from dmm_jax.distributed import data_mesh

        results = {
            "device_count": jax.device_count(),
            "update_22": {"one": one_update(22, None), "mesh": one_update(22, data_mesh(4))},
            **{
                f"update_22_{name}": {
                    "one": one_update(22, None, **objective),
                    "mesh": one_update(22, data_mesh(4), **objective),
                }
                for name, objective in OBJECTIVES.items()
            },
            "padding": padding_rows(),
        }
    elif mode == "single":
        import jax

        results = {"device_count": jax.device_count(), "fit": short_fit(None)}
    elif mode == "fit":
        from dmm_jax.distributed import data_mesh, initialize

        initialize(argv[2], int(argv[3]), int(argv[4]))
        import jax

        results = {"device_count": jax.device_count(), "fit": short_fit(data_mesh())}
        if jax.process_index() != 0:
            return
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1:])
