"""Running a rename table backwards: our state dict -> the source names a rule table reads.

The inverse of a table (:mod:`weights_convert.rules`) is derived from the table itself, never written as a
second list: every rule's pattern is expanded into the concrete source names it matches (numbers from a
finite range, each alternative of ``(a|b)``, an optional part left out and kept), each name is pushed
through the rule as :func:`~weights_convert.rules.apply_rules` would push it (the first rule that matches
wins), and the resulting name pairs are read backwards. A ``split`` rule (one packed source tensor -> q, k,
v) becomes a concatenation, a ``part`` rule (q, k, v -> one packed tensor of ours) a split; rules that drop
a key (``target=None``) give nothing back, their keys are the caller's to regenerate.

Where several source names lead to the same name of ours, the first in expansion order is written: the
first alternative of ``(a|b)`` and the optional part left out. Tables therefore list a name's canonical
spelling first (``hf_swin`` reads ``(?:self\\.query|q_proj)``: transformers 4.x file names, which
transformers 5 also writes).

Accounting is as strict as the forward direction: a key of ours that no rule produces, two keys of ours
written to the same source name, a packed tensor missing one of its parts, or a tensor that does not
split evenly raise one :class:`~weights_convert.rules.ConversionError` listing them all.

The patterns may use escaped literals, ``\\d``, digit classes (``[01]``, ``[1-9]``) with ``? * +``, groups
``(...)`` / ``(?:...)`` with ``|``, and ``?`` after a group or literal; anything else is refused with the
pattern named, so a table that cannot be inverted says so.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Mapping

import torch

from .rules import ConversionError, Rule

__all__ = ["expand_pattern", "invert_rules"]

_DIGIT_CLASS = re.compile(r"\[(?:\d|\d-\d)+\]")


class _Pattern:
    """A recursive-descent reader of the regex subset above, producing a tree of
    ("lit", char) / ("num", regex of a run of digit atoms) / ("opt", node) / ("seq", [node]) / ("alt", [node])."""

    def __init__(self, pattern: str) -> None:
        self.text, self.i = pattern, 0

    def fail(self, what: str) -> ConversionError:
        return ConversionError(f"cannot invert rule pattern {self.text!r}: {what} at position {self.i}")

    def parse(self) -> tuple:
        node = self.alternatives()
        if self.i != len(self.text):
            raise self.fail("unbalanced ')'")
        return node

    def alternatives(self) -> tuple:
        branches, seq = [], []
        while self.i < len(self.text) and self.text[self.i] != ")":
            if self.text[self.i] == "|":
                branches.append(self.sequence(seq))
                seq, self.i = [], self.i + 1
                continue
            atom = self.atom()
            if self.i < len(self.text) and self.text[self.i] in "?*+":
                quantifier = self.text[self.i]
                self.i += 1
                if atom[0] == "digit":
                    atom = ("digit", atom[1] + quantifier)
                elif quantifier == "?":
                    atom = ("opt", atom)
                else:
                    raise self.fail(f"'{quantifier}' after a non-digit atom")
            seq.append(atom)
        branches.append(self.sequence(seq))
        return branches[0] if len(branches) == 1 else ("alt", branches)

    @staticmethod
    def sequence(atoms: list[tuple]) -> tuple:
        """Merge each run of digit atoms into one number node (``[1-9]\\d*`` is one number)."""
        out: list[tuple] = []
        for atom in atoms:
            if atom[0] == "digit" and out and out[-1][0] == "num":
                out[-1] = ("num", out[-1][1] + atom[1])
            else:
                out.append(("num", atom[1]) if atom[0] == "digit" else atom)
        return ("seq", out)

    def atom(self) -> tuple:
        text, i = self.text, self.i
        char = text[i]
        if char == "\\":
            if i + 1 >= len(text):
                raise self.fail("trailing backslash")
            escaped = text[i + 1]
            self.i += 2
            if escaped == "d":
                return ("digit", r"\d")
            if escaped.isalnum():
                raise self.fail(f"unsupported escape \\{escaped}")
            return ("lit", escaped)
        if char == "(":
            if text.startswith("(?:", i):
                self.i += 3
            elif text.startswith("(?", i):
                raise self.fail("unsupported group syntax")
            else:
                self.i += 1
            inner = self.alternatives()
            if self.i >= len(text) or text[self.i] != ")":
                raise self.fail("unclosed group")
            self.i += 1
            return inner
        if char == "[":
            end = text.find("]", i)
            found = _DIGIT_CLASS.fullmatch(text, i, end + 1) if end > 0 else None
            if found is None:
                raise self.fail("only digit classes like [01] or [1-9] are supported")
            self.i = end + 1
            return ("digit", text[i: end + 1])
        if char in ".^$*+?{}|":
            raise self.fail(f"unsupported {char!r}")
        self.i += 1
        return ("lit", char)


def _expand(node: tuple, numbers: range) -> list[str]:
    kind = node[0]
    if kind == "lit":
        return [node[1]]
    if kind == "num":
        return [str(n) for n in numbers if re.fullmatch(node[1], str(n))]
    if kind == "opt":
        return ["", *_expand(node[1], numbers)]
    if kind == "alt":
        return [s for branch in node[1] for s in _expand(branch, numbers)]
    parts = [_expand(child, numbers) for child in node[1]]  # seq
    return ["".join(p) for p in itertools.product(*parts)]


def expand_pattern(pattern: str, numbers: range) -> list[str]:
    """Every string ``pattern`` fully matches with its numbers taken from ``numbers``, canonical spelling first."""
    return _expand(_Pattern(pattern).parse(), numbers)


def _sources(rules: list[Rule], wanted: set[str]) -> Iterator[tuple[str, str, str, int, int]]:
    """(our key, source key, kind, index, count) for every source name the rules map onto a key in ``wanted``;
    kind "rename" (index 0 of 1), "split" (source packs ours as chunk index of count), "part" (ours packs it)."""
    top = max([10] + [int(n) + 2 for key in wanted for n in re.findall(r"\d+", key)])
    numbers = range(top)
    for position, rule in enumerate(rules):
        if rule.target is None and not rule.split:
            continue  # dropped on purpose: none of our keys comes from it
        for source in expand_pattern(rule.pattern, numbers):
            match = rule._regex.fullmatch(source)
            if match is None:
                continue
            if rule.split:
                targets = [(rule.expand(match, t), "split", i, len(rule.split)) for i, t in enumerate(rule.split)]
            elif rule.part is not None:
                targets = [(rule.expand(match, rule.target), "part", *rule.part)]
            else:
                targets = [(rule.expand(match, rule.target), "rename", 0, 1)]
            if not any(t[0] in wanted for t in targets):
                continue
            if any(earlier._regex.fullmatch(source) for earlier in rules[:position]):
                continue  # the forward direction would route this name through an earlier rule
            for target, kind, index, count in targets:
                yield target, source, kind, index, count


def invert_rules(
    state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule], *, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """``state_dict`` (keys as ``rules`` produce them) renamed back to the names ``rules`` read; see the module
    docstring. ``apply_rules(invert_rules(s, rules), rules) == s`` for every key ``rules`` do not drop."""
    rules, wanted = list(rules), set(state_dict)
    plan: dict[str, tuple[str, str, int, int]] = {}  # our key -> (source, kind, index, count); "part": index -1
    part_sources: dict[str, dict[int, str]] = {}  # our packed key -> {chunk index: source}
    for target, src, kind, index, count in _sources(rules, wanted):
        if kind == "part":
            part_sources.setdefault(target, {}).setdefault(index, src)
            plan.setdefault(target, (src, kind, -1, count))
        else:
            plan.setdefault(target, (src, kind, index, count))

    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    merges: dict[str, dict[int, torch.Tensor]] = {}
    merge_counts: dict[str, int] = {}
    unmatched, collisions, bad_splits, incomplete = [], [], [], []

    def put(key: str, tensor: torch.Tensor, src: str) -> None:
        if key in out:
            collisions.append(f"{key} (from {origin[key]} and {src})")
        out[key], origin[key] = tensor, src

    for key, tensor in state_dict.items():
        if key not in plan:
            unmatched.append(key)
            continue
        src, kind, index, count = plan[key]
        if kind == "rename":
            put(src, tensor, key)
        elif kind == "split":  # several keys of ours are chunks of one source tensor
            merges.setdefault(src, {})[index] = tensor
            merge_counts[src] = count
        else:  # one key of ours packs several source tensors
            names = part_sources[key]
            if sorted(names) != list(range(count)):
                incomplete.append(f"{key}: source names only for parts {sorted(names)} of {count}")
            elif tensor.shape[0] % count:
                bad_splits.append(f"{key} {tuple(tensor.shape)} into {count}")
            else:
                for i, chunk in enumerate(tensor.chunk(count, dim=0)):
                    put(names[i], chunk.clone(), key)
    for src, slots in merges.items():
        if sorted(slots) != list(range(merge_counts[src])):
            incomplete.append(f"{src} needs {merge_counts[src]} parts, has {sorted(slots)}")
            continue
        put(src, torch.cat([slots[i] for i in range(merge_counts[src])], dim=0), f"{len(slots)} parts")

    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} key(s) no rule produces: {sorted(unmatched)}")
    if collisions:
        problems.append(f"{len(collisions)} source key(s) written twice: {collisions}")
    if bad_splits:
        problems.append(f"tensors that cannot be split evenly: {bad_splits}")
    if incomplete:
        problems.append(f"packed keys missing parts: {incomplete}")
    if problems:
        raise ConversionError(f"cannot write {source} back: " + "; ".join(problems))
    return out
