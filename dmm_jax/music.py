"""Piano rolls <-> standard MIDI files (with ``mido``).

A piano roll is [T, 88] 0/1: row t is time step t, column i is MIDI note 21 + i (A0 .. C8), the
layout of ``dmm_jax.data``. One time step is one quarter note (one MIDI beat), and a note that
sounds over consecutive steps is one MIDI note lasting that many beats; a roll cannot tell a
held note from the same note struck again, so reading a file back merges such repeats.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import NamedTuple

import mido
import numpy as np

from dmm_jax.data import LOWEST_NOTE, NUM_NOTES
from dmm_jax.files import atomic_write_bytes

TICKS_PER_BEAT = 480


class Note(NamedTuple):
    pitch: int  # MIDI note number
    start: int  # first time step
    duration: int  # number of steps it sounds


def _check_roll(roll, name: str = "roll") -> np.ndarray:
    roll = np.asarray(roll)
    if roll.ndim != 2 or roll.shape[1] != NUM_NOTES:
        raise ValueError(f"{name} must be a [T, {NUM_NOTES}] piano roll, got shape {roll.shape}")
    if not np.isin(roll, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1 (note off / on)")
    return roll.astype(np.uint8)


def piano_roll_notes(roll) -> list[Note]:
    """The notes of a [T, 88] roll: one per run of consecutive on-steps of a key, by start."""
    roll = _check_roll(roll)
    padded = np.pad(roll.astype(np.int8), ((1, 1), (0, 0)))
    change = np.diff(padded, axis=0)  # +1 where a run starts, -1 one step after it ends
    starts, keys = np.nonzero(change == 1)
    ends, end_keys = np.nonzero(change == -1)
    # Each key's runs start and end in the same time order, so sorting by (key, time) pairs them.
    by_key = np.lexsort((starts, keys))
    ends_by_key = np.lexsort((ends, end_keys))
    notes = [
        Note(int(LOWEST_NOTE + k), int(s), int(e - s))
        for k, s, e in zip(keys[by_key], starts[by_key], ends[ends_by_key], strict=True)
    ]
    return sorted(notes, key=lambda n: (n.start, n.pitch))


def piano_roll_to_midi(
    roll,
    *,
    tempo_bpm: float = 120.0,
    velocity: int = 80,
    program: int = 0,
) -> mido.MidiFile:
    """A one-track MIDI file (type 0) playing ``roll`` on General MIDI ``program`` (0: piano)."""
    roll = _check_roll(roll)
    if not tempo_bpm > 0:
        raise ValueError(f"tempo_bpm must be > 0, got {tempo_bpm}")
    if not 1 <= velocity <= 127:
        raise ValueError(f"velocity must be in 1..127, got {velocity}")
    if not 0 <= program <= 127:
        raise ValueError(f"program must be in 0..127, got {program}")
    events = []  # (tick, order, message): at one tick, note-offs go before note-ons
    for note in piano_roll_notes(roll):
        on, off = note.start * TICKS_PER_BEAT, (note.start + note.duration) * TICKS_PER_BEAT
        events.append((on, 1, mido.Message("note_on", note=note.pitch, velocity=velocity)))
        events.append((off, 0, mido.Message("note_off", note=note.pitch, velocity=0)))
    events.sort(key=lambda e: (e[0], e[1], e[2].note))
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo_bpm), time=0))
    track.append(mido.Message("program_change", program=program, time=0))
    now = 0
    for tick, _, message in events:
        track.append(message.copy(time=tick - now))
        now = tick
    # The track ends at the end of the roll, so trailing rests survive a round trip.
    track.append(mido.MetaMessage("end_of_track", time=len(roll) * TICKS_PER_BEAT - now))
    midi = mido.MidiFile(type=0, ticks_per_beat=TICKS_PER_BEAT)
    midi.tracks.append(track)
    return midi


def write_midi(path: str | os.PathLike, roll, **options) -> Path:
    """Writes ``roll`` [T, 88] as a standard MIDI file at ``path`` (atomically); see
    ``piano_roll_to_midi`` for the options."""
    buffer = io.BytesIO()
    piano_roll_to_midi(roll, **options).save(file=buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def read_midi(path: str | os.PathLike) -> np.ndarray:
    """Reads a MIDI file into a [T, 88] uint8 piano roll, one step per beat (quarter note).

    Note times are rounded to the nearest beat (a note shorter than half a beat still lasts
    one step); every track and channel is merged; T runs to the end of the longest track.
    """
    path = Path(path)
    try:
        midi = mido.MidiFile(path)
    except (OSError, EOFError, ValueError, KeyError, IndexError) as err:
        raise ValueError(f"{path}: not a readable MIDI file ({err})") from err
    per_beat = midi.ticks_per_beat
    notes, sounding, tick = [], {}, 0
    for message in mido.merge_tracks(midi.tracks):
        tick += message.time
        if message.type == "note_on" and message.velocity > 0:
            sounding.setdefault((message.channel, message.note), tick)
        elif message.type in ("note_on", "note_off"):
            start = sounding.pop((message.channel, message.note), None)
            if start is not None:
                notes.append((message.note, start, tick))
    notes += [(note, start, tick) for (_, note), start in sounding.items()]  # never released
    num_steps = round(tick / per_beat)
    rows = []
    for pitch, start, end in notes:
        if not LOWEST_NOTE <= pitch < LOWEST_NOTE + NUM_NOTES:
            raise ValueError(f"{path}: note {pitch} is outside the piano's range 21..108")
        first = round(start / per_beat)
        last = max(round(end / per_beat), first + 1)
        rows.append((pitch - LOWEST_NOTE, first, last))
        num_steps = max(num_steps, last)
    roll = np.zeros((num_steps, NUM_NOTES), np.uint8)
    for key, first, last in rows:
        roll[first:last, key] = 1
    return roll
