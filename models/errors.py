"""The exception the models package raises for a model that cannot be built as requested."""

__all__ = ["ModelLoadError"]


class ModelLoadError(ValueError):
    """A model cannot be built as requested: unknown name, missing weights, bad input size."""
