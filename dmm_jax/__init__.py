"""dmm_jax: deep latent-variable sequence models in JAX, NumPyro and Flax.

Model families (``dmm_jax.models``): the Deep Markov Model (Krishnan, Shalit & Sontag 2017)
and the VRNN (Chung et al. 2015), each a config, a NumPyro model/guide pair and its networks,
trained, evaluated, sampled and checkpointed through the functions below.

    import dmm_jax
    data = dmm_jax.load_dataset("jsb_chorales")
    result = dmm_jax.fit(data.train, data.valid, model_config=dmm_jax.VRNNConfig(),
                         train_config=dmm_jax.TrainConfig(epochs=10))

Names load on first use, so ``import dmm_jax`` (and ``dmm-jax --help``) does not import JAX.
"""

from __future__ import annotations

import importlib

_SOURCES = {
    # configs
    "DMMConfig": "dmm_jax.config",
    "VRNNConfig": "dmm_jax.config",
    "LatentODEConfig": "dmm_jax.config",
    "TrainConfig": "dmm_jax.config",
    # model families
    "get_family": "dmm_jax.models",
    "family_of": "dmm_jax.models",
    # training and evaluation
    "fit": "dmm_jax.train",
    "load_run": "dmm_jax.train",
    "evaluate_split": "dmm_jax.evaluate",
    "elbo_per_sequence": "dmm_jax.evaluate",
    # using a trained model
    "sample_prior": "dmm_jax.generate",
    "forecast": "dmm_jax.generate",
    "forecast_split": "dmm_jax.generate",
    "posterior_latents": "dmm_jax.generate",
    "impute": "dmm_jax.generate",
    "impute_split": "dmm_jax.generate",
    # data
    "load_dataset": "dmm_jax.data",
    "load_arrays": "dmm_jax.data",
    "save_arrays": "dmm_jax.data",
    "SequenceArrays": "dmm_jax.data",
    # checkpoints
    "save_checkpoint": "dmm_jax.checkpoint",
    "read_checkpoint": "dmm_jax.checkpoint",
}

__all__ = [
    "DMMConfig",
    "LatentODEConfig",
    "SequenceArrays",
    "TrainConfig",
    "VRNNConfig",
    "elbo_per_sequence",
    "evaluate_split",
    "family_of",
    "fit",
    "forecast",
    "forecast_split",
    "get_family",
    "impute",
    "impute_split",
    "load_arrays",
    "load_dataset",
    "load_run",
    "posterior_latents",
    "read_checkpoint",
    "sample_prior",
    "save_arrays",
    "save_checkpoint",
]


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'dmm_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
