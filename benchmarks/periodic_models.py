"""Every continuous-time model on the periodic toy data: test MSE of interpolation and
extrapolation, seconds per epoch, the test bound.

Each model trains at the reference's settings for its periodic command (those of
``latent_ode_periodic.py``: 800 training series with 50 of 100 points observed, batches of
50, learning rate 1e-2 decayed by 0.999 per update, latent size 10, GRUs of 20, networks of
100 units, decoder noise 0.01) on the observed points of the training series, then is
scored on the 200 test series:

    interpolation   50 of 100 points observed, all 100 predicted
    extrapolation   the points before the midpoint of the time range observed, those after it
                    predicted (the same test series; the models were not trained for it)

The MSE averages 3 draws of the latents (the models without latents give the same 3). The
test bound is evaluated every tenth of the run; the seconds per epoch are the training's.

    python benchmarks/periodic_models.py --epochs 50 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from epoch_time import provenance
from latent_ode_periodic import periodic_data, train_on_periodic

# name: (family, config fields beyond the data's sizes)
MODELS = {
    "latent-ode": ("latent-ode", {}),
    "latent-ode-rnn-encoder": ("latent-ode", {"encoder": "rnn"}),
    "latent-ode-poisson": ("latent-ode", {"poisson": True}),
    "ode-rnn": ("ode-rnn", {}),
    "rnn-dt": ("rnn-dt", {}),
    "rnn-vae": ("rnn-vae", {}),
}


def run_model(name: str, epochs: int, seed: int) -> dict:
    import jax

    from dmm_jax.config import MODEL_CONFIGS
    from dmm_jax.models import get_family
    from dmm_jax.models.series_tasks import task_mse

    family_name, fields = MODELS[name]
    family = get_family(family_name)
    model_config = MODEL_CONFIGS[family_name](obs_dim=1, use_dt=True, **fields)
    started = time.perf_counter()
    data = periodic_data(seed)
    result, _ = train_on_periodic(model_config, epochs, seed, data, eval_every=max(1, epochs // 10))
    wall = time.perf_counter() - started
    key = jax.random.PRNGKey(seed)
    tasks = {"interpolation": data, "extrapolation": periodic_data(seed, extrapolate=True)}
    mse = {
        task: task_mse(family.predict, result.params, key, model_config, split["test"])
        for task, split in tasks.items()
    }
    return {
        "model": name,
        "family": family_name,
        "config": fields,
        "epochs": epochs,
        "training_seconds_per_epoch": statistics.median(r["seconds"] for r in result.history[1:]),
        "wall_seconds": wall,
        "test_bound_per_step": result.history[-1].get("test_loss_per_step"),
        **{f"{task}_test_mse": value for task, value in mse.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch's time includes compiling)")
    runs = []
    for name in args.models:
        runs.append(run_model(name, args.epochs, args.seed))
        print(json.dumps(runs[-1]), flush=True)
    result = {**provenance("periodic_models.py", sys.argv[1:] if argv is None else argv)}
    result["runs"] = runs
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
