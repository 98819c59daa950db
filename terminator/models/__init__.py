"""Terminator models: ``Terminator(data_dim=1|2, ...)`` and ``Terminator.from_preset(name)``."""

from .terminator import PRESETS, Terminator, TerminatorConfig, parameter_count, preset_parameter_counts

__all__ = ["Terminator", "TerminatorConfig", "PRESETS", "parameter_count", "preset_parameter_counts"]
