"""The exceptions every part of the model's files raises: one home, below sources, download and volume,
so none of them imports another for its error types. Messages say what was found and what to do."""


class ModelNotFound(Exception):
    """No source holds the model. The message lists every path tried and the setting that would fix it."""


class UnsupportedWeights(Exception):
    """The folder holds the model, but not in a form this worker loads (pickle weights, missing shards)."""


class CorruptWeights(UnsupportedWeights):
    """A weight file is truncated or is not valid safetensors. The message names the file and the fix."""
