"""PyTorch/Pyro reference Deep Markov Model that ``dmm_jax`` is benchmarked against.

A faithful re-implementation of Pyro's ``examples/dmm.py`` (Krishnan et al. 2017, DKS
variant, no IAFs), written against the current Pyro API: same networks, same model/guide
(Python loop over ``pyro.markov``, masked ``to_event(1)`` sites, ``poutine.scale`` KL
annealing), same ``ClippedAdam`` settings, same mini-batching (``torch.randperm`` each epoch,
each batch sorted by length, padded to its longest sequence, reversed and packed for the RNN)
and the same loss normalisation (sum of ``svi.step`` losses / total training time steps).

The core takes plain numpy piano rolls (``[len_i, 88]`` binary arrays), so other benchmark
scripts can import it::

    trainer = ReferenceTrainer(train_sequences, seed=0)
    row = trainer.run_epoch()            # {"epoch", "train_loss_per_step", "seconds", ...}
    nll = trainer.evaluate(valid_seqs)   # -ELBO per time step, annealing factor 1

CLI::

    python benchmarks/pyro_reference.py --epochs 10 --seed 0 [--data PATH] [--eval]
        [--threads N] [--out FILE.json]

Needs the ``bench`` extra (``torch``, ``pyro-ppl``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam
from torch import nn

LOWEST_NOTE = 21  # MIDI note of piano-roll column 0
NUM_NOTES = 88

# Defaults of Pyro's examples/dmm.py.
OPTIM_DEFAULTS: dict[str, Any] = {
    "lr": 3e-4,
    "betas": (0.96, 0.999),
    "clip_norm": 10.0,
    "lrd": 0.99996,
    "weight_decay": 2.0,
}
ANNEALING_EPOCHS = 1000
MINIMUM_ANNEALING_FACTOR = 0.2


# --------------------------------------------------------------------------- networks


class Emitter(nn.Module):
    """``p(x_t | z_t)``: z -> ReLU MLP -> Bernoulli probabilities."""

    def __init__(self, input_dim: int, z_dim: int, emission_dim: int) -> None:
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(z_dim, emission_dim)
        self.lin_hidden_to_hidden = nn.Linear(emission_dim, emission_dim)
        self.lin_hidden_to_input = nn.Linear(emission_dim, input_dim)
        self.relu = nn.ReLU()

    def forward(self, z_t: torch.Tensor) -> torch.Tensor:
        h1 = self.relu(self.lin_z_to_hidden(z_t))
        h2 = self.relu(self.lin_hidden_to_hidden(h1))
        return torch.sigmoid(self.lin_hidden_to_input(h2))


class GatedTransition(nn.Module):
    """``p(z_t | z_{t-1})``: gated mix of a linear map and a proposed mean (paper, sec. 5)."""

    def __init__(self, z_dim: int, transition_dim: int) -> None:
        super().__init__()
        self.lin_gate_z_to_hidden = nn.Linear(z_dim, transition_dim)
        self.lin_gate_hidden_to_z = nn.Linear(transition_dim, z_dim)
        self.lin_proposed_mean_z_to_hidden = nn.Linear(z_dim, transition_dim)
        self.lin_proposed_mean_hidden_to_z = nn.Linear(transition_dim, z_dim)
        self.lin_sig = nn.Linear(z_dim, z_dim)
        self.lin_z_to_loc = nn.Linear(z_dim, z_dim)
        # The reference starts lin_z_to_loc as the identity map.
        self.lin_z_to_loc.weight.data = torch.eye(z_dim)
        self.lin_z_to_loc.bias.data = torch.zeros(z_dim)
        self.relu = nn.ReLU()
        self.softplus = nn.Softplus()

    def forward(self, z_t_1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _gate = self.relu(self.lin_gate_z_to_hidden(z_t_1))
        gate = torch.sigmoid(self.lin_gate_hidden_to_z(_gate))
        _proposed_mean = self.relu(self.lin_proposed_mean_z_to_hidden(z_t_1))
        proposed_mean = self.lin_proposed_mean_hidden_to_z(_proposed_mean)
        loc = (1 - gate) * self.lin_z_to_loc(z_t_1) + gate * proposed_mean
        scale = self.softplus(self.lin_sig(self.relu(proposed_mean)))
        return loc, scale


class Combiner(nn.Module):
    """``q(z_t | z_{t-1}, x_{t:T})`` from ``z_{t-1}`` and the backward RNN state."""

    def __init__(self, z_dim: int, rnn_dim: int) -> None:
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(z_dim, rnn_dim)
        self.lin_hidden_to_loc = nn.Linear(rnn_dim, z_dim)
        self.lin_hidden_to_scale = nn.Linear(rnn_dim, z_dim)
        self.tanh = nn.Tanh()
        self.softplus = nn.Softplus()

    def forward(
        self, z_t_1: torch.Tensor, h_rnn: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h_combined = 0.5 * (self.tanh(self.lin_z_to_hidden(z_t_1)) + h_rnn)
        loc = self.lin_hidden_to_loc(h_combined)
        scale = self.softplus(self.lin_hidden_to_scale(h_combined))
        return loc, scale


# ------------------------------------------------------------- lockstep comparison


def dmm_jax_weights(net: DMM) -> dict[str, Any]:
    """``net``'s weights as numpy arrays in dmm_jax's parameter tree (``svi.get_params``).

    torch's ``nn.Linear`` computes x W^T + b, dmm_jax's x W + b: kernels are transposed.
    Works on any object with ``net``'s attribute layout (e.g. one whose tensors are grads).
    """

    def array(tensor) -> np.ndarray:
        return tensor.detach().cpu().numpy()

    def linear(layer) -> dict[str, np.ndarray]:
        return {"kernel": array(layer.weight).T, "bias": array(layer.bias)}

    trans, emitter, combiner, rnn = net.trans, net.emitter, net.combiner, net.rnn
    return {
        "transition$params": {
            "gate_z_to_hidden": linear(trans.lin_gate_z_to_hidden),
            "gate_hidden_to_z": linear(trans.lin_gate_hidden_to_z),
            "proposed_z_to_hidden": linear(trans.lin_proposed_mean_z_to_hidden),
            "proposed_hidden_to_z": linear(trans.lin_proposed_mean_hidden_to_z),
            "proposed_to_scale": linear(trans.lin_sig),
            "z_to_loc": linear(trans.lin_z_to_loc),
        },
        "emitter$params": {
            "z_to_hidden": linear(emitter.lin_z_to_hidden),
            "hidden_to_hidden": linear(emitter.lin_hidden_to_hidden),
            "hidden_to_logits": linear(emitter.lin_hidden_to_input),
        },
        "combiner$params": {
            "w_z": array(combiner.lin_z_to_hidden.weight).T,
            "b_z": array(combiner.lin_z_to_hidden.bias),
            "w_loc": array(combiner.lin_hidden_to_loc.weight).T,
            "b_loc": array(combiner.lin_hidden_to_loc.bias),
            "w_scale": array(combiner.lin_hidden_to_scale.weight).T,
            "b_scale": array(combiner.lin_hidden_to_scale.bias),
        },
        "encoder$params": {
            "w_ih": array(rnn.weight_ih_l0).T,
            "b_ih": array(rnn.bias_ih_l0),
            "w_hh": array(rnn.weight_hh_l0).T,
            "b_hh": array(rnn.bias_hh_l0),
            "h_0": array(net.h_0).reshape(-1),
        },
        "z_0": array(net.z_0),
        "z_q_0": array(net.z_q_0),
    }


@contextlib.contextmanager
def given_guide_noise(queue: list) -> Iterator[None]:
    """Inside, every ``Normal.rsample`` (the guide's draws z_t, in order t = 1, 2, ...) uses
    loc + scale * queue.pop(0) instead of torch's noise, so another implementation fed the
    same noise can be compared draw for draw."""
    original = dist.Normal.rsample

    def rsample(self, sample_shape=()):  # the guide draws one z_t per call
        return self.loc + self.scale * torch.as_tensor(
            queue.pop(0), dtype=self.loc.dtype, device=self.loc.device
        )

    dist.Normal.rsample = rsample
    try:
        yield
    finally:
        dist.Normal.rsample = original


# ------------------------------------------------------------------ mini-batch helpers
# Same semantics as pyro.contrib.examples.polyphonic_data_loader (not imported: importing
# it creates a data directory as a side effect).


def reverse_sequences(mini_batch: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence along time within its own length; padding stays at the end."""
    reversed_mini_batch = torch.zeros_like(mini_batch)
    for b in range(mini_batch.size(0)):
        T = int(seq_lengths[b])
        time_slice = torch.arange(T - 1, -1, -1, device=mini_batch.device)
        reversed_mini_batch[b, 0:T, :] = torch.index_select(mini_batch[b, :, :], 0, time_slice)
    return reversed_mini_batch


def pad_and_reverse(
    rnn_output: nn.utils.rnn.PackedSequence, seq_lengths: torch.Tensor
) -> torch.Tensor:
    """Unpack the RNN output and undo the per-sequence time reversal."""
    padded, _ = nn.utils.rnn.pad_packed_sequence(rnn_output, batch_first=True)
    return reverse_sequences(padded, seq_lengths)


def get_mini_batch_mask(mini_batch: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """0/1 float mask ``[batch, T_max]`` of the valid time steps (on the CPU)."""
    mask = torch.zeros(mini_batch.shape[0:2])
    for b in range(mini_batch.shape[0]):
        mask[b, 0 : seq_lengths[b]] = torch.ones(int(seq_lengths[b]))
    return mask


def get_mini_batch(
    mini_batch_indices: torch.Tensor,
    sequences: torch.Tensor,
    seq_lengths: torch.Tensor,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, nn.utils.rnn.PackedSequence, torch.Tensor, torch.Tensor]:
    """Select, sort by decreasing length, pad to the batch max, and pack reversed copies.

    Returns ``(mini_batch, packed_reversed, mask, sorted_lengths)`` as the reference does;
    with ``device`` (the reference's ``--cuda``) the batch, its reversed copy and the mask are
    moved there before packing, the lengths stay on the CPU.
    """
    seq_lengths = seq_lengths[mini_batch_indices]
    _, sorted_seq_length_indices = torch.sort(seq_lengths)
    sorted_seq_length_indices = sorted_seq_length_indices.flip(0)
    sorted_seq_lengths = seq_lengths[sorted_seq_length_indices]
    sorted_mini_batch_indices = mini_batch_indices[sorted_seq_length_indices]
    T_max = int(torch.max(seq_lengths))
    mini_batch = sequences[sorted_mini_batch_indices, 0:T_max, :]
    mini_batch_reversed = reverse_sequences(mini_batch, sorted_seq_lengths)
    mini_batch_mask = get_mini_batch_mask(mini_batch, sorted_seq_lengths)
    mini_batch, mini_batch_mask = mini_batch.to(device), mini_batch_mask.to(device)
    mini_batch_reversed = mini_batch_reversed.to(device)
    packed = nn.utils.rnn.pack_padded_sequence(
        mini_batch_reversed, sorted_seq_lengths, batch_first=True
    )
    return mini_batch, packed, mini_batch_mask, sorted_seq_lengths


def pad_sequences(sequences: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Numpy piano rolls -> (float32 ``[N, T_max, D]`` zero-padded tensor, int64 lengths)."""
    if not sequences:
        raise ValueError("need at least one sequence")
    tensors = [torch.as_tensor(np.asarray(s, dtype=np.float32)) for s in sequences]
    for s in tensors:
        if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] != tensors[0].shape[1]:
            raise ValueError(f"expected [len >= 1, D] arrays of equal D, got {tuple(s.shape)}")
    lengths = torch.tensor([s.shape[0] for s in tensors], dtype=torch.long)
    return nn.utils.rnn.pad_sequence(tensors, batch_first=True), lengths


# ----------------------------------------------------------------------------- the DMM


class DMM(nn.Module):
    """Model ``p(x, z)`` and guide ``q(z | x)`` of the reference DMM (defaults as Pyro's)."""

    def __init__(
        self,
        input_dim: int = NUM_NOTES,
        z_dim: int = 100,
        emission_dim: int = 100,
        transition_dim: int = 200,
        rnn_dim: int = 600,
        num_layers: int = 1,
        rnn_dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.emitter = Emitter(input_dim, z_dim, emission_dim)
        self.trans = GatedTransition(z_dim, transition_dim)
        self.combiner = Combiner(z_dim, rnn_dim)
        # dropout only acts between stacked RNN layers
        rnn_dropout_rate = 0.0 if num_layers == 1 else rnn_dropout_rate
        self.rnn = nn.RNN(
            input_size=input_dim,
            hidden_size=rnn_dim,
            nonlinearity="relu",
            batch_first=True,
            bidirectional=False,
            num_layers=num_layers,
            dropout=rnn_dropout_rate,
        )
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn_dim))

    def model(
        self,
        mini_batch: torch.Tensor,
        mini_batch_reversed: nn.utils.rnn.PackedSequence,
        mini_batch_mask: torch.Tensor,
        mini_batch_seq_lengths: torch.Tensor,
        annealing_factor: float = 1.0,
    ) -> None:
        """``p(x_{1:T} | z_{1:T}) p(z_{1:T})``."""
        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        z_prev = self.z_0.expand(mini_batch.size(0), self.z_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.trans(z_prev)
                with poutine.scale(None, annealing_factor):
                    z_t = pyro.sample(
                        f"z_{t}",
                        dist.Normal(z_loc, z_scale).mask(mini_batch_mask[:, t - 1 : t]).to_event(1),
                    )
                emission_probs_t = self.emitter(z_t)
                pyro.sample(
                    f"obs_x_{t}",
                    dist.Bernoulli(emission_probs_t)
                    .mask(mini_batch_mask[:, t - 1 : t])
                    .to_event(1),
                    obs=mini_batch[:, t - 1, :],
                )
                z_prev = z_t

    def guide(
        self,
        mini_batch: torch.Tensor,
        mini_batch_reversed: nn.utils.rnn.PackedSequence,
        mini_batch_mask: torch.Tensor,
        mini_batch_seq_lengths: torch.Tensor,
        annealing_factor: float = 1.0,
    ) -> None:
        """``q(z_{1:T} | x_{1:T})`` with a backward RNN over the reversed, packed batch."""
        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        h_0_contig = self.h_0.expand(
            self.rnn.num_layers, mini_batch.size(0), self.rnn.hidden_size
        ).contiguous()
        rnn_output, _ = self.rnn(mini_batch_reversed, h_0_contig)
        rnn_output = pad_and_reverse(rnn_output, mini_batch_seq_lengths)
        z_prev = self.z_q_0.expand(mini_batch.size(0), self.z_q_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.combiner(z_prev, rnn_output[:, t - 1, :])
                z_dist = dist.Normal(z_loc, z_scale)
                with poutine.scale(None, annealing_factor):
                    z_t = pyro.sample(
                        f"z_{t}",
                        z_dist.mask(mini_batch_mask[:, t - 1 : t]).to_event(1),
                    )
                z_prev = z_t


# ------------------------------------------------------------------------- training


def annealing_factor(
    epoch: int,
    which_mini_batch: int,
    n_mini_batches: int,
    annealing_epochs: int = ANNEALING_EPOCHS,
    minimum_annealing_factor: float = MINIMUM_ANNEALING_FACTOR,
) -> float:
    """KL annealing factor of the reference: linear from ``min_af`` to 1 over the epochs."""
    if annealing_epochs > 0 and epoch < annealing_epochs:
        min_af = minimum_annealing_factor
        return min_af + (1.0 - min_af) * (
            float(which_mini_batch + epoch * n_mini_batches + 1)
            / float(annealing_epochs * n_mini_batches)
        )
    return 1.0


class ReferenceTrainer:
    """The reference training loop, one epoch per :meth:`run_epoch` call.

    Each trainer owns a torch RNG stream seeded with ``seed`` (network init, ``randperm``,
    guide samples) and its own Pyro param-store scope, so several trainers can live in one
    process without disturbing each other or the global RNG. With a single trainer this is
    the same as calling ``pyro.set_rng_seed(seed)`` before building the model. ``device``
    ("cuda" on a GPU, as the reference's ``--cuda``) holds the networks and every batch; there
    the guide's draws come from torch's global CUDA generator, seeded with ``seed`` too.
    """

    def __init__(
        self,
        train_sequences: Sequence[np.ndarray],
        seed: int = 0,
        batch_size: int = 20,
        *,
        z_dim: int = 100,
        emission_dim: int = 100,
        transition_dim: int = 200,
        rnn_dim: int = 600,
        num_layers: int = 1,
        rnn_dropout_rate: float = 0.0,
        annealing_epochs: int = ANNEALING_EPOCHS,
        minimum_annealing_factor: float = MINIMUM_ANNEALING_FACTOR,
        optim_args: Mapping[str, Any] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.sequences, self.seq_lengths = pad_sequences(train_sequences)
        self.n_data = len(self.seq_lengths)
        self.n_time_steps = float(torch.sum(self.seq_lengths))
        self.batch_size = batch_size
        self.n_mini_batches = math.ceil(self.n_data / batch_size)
        self.annealing_epochs = annealing_epochs
        self.minimum_annealing_factor = minimum_annealing_factor
        self.seed = seed
        self.device = torch.device(device)
        self.optim_args = {**OPTIM_DEFAULTS, **(optim_args or {})}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.dmm = DMM(
                input_dim=int(self.sequences.shape[-1]),
                z_dim=z_dim,
                emission_dim=emission_dim,
                transition_dim=transition_dim,
                rnn_dim=rnn_dim,
                num_layers=num_layers,
                rnn_dropout_rate=rnn_dropout_rate,
            )
            self._rng_state = torch.get_rng_state()
        self.dmm.to(self.device)
        self._param_state: dict[str, Any] = {"params": {}, "constraints": {}}
        self.optimizer = ClippedAdam(dict(self.optim_args))
        self.svi = SVI(self.dmm.model, self.dmm.guide, self.optimizer, loss=Trace_ELBO())
        self.epoch = 0

    @contextlib.contextmanager
    def _activate(self) -> Iterator[None]:
        """Swap in this trainer's RNG state and param store; swap them out afterwards."""
        outer_rng = torch.get_rng_state()
        torch.set_rng_state(self._rng_state)
        try:
            with pyro.get_param_store().scope(self._param_state):
                yield
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(outer_rng)

    def annealing_factor(self, which_mini_batch: int, epoch: int | None = None) -> float:
        """Annealing factor of mini-batch ``which_mini_batch`` in ``epoch`` (default: next)."""
        return annealing_factor(
            self.epoch if epoch is None else epoch,
            which_mini_batch,
            self.n_mini_batches,
            self.annealing_epochs,
            self.minimum_annealing_factor,
        )

    def run_epoch(self) -> dict[str, Any]:
        """One pass over shuffled mini-batches; returns the epoch's record."""
        epoch = self.epoch
        with self._activate():
            start = time.perf_counter()
            epoch_nll = 0.0
            shuffled_indices = torch.randperm(self.n_data)
            af = 1.0
            for which_mini_batch in range(self.n_mini_batches):
                af = self.annealing_factor(which_mini_batch, epoch)
                lo = which_mini_batch * self.batch_size
                hi = min((which_mini_batch + 1) * self.batch_size, self.n_data)
                batch = get_mini_batch(
                    shuffled_indices[lo:hi], self.sequences, self.seq_lengths, self.device
                )
                epoch_nll += self.svi.step(*batch, af)
            seconds = time.perf_counter() - start
        self.epoch += 1
        return {
            "epoch": epoch,
            "train_loss_per_step": epoch_nll / self.n_time_steps,
            "seconds": seconds,
            "annealing_factor": af,
        }

    def evaluate(self, sequences: Sequence[np.ndarray]) -> float:
        """-ELBO per time step of ``sequences`` as one batch, annealing factor 1 (1 sample)."""
        padded, lengths = pad_sequences(sequences)
        batch = get_mini_batch(torch.arange(len(lengths)), padded, lengths, self.device)
        with self._activate():
            self.dmm.rnn.eval()
            try:
                loss = self.svi.evaluate_loss(*batch)
            finally:
                self.dmm.rnn.train()
        return loss / float(torch.sum(lengths))


def evaluate_reference(model: ReferenceTrainer | DMM, sequences: Sequence[np.ndarray]) -> float:
    """-ELBO per time step (annealing 1) of a trainer's or a bare :class:`DMM`'s weights."""
    if isinstance(model, ReferenceTrainer):
        return model.evaluate(sequences)
    padded, lengths = pad_sequences(sequences)
    batch = get_mini_batch(torch.arange(len(lengths)), padded, lengths)
    was_training = model.rnn.training
    model.rnn.eval()
    try:
        with pyro.get_param_store().scope(), torch.no_grad():
            loss = Trace_ELBO().loss(model.model, model.guide, *batch)
    finally:
        model.rnn.train(was_training)
    return loss / float(torch.sum(lengths))


def train_reference(
    train_sequences: Sequence[np.ndarray],
    *,
    epochs: int,
    seed: int,
    batch_size: int = 20,
    eval_sequences: Mapping[str, Sequence[np.ndarray]] | None = None,
    eval_every: int = 0,
    log: Callable[[str], None] | None = None,
    **trainer_kwargs: Any,
) -> list[dict[str, Any]]:
    """Train the reference DMM for ``epochs`` epochs; one record per epoch.

    ``eval_sequences`` (e.g. ``{"valid": ..., "test": ...}``) are evaluated every
    ``eval_every`` epochs (0: only after the last one) and stored in the record as
    ``"<name>_loss_per_step"``; evaluation time is not part of ``"seconds"``. ``log`` gets
    the reference's progress lines.
    """
    trainer = ReferenceTrainer(train_sequences, seed, batch_size, **trainer_kwargs)
    history = []
    for epoch in range(epochs):
        row = trainer.run_epoch()
        if log is not None:
            log(
                f"[training epoch {row['epoch']:04d}]  {row['train_loss_per_step']:.4f} "
                f"\t\t\t\t(dt = {row['seconds']:.3f} sec)"
            )
        last = epoch == epochs - 1
        if eval_sequences and (last or (eval_every > 0 and (epoch + 1) % eval_every == 0)):
            for name, seqs in eval_sequences.items():
                row[f"{name}_loss_per_step"] = trainer.evaluate(seqs)
            if log is not None:
                values = "  ".join(
                    f"{name} {row[f'{name}_loss_per_step']:.4f}" for name in eval_sequences
                )
                log(f"[eval epoch {row['epoch']:04d}]  {values}")
        history.append(row)
    return history


# ------------------------------------------------------------------------------ CLI


def _json_piano_rolls(path: pathlib.Path) -> dict[str, list[np.ndarray]]:
    """Read a ``{split: [[[midi notes] per step] per sequence]}`` JSON file as piano rolls."""
    with open(path) as f:
        raw = json.load(f)
    splits = {}
    for split in ("train", "valid", "test"):
        rolls = []
        for seq in raw[split]:
            roll = np.zeros((len(seq), NUM_NOTES), dtype=np.uint8)
            for t, notes in enumerate(seq):
                roll[t, np.asarray(notes, dtype=np.int64) - LOWEST_NOTE] = 1
            rolls.append(roll)
        splits[split] = rolls
    return splits


def load_jsb(data: str | None) -> tuple[dict[str, list[np.ndarray]], str]:
    """JSB Chorales splits as piano rolls, plus a description of where they came from.

    Uses ``dmm_jax.data.load_dataset`` when importable, else reads the JSON file at ``data``
    (a file or a directory holding ``jsb_chorales.json``) or ``$DMM_JAX_DATA_DIR``.
    """
    try:
        from dmm_jax.data import load_dataset
    except ImportError:
        load_dataset = None
    if load_dataset is not None:
        ds = load_dataset("jsb_chorales", data)
        splits = {
            name: [np.asarray(s) for s in getattr(ds, name).sequences]
            for name in ("train", "valid", "test")
        }
        return splits, f"dmm_jax.data.load_dataset ({getattr(ds, 'source', data)})"
    if data is None:
        data_dir = os.environ.get("DMM_JAX_DATA_DIR")
        if not data_dir:
            raise SystemExit("no JSB data: pass --data or set DMM_JAX_DATA_DIR")
        data = data_dir
    path = pathlib.Path(data).expanduser()
    if path.is_dir():
        path = path / "jsb_chorales.json"
    return _json_piano_rolls(path), str(path)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Command-line entry point; returns the per-epoch records."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--epochs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="JSB file or directory")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument(
        "--eval", action="store_true", help="evaluate valid/test -ELBO per step after training"
    )
    parser.add_argument(
        "--eval-every", type=int, default=0, help="with --eval, also every N epochs"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="write records + metadata as JSON")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    splits, source = load_jsb(args.data)
    train = splits["train"]
    print(
        f"N_train_data: {len(train)}     "
        f"avg. training seq. length: {np.mean([len(s) for s in train]):.2f}    "
        f"N_mini_batches: {math.ceil(len(train) / args.batch_size)}",
        flush=True,
    )
    history = train_reference(
        train,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        eval_sequences={"valid": splits["valid"], "test": splits["test"]} if args.eval else None,
        eval_every=args.eval_every,
        log=lambda line: print(line, flush=True),
    )
    if args.out:
        metadata = {
            "implementation": "pyro_reference (Pyro examples/dmm.py)",
            "torch_version": torch.__version__,
            "pyro_version": pyro.__version__,
            "python_version": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "seed": args.seed,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "data": source,
            "n_train_sequences": len(train),
            "n_train_time_steps": int(sum(len(s) for s in train)),
            "optim": {k: list(v) if isinstance(v, tuple) else v for k, v in OPTIM_DEFAULTS.items()},
            "annealing_epochs": ANNEALING_EPOCHS,
            "minimum_annealing_factor": MINIMUM_ANNEALING_FACTOR,
            "argv": sys.argv,
        }
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"metadata": metadata, "epochs": history}, indent=2) + "\n")
    return history


if __name__ == "__main__":
    main()
