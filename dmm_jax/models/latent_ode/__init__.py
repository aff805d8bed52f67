"""The Latent ODE (Rubanova, Chen & Duvenaud, "Latent ODEs for Irregularly-Sampled Time
Series", NeurIPS 2019): one latent z_0 per series, carried through time by a neural ODE.

``networks`` holds the ODE function, the encoders (ODE-RNN or RNN, run backward in time) and
the solve (diffrax, adaptive Dopri5); ``model_guide`` the NumPyro model and guide;
``prediction`` interpolation, extrapolation and their test MSE. The
config, ``LatentODEConfig``, lives in ``dmm_jax.config`` with the others.
"""

from dmm_jax.config import LatentODEConfig
from dmm_jax.models.latent_ode.model_guide import guide, model
from dmm_jax.models.latent_ode.networks import encode, series_times, solve
from dmm_jax.models.latent_ode.prediction import extrapolate, split_mse

__all__ = [
    "LatentODEConfig",
    "encode",
    "extrapolate",
    "guide",
    "model",
    "series_times",
    "solve",
    "split_mse",
]
