"""The ground floor: the numerics (losses, log-probs, attention, packing), the data formats
and sources, storage and the run directory's files, the packed-row contract, the config,
the models and the stage interface. It imports nothing above it (pyproject.toml's
import-linter contracts)."""
