"""A small engine for checkpoint converters: an ordered regex rename table plus tensor splits and merges.

A converter is a list of ``Rule``s. Every source key must fully match one rule (the first that matches
wins), every rule-produced key must be produced once, and merged targets must receive all their parts;
anything else raises ``ConversionError`` listing the offending keys. Converters are pure functions of
a state dict: no model code, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["ConversionError", "Rule", "apply_rules", "packed_qkv"]

Target = str | Callable[[re.Match], str]


class ConversionError(KeyError):
    """A checkpoint does not fit a converter's rule table; the message lists every problem key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Rule:
    """One line of a rename table.

    pattern: regex that must match the whole source key.
    target:  the new key: a ``re`` replacement template (``r"\\1.attn.qkv.\\2"``) or a function of the
             match (for index arithmetic); ``None`` drops the key on purpose (buffers we regenerate).
    split:   if given, the tensor is cut into ``len(split)`` equal chunks along dim 0 and chunk i goes
             to key template ``split[i]`` (``target`` must then be None).
    part:    ``(i, n)``: this source is chunk i of n of ``target``; the n chunks are concatenated
             along dim 0 once all are present.
    """

    pattern: str
    target: Target | None
    split: tuple[str, ...] = ()
    part: tuple[int, int] | None = None
    _regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(self.pattern))
        if self.split and self.target is not None:
            raise ValueError(f"rule {self.pattern!r}: give either target or split, not both")
        if self.part is not None and (self.target is None or self.split):
            raise ValueError(f"rule {self.pattern!r}: part needs a single target")

    def expand(self, match: re.Match, template: Target) -> str:
        return template(match) if callable(template) else match.expand(template)


def packed_qkv(prefix: str, group: int) -> tuple[str, ...]:
    """``split`` targets of a packed ``nn.MultiheadAttention`` ``in_proj_{weight,bias}`` (rows q, k, v, in
    that order) -> ``{prefix}{q,k,v}_proj.<param>``, the param name being match group ``group``."""
    return tuple(f"{prefix}{p}_proj.\\{group}" for p in ("q", "k", "v"))


def apply_rules(
    state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule], *, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename ``state_dict`` through ``rules``; raise ``ConversionError`` unless every key is used once."""
    rules = list(rules)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    part_counts: dict[str, int] = {}
    unmatched, collisions, bad_splits = [], [], []

    def put(key: str, tensor: torch.Tensor, src: str) -> None:
        if key in out:
            collisions.append(f"{key} (from {origin[key]} and {src})")
        out[key] = tensor
        origin[key] = src

    for key, tensor in state_dict.items():
        for rule in rules:
            match = rule._regex.fullmatch(key)
            if match is None:
                continue
            if rule.split:
                n = len(rule.split)
                if tensor.shape[0] % n:
                    bad_splits.append(f"{key} {tuple(tensor.shape)} into {n}")
                else:
                    for template, chunk in zip(rule.split, tensor.chunk(n, dim=0)):
                        put(rule.expand(match, template), chunk.clone(), key)
            elif rule.part is not None:
                i, n = rule.part
                target = rule.expand(match, rule.target)
                slot = parts.setdefault(target, {})
                if i in slot or part_counts.setdefault(target, n) != n:
                    collisions.append(f"{target} part {i}/{n} (again from {key})")
                slot[i] = tensor
            elif rule.target is not None:
                put(rule.expand(match, rule.target), tensor, key)
            break
        else:
            unmatched.append(key)

    incomplete = []
    for target, slot in parts.items():
        n = part_counts[target]
        if sorted(slot) != list(range(n)):
            incomplete.append(f"{target} has parts {sorted(slot)} of {n}")
            continue
        put(target, torch.cat([slot[i] for i in range(n)], dim=0), f"{n} parts")

    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} key(s) match no rule: {sorted(unmatched)}")
    if collisions:
        problems.append(f"{len(collisions)} target key(s) written twice: {collisions}")
    if bad_splits:
        problems.append(f"tensors that cannot be split evenly: {bad_splits}")
    if incomplete:
        problems.append(f"merged keys missing parts: {incomplete}")
    if problems:
        raise ConversionError(f"cannot convert {source}: " + "; ".join(problems))
    return out
