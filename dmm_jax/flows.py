"""Inverse autoregressive flows (Kingma et al. 2016) on a guide's Gaussian draws: MADE
networks (Germain et al. 2015) with the log-scale clipped to [-5, 3], as Pyro's DMM example.

``InverseAutoregressiveFlow`` maps a draw z [..., Z] to (flowed z, log|det|), so a guide
scores the flowed draw as log N(base) - log|det| (``dmm_jax.distributions``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmm_jax.nn import uniform_init

Array = jax.Array


def _made_masks(z_dim: int, hidden_dim: int, reverse: bool) -> tuple[Array, Array]:
    """MADE connectivity (Germain et al. 2015): output i sees only inputs before i in order.

    Input/output degrees are each dimension's position in the order (1..Z); hidden unit k gets
    degree 1 + k mod (Z - 1). Hidden k sees input i when deg_k >= deg_i; output j sees hidden
    k when deg_j > deg_k. With Z = 1 the outputs are constants (biases only).
    """
    degrees = jnp.arange(1, z_dim + 1)
    if reverse:
        degrees = degrees[::-1]
    hidden_degrees = 1 + jnp.arange(hidden_dim) % max(z_dim - 1, 1)
    to_hidden = (hidden_degrees[None, :] >= degrees[:, None]).astype(jnp.float32)
    to_output = (degrees[None, :] > hidden_degrees[:, None]).astype(jnp.float32)
    return to_hidden, to_output


class AutoregressiveNN(nn.Module):
    """A one-hidden-layer MADE: (mean, log_scale), each [..., Z], output i a function of the
    inputs before i in the order (ascending, or descending if ``reverse``).

    As Pyro's ``AutoRegressiveNN(z_dim, [hidden_dim])``: ReLU hidden layer, PyTorch-style
    initialisation of the masked weights.
    """

    z_dim: int
    hidden_dim: int
    reverse: bool = False

    @nn.compact
    def __call__(self, z: Array) -> tuple[Array, Array]:
        to_hidden, to_output = _made_masks(self.z_dim, self.hidden_dim, self.reverse)
        in_init = uniform_init(1.0 / math.sqrt(self.z_dim))
        out_init = uniform_init(1.0 / math.sqrt(self.hidden_dim))
        w_in = self.param("w_in", in_init, (self.z_dim, self.hidden_dim))
        b_in = self.param("b_in", in_init, (self.hidden_dim,))
        w_out = self.param("w_out", out_init, (self.hidden_dim, 2 * self.z_dim))
        b_out = self.param("b_out", out_init, (2 * self.z_dim,))
        hidden = nn.relu(z @ (w_in * to_hidden) + b_in)
        out = hidden @ (w_out * jnp.concatenate([to_output, to_output], axis=1)) + b_out
        return out[..., : self.z_dim], out[..., self.z_dim :]


def _clip_preserving_gradients(x: Array, low: float, high: float) -> Array:
    """clip(x) in value, identity in gradient (as Pyro's and NumPyro's IAF)."""
    return x + jax.lax.stop_gradient(jnp.clip(x, low, high) - x)


class InverseAutoregressiveFlow(nn.Module):
    """``num_iafs`` affine IAF layers (Kingma et al. 2016), as the reference's guide uses them:

        mean, log_scale = MADE_k(y),  log_scale clipped to [-5, 3],  y <- exp(log_scale) y + mean

    Layer k orders the dimensions ascending for even k, descending for odd k, so that stacked
    layers see each other's last dimensions. The Jacobian of each layer is triangular, so
    log|det| = sum of log_scale.
    """

    z_dim: int
    num_iafs: int
    iaf_dim: int

    @nn.compact
    def __call__(self, z: Array) -> tuple[Array, Array]:
        """z [..., Z] (a base draw) -> (flowed z [..., Z], log|det dz_out/dz| [...])."""
        log_det = jnp.zeros(z.shape[:-1], z.dtype)
        for k in range(self.num_iafs):
            made = AutoregressiveNN(self.z_dim, self.iaf_dim, reverse=k % 2 == 1, name=f"iaf_{k}")
            mean, log_scale = made(z)
            log_scale = _clip_preserving_gradients(log_scale, -5.0, 3.0)
            z = jnp.exp(log_scale) * z + mean
            log_det = log_det + jnp.sum(log_scale, axis=-1)
        return z, log_det
