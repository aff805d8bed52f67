"""Configs of the continuous-time families (Rubanova, Chen & Duvenaud, NeurIPS 2019), for
irregularly sampled real-valued series: the Latent ODE, and the paper's baselines ODE-RNN,
RNN-dt and RNN-VAE. Times come from the data's ``dt`` (its cumulative sum; ``dt[:, 0]`` is a
series' first time), or are 0, 1, 2, ... without it. Defaults are those of the paper's
reference code for its periodic data. Like ``dmm_jax.config``, this loads without JAX.
"""

from __future__ import annotations

import dataclasses

from dmm_jax.config import option

LATENT_ODE_ENCODERS = ("ode-rnn", "rnn")


def _check(config, positive_ints: tuple[str, ...], positive_floats: tuple[str, ...]) -> None:
    """Names the first field of ``config`` that is out of range; no control inputs."""
    name = type(config).__name__
    for field in positive_ints:
        value = getattr(config, field)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
    for field in positive_floats:
        if not getattr(config, field) > 0:
            raise ValueError(f"{name}.{field} must be positive, got {getattr(config, field)!r}")
    if config.input_dim:
        raise ValueError(f"{name} takes no control inputs (input_dim must be 0)")


def _context_points():
    """The field of the families whose q(z_0) comes from the backward encoder."""
    return option(
        0,
        "q(z_0) reads at most this many of a series' observed time points, chosen at random "
        "at every update, while the decoder scores all of them; --dataset periodic then trains "
        "on whole series (the reference's interpolation training); 0: q reads every point",
    )


def _check_context(config) -> None:
    if not isinstance(config.context_points, int) or config.context_points < 0:
        raise ValueError(
            f"{type(config).__name__}.context_points must be an int >= 0, "
            f"got {config.context_points!r}"
        )


class _RealValued:
    """What the shared machinery asks of every continuous-time config."""

    @property
    def emission(self) -> str:
        """The decoder's observation model: a Gaussian of fixed scale ``obs_std``."""
        return "gaussian"

    @property
    def covariate_dim(self) -> int:
        return int(self.use_dt)


@dataclasses.dataclass(frozen=True)
class LatentODEConfig(_RealValued):
    """A Latent ODE: z_0 from an encoder run backward in time, z(t) from an ODE, a Gaussian
    decoder; ``poisson`` adds the likelihood of the observation times as a Poisson process
    whose intensity is a function of z(t)."""

    obs_dim: int = option(1, "observation dims per step (from the data)")
    z_dim: int = option(10, "latent dims (z_0 and the ODE's state)")
    rnn_dim: int = option(20, "hidden units of the encoder's GRU")
    units: int = option(100, "hidden units of each ODE function's two tanh layers")
    encoder: str = option("ode-rnn", f"q(z_0)'s encoder, one of {LATENT_ODE_ENCODERS}")
    euler_steps: int = option(1, "Euler steps of the ODE-RNN between observations")
    context_points: int = _context_points()
    obs_std: float = option(0.01, "the Gaussian decoder's fixed scale")
    poisson: bool = option(False, "also score the observation times (a Poisson process)")
    rtol: float = option(1e-3, "relative tolerance of the adaptive solver")
    atol: float = option(1e-4, "absolute tolerance of the adaptive solver")
    max_solver_steps: int = option(
        512, "most accepted solver steps per batch (more: the update is dropped as non-finite)"
    )
    input_dim: int = 0
    use_dt: bool = False

    def __post_init__(self):
        sizes = ("obs_dim", "z_dim", "rnn_dim", "units", "euler_steps", "max_solver_steps")
        _check(self, sizes, ("obs_std", "rtol", "atol"))
        _check_context(self)
        if self.encoder not in LATENT_ODE_ENCODERS:
            raise ValueError(
                f"LatentODEConfig.encoder must be one of {LATENT_ODE_ENCODERS}, "
                f"got {self.encoder!r}"
            )


@dataclasses.dataclass(frozen=True)
class ODERNNConfig(_RealValued):
    """An ODE-RNN predictor, no latents: between observations the GRU's state h evolves by
    dh/dt = f(h) (Euler sub-steps), at an observation h = GRU(h, [x_t, m_t]); x_t is
    scored under N(W h(t-) + b, obs_std^2), h(t-) the state just before it."""

    obs_dim: int = option(1, "observation dims per step (from the data)")
    rnn_dim: int = option(20, "hidden units of the GRU")
    units: int = option(100, "hidden units of the ODE function's and the decoder's tanh layers")
    euler_steps: int = option(1, "Euler steps of the ODE-RNN between observations")
    obs_std: float = option(0.01, "the Gaussian decoder's fixed scale")
    input_dim: int = 0
    use_dt: bool = False

    def __post_init__(self):
        _check(self, ("obs_dim", "rnn_dim", "units", "euler_steps"), ("obs_std",))

    @property
    def encoder(self) -> str:
        return "ode-rnn"


@dataclasses.dataclass(frozen=True)
class RNNDtConfig(_RealValued):
    """The RNN-dt predictor, no latents: h = GRU(h, [x_t, m_t, gap_t]) at every time point
    (the time since the previous one an input; nothing observed: x_t = m_t = 0), x_t scored
    under N(W h(t-) + b, obs_std^2) as the ODE-RNN's."""

    obs_dim: int = option(1, "observation dims per step (from the data)")
    rnn_dim: int = option(20, "hidden units of the GRU")
    units: int = option(100, "hidden units of the decoder's tanh layer")
    obs_std: float = option(0.01, "the Gaussian decoder's fixed scale")
    input_dim: int = 0
    use_dt: bool = False

    def __post_init__(self):
        _check(self, ("obs_dim", "rnn_dim", "units"), ("obs_std",))

    @property
    def encoder(self) -> str:
        return "rnn"


@dataclasses.dataclass(frozen=True)
class RNNVAEConfig(_RealValued):
    """The RNN-VAE: q(z_0) from a GRU run backward in time with the gaps as input (the Latent
    ODE's "rnn" encoder); the decoder a GRU from h_0 = tanh(W z_0 + b) stepping through the
    time points with the gap as its input, x_t ~ N(W' h_t + b', obs_std^2)."""

    obs_dim: int = option(1, "observation dims per step (from the data)")
    z_dim: int = option(10, "latent dims (z_0 and the ODE's state)")
    rnn_dim: int = option(20, "hidden units of the encoder's GRU")
    decoder_dim: int = option(20, "hidden units of the decoder's GRU")
    units: int = option(100, "hidden units of q(z_0)'s head and the decoder's tanh layer")
    context_points: int = _context_points()
    obs_std: float = option(0.01, "the Gaussian decoder's fixed scale")
    input_dim: int = 0
    use_dt: bool = False

    def __post_init__(self):
        _check(self, ("obs_dim", "z_dim", "rnn_dim", "decoder_dim", "units"), ("obs_std",))
        _check_context(self)

    @property
    def encoder(self) -> str:
        return "rnn"
