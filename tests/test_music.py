"""Piano rolls to MIDI and back: same notes, same durations, one note per held run."""

import mido
import numpy as np
import pytest

from dmm_jax.music import TICKS_PER_BEAT, Note, piano_roll_notes, read_midi, write_midi


def _note_spans_read_by_mido(path):
    """(pitch, start tick, end tick) of every note in the file, parsed here with mido alone."""
    spans, open_notes, tick = [], {}, 0
    for message in mido.MidiFile(path).tracks[0]:
        tick += message.time
        if message.type == "note_on" and message.velocity > 0:
            open_notes[message.note] = tick
        elif message.type in ("note_on", "note_off"):
            spans.append((message.note, open_notes.pop(message.note), tick))
    assert not open_notes
    return sorted(spans)


def test_a_held_note_is_one_midi_note_of_its_length(tmp_path):
    roll = np.zeros((8, 88), np.uint8)
    roll[1:4, 60 - 21] = 1  # middle C held three quarter notes
    roll[2, 64 - 21] = 1  # E for one
    roll[5:7, 60 - 21] = 1  # C struck again for two
    path = write_midi(tmp_path / "held.mid", roll)
    b = TICKS_PER_BEAT
    assert _note_spans_read_by_mido(path) == [
        (60, b, 4 * b),
        (60, 5 * b, 7 * b),
        (64, 2 * b, 3 * b),
    ]
    assert piano_roll_notes(roll) == [Note(60, 1, 3), Note(64, 2, 1), Note(60, 5, 2)]
    assert mido.MidiFile(path).length == pytest.approx(8 * 0.5)  # 8 beats at 120 per minute


def test_random_rolls_round_trip_through_midi_with_the_same_notes(tmp_path):
    rng = np.random.default_rng(0)
    roll = (rng.random((40, 88)) < 0.15).astype(np.uint8)
    roll[:, :3] = 1  # notes held from the first step to the last
    roll[-4:, 3:] = 0  # trailing rests are kept: the track ends with the roll
    path = write_midi(tmp_path / "random.mid", roll, tempo_bpm=90)
    np.testing.assert_array_equal(read_midi(path), roll)
    # Notes and durations as mido reads them equal the runs of the roll, found by a plain loop.
    runs = []
    for key in range(88):
        t = 0
        while t < len(roll):
            if roll[t, key]:
                start = t
                while t < len(roll) and roll[t, key]:
                    t += 1
                runs.append((21 + key, start * TICKS_PER_BEAT, t * TICKS_PER_BEAT))
            t += 1
    assert _note_spans_read_by_mido(path) == sorted(runs)
    assert [p.name for p in tmp_path.iterdir()] == ["random.mid"]  # no temporary left behind


def test_bad_rolls_and_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\[T, 88\].*\(5, 12\)"):
        write_midi(tmp_path / "a.mid", np.zeros((5, 12)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        write_midi(tmp_path / "a.mid", np.full((5, 88), 0.5))
    with pytest.raises(ValueError, match="velocity"):
        write_midi(tmp_path / "a.mid", np.zeros((5, 88)), velocity=0)
    assert not (tmp_path / "a.mid").exists()
    junk = tmp_path / "junk.mid"
    junk.write_bytes(b"not a midi file")
    with pytest.raises(ValueError, match="junk.mid"):
        read_midi(junk)


def test_reading_merges_tracks_and_rounds_to_beats(tmp_path):
    """A type-1 file from elsewhere: 96 ticks a beat, two parts, a note never released."""
    midi = mido.MidiFile(type=1, ticks_per_beat=96)
    soprano, bass = mido.MidiTrack(), mido.MidiTrack()
    soprano += [
        mido.Message("note_on", note=72, velocity=90, time=0),
        mido.Message("note_on", note=72, velocity=0, time=190),  # 2 beats, slightly early
        mido.Message("note_on", note=74, velocity=90, time=2),
    ]  # 74 sounds to the end of the track
    soprano.append(mido.MetaMessage("end_of_track", time=96 * 2))
    bass += [
        mido.Message("note_on", note=48, velocity=70, channel=1, time=96),
        mido.Message("note_off", note=48, channel=1, time=96 * 3),
    ]
    midi.tracks += [soprano, bass]
    path = tmp_path / "two_parts.mid"
    midi.save(path)
    roll = read_midi(path)
    assert roll.shape == (4, 88)
    assert piano_roll_notes(roll) == [Note(72, 0, 2), Note(48, 1, 3), Note(74, 2, 2)]
