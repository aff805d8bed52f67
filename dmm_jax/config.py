"""Configurations: what the model is (``DMMConfig``, ``VRNNConfig``; the continuous-time
families' in ``dmm_jax.continuous_config``) and how it is trained (``TrainConfig``).

Defaults are the reference's (Pyro's examples/dmm.py), so the same numbers mean the same
thing in both. Both are frozen dataclasses that round-trip through JSON (checkpoints keep them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Choices, kept here (not beside the networks) so the configs load without JAX.
RNN_CELLS = ("rnn", "gru", "lstm")
TRANSITIONS = ("gated", "linear")
DMM_EMISSIONS = ("bernoulli", "gaussian", "nade")
EMISSION_NETS = ("mlp", "linear")
EMISSION_SCALES = ("learned", "predicted", "fixed")
EMISSIONS = ("bernoulli", "gaussian", "gmm", "nade")  # dmm_jax.emissions
BINARY_EMISSIONS = ("bernoulli", "nade")  # over 0/1 notes (piano rolls)
VRNN_CELLS = ("gru", "lstm")
NUMERICS = ("soft", "stable", "reference")

# The paper's inference networks (Krishnan et al. 2017, Table 1): structured (ST, conditioned on
# z_{t-1}) or mean-field (MF), over x_{1:t} (L), x_{t:T} (R) or x_{1:T} (LR).
GUIDES = ("st-r", "st-l", "st-lr", "mf-l", "mf-lr")
KL_ESTIMATORS = ("sampled", "analytic")
OBJECTIVES = ("elbo", "iwae", "fivo")
RESAMPLING = ("systematic", "multinomial")  # dmm_jax.filtering
LR_SCHEDULES = ("exponential", "constant", "cosine")
ANNEALING_SCHEDULES = ("linear", "cosine")
# TrainConfig's rates of dropout inside a model, each also the model's keyword for it.
DROPOUTS = ("dropout", "input_dropout")


def option(default: Any, help: str) -> Any:
    """A config field with its command-line help (``dmm-jax train`` derives its flags)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class DMMConfig:
    """Sizes and choices of the networks."""

    obs_dim: int = option(88, "observation dims per step (from the data)")
    z_dim: int = option(100, "latent dims")
    emission_dim: int = option(100, "hidden units of the emission network")
    transition_dim: int = option(200, "hidden units of the gated transition")
    rnn_dim: int = option(600, "hidden units of the inference RNN")
    rnn_cell: str = option("rnn", f"inference RNN cell, one of {RNN_CELLS}")
    numerics: str = option(
        "soft",
        "soft: the rnn cell's ReLU state grows only logarithmically above 4 "
        "(docs/reliability.md); stable: capped at 4; reference: the reference's unbounded ReLU",
    )
    # Hand-written backward passes for the two recurrences (same values and gradients as
    # autodiff, faster); False falls back to autodiff of plain scans.
    custom_vjp: bool = True
    emission: str = option(
        "bernoulli",
        f"observation model, one of {DMM_EMISSIONS} (gaussian: real values; nade: notes "
        "conditioned on lower notes)",
    )
    nade_hidden: int = option(100, "hidden units of the nade emission")
    emission_net: str = option(
        "mlp", "emission mean: mlp (two hidden layers) or linear (x_t = H z_t + d, gaussian only)"
    )
    emission_scale: str = option("learned", f"gaussian emission scale, one of {EMISSION_SCALES}")
    emission_scale_init: float = option(1.0, "the fixed gaussian scale, or where it starts")
    transition: str = option(
        "gated", "gated (the reference's) or linear: z_t = A z_{t-1} + B c_t + b"
    )
    # Control inputs u [B, T, input_dim] (0: none) feed the transition, and the emission too
    # with inputs_to_emission; use_dt feeds the time gaps dt [B, T] to the transition.
    input_dim: int = 0
    inputs_to_emission: bool = option(False, "the data's inputs also feed the emission")
    use_dt: bool = False
    guide: str = option("st-r", f"inference network (paper, Table 1), one of {GUIDES}")
    num_iafs: int = option(0, "inverse autoregressive flows on every q(z_t)")
    iaf_dim: int = option(50, "hidden units of each flow's MADE")
    # DMM-Aug (Krishnan et al. 2017, Table 3): the previous observation x_{t-1} (zeros before
    # the first step) joins the inputs of the transition's gate and proposed mean and of the
    # emission network, i.e. edges x_{t-1} -> z_t and x_{t-1} -> x_t (the authors' code calls
    # these use_prev_input and the "conditional" emission). The guide is unchanged.
    augmented: bool = option(
        False, "DMM-Aug (paper, Table 3): x_{t-1} also feeds the transition and the emission"
    )

    def __post_init__(self):
        sizes = (
            "obs_dim", "z_dim", "emission_dim", "transition_dim", "rnn_dim", "iaf_dim",
            "nade_hidden",
        )  # fmt: skip
        for field in sizes:
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DMMConfig.{field} must be a positive int, got {value!r}")
        if self.rnn_cell not in RNN_CELLS:
            raise ValueError(
                f"DMMConfig.rnn_cell must be one of {RNN_CELLS}, got {self.rnn_cell!r}"
            )
        choices = {
            "emission": DMM_EMISSIONS,
            "emission_net": EMISSION_NETS,
            "emission_scale": EMISSION_SCALES,
            "transition": TRANSITIONS,
            "numerics": NUMERICS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"DMMConfig.{field} must be one of {allowed}, got {getattr(self, field)!r}"
                )
        if self.emission_net == "linear" and self.emission != "gaussian":
            raise ValueError('DMMConfig.emission_net="linear" needs emission="gaussian"')
        if not self.emission_scale_init > 0:
            raise ValueError(
                f"DMMConfig.emission_scale_init must be positive, got {self.emission_scale_init!r}"
            )
        if not isinstance(self.input_dim, int) or self.input_dim < 0:
            raise ValueError(f"DMMConfig.input_dim must be an int >= 0, got {self.input_dim!r}")
        if self.inputs_to_emission and self.input_dim == 0:
            raise ValueError("DMMConfig.inputs_to_emission needs input_dim > 0")
        if self.guide not in GUIDES:
            raise ValueError(f"DMMConfig.guide must be one of {GUIDES}, got {self.guide!r}")
        if not isinstance(self.num_iafs, int) or self.num_iafs < 0:
            raise ValueError(f"DMMConfig.num_iafs must be an int >= 0, got {self.num_iafs!r}")

    @property
    def encoder_activation(self) -> str:
        """The "rnn" cell's nonlinearity: a ReLU state can grow without bound over long
        sequences (inf, then NaN, in float32); the soft cap (``scans.soft_capped_relu``) is
        the ReLU up to 4 (``dmm_jax.scans.RELU_CAP``) and logarithmic above, the hard cap
        ("stable") stays in [0, 4]."""
        return {"reference": "relu", "stable": "capped-relu", "soft": "soft-capped-relu"}[
            self.numerics
        ]

    @property
    def covariate_dim(self) -> int:
        """Width of the given covariates, inputs then dt (the encoders read them too)."""
        return self.input_dim + int(self.use_dt)

    @property
    def transition_covariate_dim(self) -> int:
        """Width of what the transition sees besides z_{t-1}: covariates, then x_{t-1} if
        augmented."""
        return self.covariate_dim + (self.obs_dim if self.augmented else 0)

    @property
    def emission_input_dim(self) -> int:
        """Width of the emission's input: z_t, then u_t if inputs_to_emission, then x_{t-1}
        if augmented."""
        inputs = self.input_dim if self.inputs_to_emission else 0
        return self.z_dim + inputs + (self.obs_dim if self.augmented else 0)


