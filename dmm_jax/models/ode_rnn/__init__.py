"""The paper's recurrent baselines for irregular series (Rubanova, Chen & Duvenaud, NeurIPS
2019), without latents: the ODE-RNN (family "ode-rnn"; between observations its state evolves
by an ODE) and the RNN-dt (family "rnn-dt"; the time gap is an input of its GRU). Each scores
an observation under N(decoder(h(t-)), obs_std^2), h(t-) its state just before the
observation: the likelihood of a series given its times, one step ahead at a time.

``networks`` holds the two recurrences over observation and query times; ``model_guide`` the
NumPyro model (and its empty guide) and ``predict``, the means at any query times.
"""

from dmm_jax.models.ode_rnn.model_guide import guide, model, predict
from dmm_jax.models.ode_rnn.networks import step_ahead_means

__all__ = ["guide", "model", "predict", "step_ahead_means"]
