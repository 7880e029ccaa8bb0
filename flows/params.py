"""The flows' parameter types, as the Prefect UI shows them in a deployment's run form.

- A profile is a choice among the shipped ones (a dropdown), with a separate path parameter for a custom YAML file.
- Overrides are a mapping of a config field (dotted, e.g. ``qa.max_in_flight``) to its value. The field names are an
  enum in the deployment's parameter schema, so the server refuses a misspelt field before the run is created; the
  values are checked against the profile's schema by the first line of the flow, before any stage runs.

The choices are read from the installed package, so a `culbot deploy` after adding a profile offers it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from culbot.pipeline_config.loader import ConfigError, override_keys
from culbot.pipeline_config.schema import DataProfile, data_profiles
from culbot.pipeline_config.train_schema import TrainProfile, train_profiles

DataProfileName = Literal[tuple(p.stem for p in data_profiles())]          # type: ignore[valid-type]
TrainProfileName = Literal[tuple(p.stem for p in train_profiles())]        # type: ignore[valid-type]
DataOverrides = dict[Literal[tuple(override_keys(DataProfile))], Any]      # type: ignore[valid-type]
TrainOverrides = dict[Literal[tuple(override_keys(TrainProfile))], Any]    # type: ignore[valid-type]

TrainOn = Literal["auto", "pool", "here"]


class DataProfileChoice(BaseModel):
    """The data parameters a run was given (what a new-dataset event carries to the run it starts)."""

    data_profile: str
    data_profile_file: str = ""
    data_overrides: dict[str, Any] = {}


def profile_source(name: str, file: str | None, what: str) -> str:
    """The profile to load: the custom file when one is given, else the shipped name."""
    if file:
        if not str(file).endswith((".yaml", ".yml")):
            raise ConfigError(f"{what}_file {file!r}: expected a path to a .yaml file (a shipped profile is chosen with {what})")
        return str(file)
    return name


def profile_kwargs(data_profile: str | None = None, train_profile: str | None = None) -> dict[str, str]:
    """Flow keyword arguments for profiles given as a shipped name or a YAML path (the CLI's and tests' way):
    a name goes to ``data_profile``, a path to ``data_profile_file`` (the same for the training profile)."""
    out: dict[str, str] = {}
    for what, value in (("data_profile", data_profile), ("train_profile", train_profile)):
        if value is not None:
            out[what + ("_file" if str(value).endswith((".yaml", ".yml")) else "")] = str(value)
    return out
