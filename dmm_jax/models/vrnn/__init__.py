"""The Variational RNN (Chung et al., "A Recurrent Latent Variable Model for Sequential Data",
NeurIPS 2015): a latent variable at every step of an RNN.

    h_t = RNN([phi_x(x_t), phi_z(z_t)], h_{t-1}),  h_0 = 0,  g_t = [h_{t-1}, c_t]
    prior:      p(z_t | z_{<t}, x_{<t}) = N(mu_0(g_t), diag sigma_0(g_t)^2)      (VRNN-I: N(0, I))
    emission:   p(x_t | z_{<=t}, x_{<t}) = Emission(dec([phi_z(z_t), g_t]))     (dmm_jax.emissions)
    inference:  q(z_t | x_{<=t}, z_{<t}) = N(mu(enc([phi_x(x_t), g_t])), diag sigma(...)^2)

c_t are the covariates (control inputs u_t, time gaps dt_t) when the config takes them. The
guide draws z_{1:T} step by step (its h_{t-1} depends on the drawn z_{<t}); the model, given
a trajectory z_{1:T}, runs only the RNN step by step and scores every step's prior and
emission in one batched op. Shapes as in ``dmm_jax.models.common``; S is the RNN state
([B, H] for the GRU, a pair of them for the LSTM).

``networks`` holds the Flax networks and the recurrence over them, ``model_guide`` the NumPyro model
and guide (which register the shared networks, phi_x, phi_z and rnn, under the same names, so
both use one set of parameters), ``generation`` the roll-outs used by ``dmm_jax.generate``,
``filtering`` the particle filter (FIVO).
The config, ``VRNNConfig``, lives in ``dmm_jax.config`` with the others (they load without JAX).
"""

from dmm_jax.config import VRNNConfig
from dmm_jax.models.vrnn.filtering import particle_filter
from dmm_jax.models.vrnn.generation import emission, emission_params, roll_out, start, state_after
from dmm_jax.models.vrnn.model_guide import VRNNPosterior, VRNNPrior, guide, model
from dmm_jax.models.vrnn.networks import hidden_of, initial_state, modules, networks, run_rnn

__all__ = [
    "VRNNConfig",
    "VRNNPosterior",
    "VRNNPrior",
    "emission",
    "emission_params",
    "guide",
    "hidden_of",
    "initial_state",
    "model",
    "modules",
    "networks",
    "particle_filter",
    "roll_out",
    "run_rnn",
    "start",
    "state_after",
]
