"""The model families, side by side over shared parts, and the one interface they share.

Every family gives a frozen config dataclass and a NumPyro ``model``/``guide`` pair with the
same signature, ``(x [B, T, X], lengths [B], annealing_factor, *, config, inputs, dt,
obs_mask, steps)``, whose one latent site "z" holds each sequence's latents (its trajectory
[T, Z], the Latent ODE's and the RNN-VAE's z_0 [Z]; the ODE-RNN and RNN-dt have none and
an empty guide); so training (``dmm_jax.train``), evaluation
(``dmm_jax.evaluate``) and checkpoints take any of them. Generation (``dmm_jax.generate``)
goes through each family's ``generation`` hooks; the continuous-time families have none and
predict real-valued series at any times through their ``predict`` (interpolation,
extrapolation: ``dmm_jax.models.series_tasks``).

    family      subpackage                        paper
    dmm         ``dmm_jax.models.dmm``            Krishnan, Shalit & Sontag, AAAI 2017
    vrnn        ``dmm_jax.models.vrnn``           Chung et al., NeurIPS 2015
    latent-ode  ``dmm_jax.models.latent_ode``     Rubanova, Chen & Duvenaud, NeurIPS 2019
    ode-rnn     ``dmm_jax.models.ode_rnn``        the same paper's baselines
    rnn-dt      ``dmm_jax.models.ode_rnn``
    rnn-vae     ``dmm_jax.models.rnn_vae``

The DMM's and the VRNN's subpackages have ``model_guide`` (the NumPyro model and guide),
``generation`` (its hooks) and ``filtering`` (its particle filter); the VRNN's own networks are
in ``vrnn/networks.py``, the DMM's are the shared ``dmm_jax.nn``. The continuous-time ones
have ``networks`` and ``model_guide`` with their ``predict`` (the RNN-VAE, which borrows the
Latent ODE's guide, is one module).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

from dmm_jax.config import MODEL_CONFIGS
from dmm_jax.models import dmm, latent_ode, ode_rnn, rnn_vae, series_tasks, vrnn


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the shared machinery needs of a family.

    generation: functions of (params, key, config, ...) used by ``dmm_jax.generate``, or None
    where the family cannot generate: ``start(params, config, n)`` -> the state before the
    first step; ``state_after(params, z, x, lengths, config)`` -> the state after each
    sequence's last real step given a guide draw z; ``roll_out(params, key, config, state, T)``
    -> {"z", "x", "emission"} for T new steps; ``emission_params(params, z, x, lengths,
    config)`` -> p(x_t | ...)'s parameters at every step given z; ``emission(config)`` -> the
    emission's kind (``dmm_jax.config.EMISSIONS``).

    particle_filter: ``(params, key, x, lengths, annealing_factor, *, config, num_particles,
    resampling, **covariates)`` -> (log p^(x) [B], particles), the filtering bound of a family
    with a latent per step (``dmm_jax.filtering``), or None.

    predict: ``(params, key, config, x, lengths, dt, query_times, samples)`` -> the means
    [S, B, T_q, D] of a continuous-time family at any times (``dmm_jax.models.series_tasks``),
    or None.

    draws_in_model: the model and guide take ``draws`` = K and average the ELBO over K draws
    of the latents inside one trace (the Latent ODE: one encoder run, one solve of every
    draw's paths); training with the ELBO over K particles then uses it.

    split_metrics: ``(params, key, config, split) -> {name: value}``, figures that ``fit`` adds
    to each evaluation of a split as ``<split>_<name>`` (the continuous-time families'
    interpolation ``mse``), or None.
    """

    name: str
    config_class: type
    model: Callable
    guide: Callable
    generation: Any = None
    particle_filter: Callable | None = None
    predict: Callable | None = None
    draws_in_model: bool = False

    def takes(self, keyword: str) -> bool:
        """Whether the model takes ``keyword``: for a rate of dropout, ``"dropout"`` (on its
        emission network's input) or ``"input_dropout"`` (``TrainConfig``'s fields of those
        names; training only)."""
        return keyword in inspect.signature(self.model).parameters

    @property
    def split_metrics(self) -> Callable | None:
        if self.predict is None:
            return None
        return lambda *args: {"mse": series_tasks.split_mse(self.predict, *args)}

    @property
    def extrapolate(self) -> Callable | None:
        """``(params, key, config, series, samples)`` -> ``series_tasks.extrapolate``'s
        result, or None where the family does not predict real-valued series."""
        if self.predict is None:
            return None
        return functools.partial(series_tasks.extrapolate, self.predict)


FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(
            "dmm", MODEL_CONFIGS["dmm"], dmm.model, dmm.guide, dmm.generation, dmm.particle_filter
        ),
        ModelFamily(
            "vrnn",
            MODEL_CONFIGS["vrnn"],
            vrnn.model,
            vrnn.guide,
            vrnn.generation,
            vrnn.particle_filter,
        ),
        ModelFamily(
            "latent-ode",
            MODEL_CONFIGS["latent-ode"],
            latent_ode.model,
            latent_ode.guide,
            predict=latent_ode.predict,
            draws_in_model=True,
        ),
        *(
            ModelFamily(
                name, MODEL_CONFIGS[name], ode_rnn.model, ode_rnn.guide, predict=ode_rnn.predict
            )
            for name in ("ode-rnn", "rnn-dt")
        ),
        ModelFamily(
            "rnn-vae",
            MODEL_CONFIGS["rnn-vae"],
            rnn_vae.model,
            rnn_vae.guide,
            predict=rnn_vae.predict,
        ),
    )
}


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; names the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: Any) -> ModelFamily:
    """The family whose config class ``config`` is an instance of."""
    for family in FAMILIES.values():
        if type(config) is family.config_class:
            return family
    raise TypeError(f"{type(config).__name__} is not the config of a known model family")
