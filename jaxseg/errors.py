"""Exceptions that jaxseg raises for problems a user can fix."""


class ConfigError(ValueError):
  """A configuration value is wrong; the message names the field."""


class DataError(ValueError):
  """Input data is missing or malformed; the message names the file."""


class CheckpointError(RuntimeError):
  """A checkpoint cannot be saved or restored; the message names the path."""


class WeightsError(CheckpointError):
  """A pretrained-weights file cannot be read or does not fit the model; the message names the file (and key)."""
