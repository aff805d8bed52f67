"""The Latent ODE (Rubanova, Chen & Duvenaud, "Latent ODEs for Irregularly-Sampled Time
Series", NeurIPS 2019): one latent z_0 per series, carried through time by a neural ODE.

``networks`` holds the ODE function, the encoders (ODE-RNN or RNN, run backward in time) and
the solve (``dmm_jax.odeint``: adaptive Dormand-Prince, a batch at once); ``model_guide``
the NumPyro model and guide; ``prediction`` the means at any query times (``predict``; the
tasks and their MSE are ``dmm_jax.models.series_tasks``) and draws from the model itself
(``sample_prior``). The config, ``LatentODEConfig``, lives in ``dmm_jax.continuous_config``
with the other continuous-time families'.
"""

from dmm_jax.continuous_config import LatentODEConfig
from dmm_jax.models.latent_ode.model_guide import guide, model
from dmm_jax.models.latent_ode.networks import encode, series_times, solve
from dmm_jax.models.latent_ode.prediction import predict, sample_prior

__all__ = [
    "LatentODEConfig",
    "encode",
    "guide",
    "model",
    "predict",
    "sample_prior",
    "series_times",
    "solve",
]
