"""Checkpoint converters: one pure function per source format, built on the rule engine in ``rules``."""

from .rules import ConversionError, Rule, apply_rules

__all__ = ["ConversionError", "Rule", "apply_rules"]