@dataclasses.dataclass(frozen=True)
class VRNNConfig:
    """Sizes and choices of a VRNN. ``standard_prior``: the VRNN-I variant, p(z_t) = N(0, I)."""

    obs_dim: int = option(88, "observation dims per step (from the data)")
    z_dim: int = option(32, "latent dims")
    rnn_dim: int = option(256, "hidden units of the RNN")
    feature_dim: int = option(128, "width of the features phi_x(x_t) and phi_z(z_t)")
    hidden_dim: int = option(128, "hidden units of the prior, encoder and decoder networks")
    rnn_cell: str = option("gru", f"RNN cell, one of {VRNN_CELLS}")
    emission: str = option("bernoulli", f"observation model, one of {EMISSIONS}")
    mixture_components: int = option(5, "components of the gmm emission")
    nade_hidden: int = option(100, "hidden units of the nade emission")
    standard_prior: bool = option(False, "VRNN-I: the prior is N(0, I) at every step")
    input_dim: int = 0
    use_dt: bool = False

    def __post_init__(self):
        sizes = (
            "obs_dim", "z_dim", "rnn_dim", "feature_dim", "hidden_dim", "mixture_components",
            "nade_hidden",
        )  # fmt: skip
        for field in sizes:
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VRNNConfig.{field} must be a positive int, got {value!r}")
        for field, allowed in (("rnn_cell", VRNN_CELLS), ("emission", EMISSIONS)):
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"VRNNConfig.{field} must be one of {allowed}, got {getattr(self, field)!r}"
                )
        if not isinstance(self.input_dim, int) or self.input_dim < 0:
            raise ValueError(f"VRNNConfig.input_dim must be an int >= 0, got {self.input_dim!r}")

    @property
    def covariate_dim(self) -> int:
        return self.input_dim + int(self.use_dt)

    @property
    def state_dim(self) -> int:
        """Width of g_t = [h_{t-1}, c_t]."""
        return self.rnn_dim + self.covariate_dim


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, annealing, batching and evaluation settings.

    The optimizer is Pyro's ClippedAdam: each gradient element clipped to +-clip_norm, L2
    weight decay added to the gradient, Adam(beta1, beta2, eps), and the learning rate
    multiplied by lr_decay after every step (lr_schedule "exponential"; "constant" keeps it,
    "cosine" decays it to 0 along a half cosine over all epochs). The KL term is scaled by an
    annealing factor that rises from minimum_annealing_factor to 1 over annealing_epochs, per
    mini-batch: linearly ("linear", the reference's) or along a half cosine ("cosine").

    kl: "sampled" estimates log p(z) - log q(z) from the guide's draw (the reference);
    "analytic" uses sum_t KL(q(z_t | ...) || p(z_t | z_{t-1})) in closed form given the drawn
    z_{t-1} (the paper; not with flows). objective: "elbo" (averaged over ``particles`` draws)
    or "iwae", the importance-weighted bound over ``particles`` draws of every latent path
    (``dmm_jax.objectives``; with kl "sampled" only) or "fivo", the particle filter's bound
    with ``particles`` particles resampled by ``resampling`` (``dmm_jax.filtering``). early_stopping_patience: stop after this many
    evaluations (every eval_every epochs) without a better validation bound (the bound of the
    objective: ``dmm_jax.train.validation_bound``); 0 never stops.
    """

    epochs: int = 5000
    batch_size: int = 20
    learning_rate: float = 3e-4
    beta1: float = 0.96
    beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_norm: float = 10.0
    lr_decay: float = 0.99996
    weight_decay: float = 2.0
    annealing_epochs: int = 1000
    minimum_annealing_factor: float = 0.2
    seed: int = 0
    # False: random mini-batches as the reference. True: random mini-batches of sequences of
    # similar length (dmm_jax.data.batching.length_grouped_batches), far less padding.
    length_bucketing: bool = False
    # Memory: a batch whose padded size (sequences x steps) exceeds this is differentiated in
    # micro-batches of whole sequences and their gradients summed (same estimator; activations
    # of one micro-batch in memory at a time; each micro-batch still runs on its own real
    # steps, see real_steps). 0: never split (the reference's behaviour). With the default, an
    # epoch and evaluation of 20 sequences of 4000 steps peaked at 1.6 GiB resident (3.3 GiB
    # unsplit; docs/RESULTS.md); no JSB batch is split.
    microbatch_steps: int = 32768
    # Speed: run the per-step networks of each training batch on its real steps only (the
    # same loss and gradients; see dmm_jax.real_steps). False: on every padded step.
    real_steps: bool = True
    eval_every: int = 0  # evaluate validation and test every K epochs (0: only at the end)
    eval_samples: int = 1
    eval_batch_size: int = 64
    kl: str = "sampled"
    objective: str = "elbo"
    particles: int = 1
    resampling: str = "systematic"
    lr_schedule: str = "exponential"
    annealing_schedule: str = "linear"
    early_stopping_patience: int = 0
    # Inverted dropout on the emission network's input during training (families whose
    # model takes ``dropout``: dmm, vrnn); evaluation and generation never drop.
    dropout: float = 0.0
    # The same on the observations' features entering the model's RNN (families whose model
    # takes ``input_dropout``: vrnn).
    input_dropout: float = 0.0
    # Piano rolls only: each training piece shifted by a random number of semitones in
    # [-transpose, transpose] at every update, never off the keyboard (dmm_jax.data.transpose);
    # validation and test are never shifted. 0: never.
    transpose: int = 0
    # Exponential moving average of the parameters over updates, with this decay per update
    # (dmm_jax.optim.average_weights): evaluation during training, early stopping, checkpoints'
    # parameters and the returned model are the average. 0: the last update's parameters.
    weight_average: float = 0.0

    def __post_init__(self):
        positive = (
            "epochs", "batch_size", "learning_rate", "eval_samples", "eval_batch_size", "particles"
        )  # fmt: skip
        for field in positive:
            if getattr(self, field) <= 0:
                raise ValueError(
                    f"TrainConfig.{field} must be positive, got {getattr(self, field)!r}"
                )
        choices = (
            ("kl", KL_ESTIMATORS),
            ("objective", OBJECTIVES),
            ("resampling", RESAMPLING),
            ("lr_schedule", LR_SCHEDULES),
            ("annealing_schedule", ANNEALING_SCHEDULES),
        )
        for field, allowed in choices:
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"TrainConfig.{field} must be one of {allowed}, got {getattr(self, field)!r}"
                )
        nonnegative = (
            "annealing_epochs",
            "eval_every",
            "clip_norm",
            "weight_decay",
            "microbatch_steps",
            "early_stopping_patience",
            "transpose",
        )
        for field in nonnegative:
            if getattr(self, field) < 0:
                raise ValueError(f"TrainConfig.{field} must be >= 0, got {getattr(self, field)!r}")
        if not 0.0 < self.minimum_annealing_factor <= 1.0:
            raise ValueError("TrainConfig.minimum_annealing_factor must be in (0, 1]")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError("TrainConfig.lr_decay must be in (0, 1]")
        if not 0.0 <= self.weight_average < 1.0:
            raise ValueError(
                f"TrainConfig.weight_average must be in [0, 1), got {self.weight_average!r}"
            )
        for field in DROPOUTS:
            rate = getattr(self, field)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"TrainConfig.{field} must be in [0, 1), got {rate!r}")
            if rate and self.objective == "fivo":
                raise ValueError(
                    f"TrainConfig.{field} applies to the model's trace (objective 'elbo' or "
                    "'iwae'); the particle filter of objective 'fivo' runs the networks itself"
                )
        if self.objective != "elbo" and self.kl == "analytic":
            raise ValueError(
                f"TrainConfig.objective={self.objective!r} scores the drawn paths: it needs "
                "kl='sampled'"
            )
        if self.kl == "analytic" and self.particles != 1:
            raise ValueError("TrainConfig.kl='analytic' takes one particle (particles=1)")
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError(
                "TrainConfig.early_stopping_patience needs eval_every > 0 (it counts evaluations)"
            )


# The continuous-time families' configs (they use ``option`` above).
from dmm_jax.continuous_config import (
    LatentODEConfig,
    ODERNNConfig,
    RNNDtConfig,
    RNNVAEConfig,
)

# The model families' configs by name (``dmm_jax.models`` pairs them with their models).
MODEL_CONFIGS = {
    "dmm": DMMConfig,
    "vrnn": VRNNConfig,
    "latent-ode": LatentODEConfig,
    "ode-rnn": ODERNNConfig,
    "rnn-dt": RNNDtConfig,
    "rnn-vae": RNNVAEConfig,
}


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls: type, values: dict[str, Any]):
    """Builds ``cls`` from a dict, naming any key that ``cls`` does not have."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    return cls(**values)
