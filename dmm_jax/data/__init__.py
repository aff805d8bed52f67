"""Dataset loaders for dmm_jax."""

from dmm_jax.data.arrays import ArrayDataset, SequenceArrays, load_arrays, save_arrays
from dmm_jax.data.polyphonic import (
    DATASETS,
    LOWEST_NOTE,
    NUM_NOTES,
    DataError,
    PolyphonicDataset,
    SequenceSplit,
    default_cache_dir,
    load_dataset,
    read_canonical_file,
    resolve_dataset_file,
    restricted_pickle_loads,
    to_piano_rolls,
    validate_canonical,
)

__all__ = [
    "DATASETS",
    "LOWEST_NOTE",
    "NUM_NOTES",
    "ArrayDataset",
    "DataError",
    "PolyphonicDataset",
    "SequenceArrays",
    "SequenceSplit",
    "default_cache_dir",
    "load_arrays",
    "load_dataset",
    "read_canonical_file",
    "resolve_dataset_file",
    "restricted_pickle_loads",
    "save_arrays",
    "to_piano_rolls",
    "validate_canonical",
]
