"""The Deep Markov Model (Krishnan, Shalit & Sontag, "Structured Inference Networks for
Nonlinear State Space Models", AAAI 2017; "Deep Kalman Filters", 2015).

    p(x, z) = prod_t N(z_t; Transition(z_{t-1}, c_t)) p(x_t | Emitter(z_t))
    q(z | x) = prod_t N(z_t; Combiner(z_{t-1}, h_t)),  h = an RNN over x (and c)

``model_guide`` holds the NumPyro model and guide (and the paper's other inference networks, flows
and DMM-Aug), ``generation`` the roll-outs used by ``dmm_jax.generate``, ``filtering`` the
particle filter (FIVO); the networks are the
shared ones of ``dmm_jax.nn`` and ``dmm_jax.flows``, the config ``DMMConfig`` of
``dmm_jax.config``.
"""

from dmm_jax.config import DMMConfig
from dmm_jax.models.dmm import generation
from dmm_jax.models.dmm.filtering import particle_filter
from dmm_jax.models.dmm.model_guide import guide, model

__all__ = ["DMMConfig", "generation", "guide", "model", "particle_filter"]
