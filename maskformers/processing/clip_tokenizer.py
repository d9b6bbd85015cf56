"""CLIP byte-level BPE tokenizer: text -> (B, 77) int64 token ids, as OneFormer's processor feeds its model.

Reads a checkpoint folder's ``vocab.json`` (token -> id) and ``merges.txt`` (BPE merges, best first) and
returns the ids of transformers' ``CLIPTokenizer`` (the `tokenizers`-backed one: the only CLIP tokenizer in
transformers 5, and the default "fast" one of transformers 4). Its text pipeline, step by step:

1. the special tokens ``<|startoftext|>`` and ``<|endoftext|>`` are found in the raw text (case-sensitive,
   anywhere, even inside a word) and become their ids; the text between them goes through 2-5 on its own;
2. Unicode NFC, every run of whitespace becomes one space, then lowercase character by character (so a
   final capital sigma becomes "σ", not the "ς" of ``str.lower``); no ftfy and no HTML unescaping (those
   belong to the original OpenAI/open_clip tokenizer and transformers 4's slow ``CLIPTokenizer`` only);
3. split into words: the contractions ``'s 't 're 've 'm 'll 'd``, runs of letters (Unicode category L*),
   single digits (category N*), runs of other non-space characters; spaces are dropped;
4. each word as UTF-8 bytes, each byte as one printable character (GPT-2's byte-to-unicode table), the last
   one marked end-of-word (``</w>``);
5. byte-pair merging: the adjacent pair with the best (lowest) merge rank is joined, all its occurrences
   left to right, until no pair has a rank; the symbols are looked up in the vocabulary.

"Whitespace" is that of transformers' regex engine: Python's ``str.isspace`` less U+001C..U+001F (which
become separate symbol tokens). A batch becomes ``[<|startoftext|>, ids[:75], <|endoftext|>, 0, ...]`` of
length 77: truncated, and padded with 0 (OneFormer's processor multiplies the ids by the attention mask, so
its padding is 0, not the pad token's id).

Characters are classified and normalized with Python's ``unicodedata`` (Unicode 14.0 on Python 3.11), the
`tokenizers` library with its own, newer tables. Checked over every assigned code point (in runs of 8 and
alone, 317,509 strings): the only differences are 10 NFC reorderings of runs of rare combining marks whose
combining classes changed in later Unicode versions.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["CLIPTokenizer", "bytes_to_unicode", "find_clip_tokenizer"]

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, in the regex's order
_NOT_SPACE = frozenset(chr(c) for c in range(0x1C, 0x20))  # isspace() in Python, not whitespace in transformers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table byte -> printable character: printable Latin-1 bytes map to themselves, the other 68
    bytes to U+0100 onwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _is_space(char: str) -> bool:
    return char.isspace() and char not in _NOT_SPACE


def _kind(char: str) -> str:
    """'s' space, 'l' letter, 'n' number, 'o' other."""
    if _is_space(char):
        return "s"
    category = unicodedata.category(char)
    return "l" if category[0] == "L" else "n" if category[0] == "N" else "o"


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for char in text:
        if _is_space(char):
            if not in_space:
                out.append(" ")
            in_space = True
            continue
        in_space = False
        out.append(char.lower())  # one character at a time: no context-dependent final sigma
    return "".join(out)


def _words(text: str) -> list[str]:
    """Step 3 on normalized text (leftmost-first, like the regex it replaces)."""
    words, i, n = [], 0, len(text)
    while i < n:
        char = text[i]
        if char == "'":
            rest = next((c for c in _CONTRACTIONS if text.startswith(c, i + 1)), None)
            if rest is not None:
                words.append(text[i : i + 1 + len(rest)])
                i += 1 + len(rest)
                continue
        kind = _kind(char)
        if kind == "s":
            i += 1
            continue
        if kind == "n":
            words.append(char)
            i += 1
            continue
        j = i + 1
        while j < n and _kind(text[j]) == kind:  # a run of letters, or of "other" characters
            j += 1
        words.append(text[i:j])
        i = j
    return words


class CLIPTokenizer:
    """CLIP BPE tokenizer from a vocabulary and merge list (see the module docstring for the rules).

    ``tokenizer(texts)`` -> (B, context_length) int64 ids; ``tokenizer.encode(text)`` -> the ids of one text
    without start/end tokens and without truncation.
    """

    def __init__(
        self, *, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], context_length: int = 77
    ) -> None:
        missing = [t for t in (START_TOKEN, END_TOKEN) if t not in vocab]
        if missing:
            raise ValueError(f"vocab has no {missing}: not a CLIP vocabulary")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        self.vocab = dict(vocab)
        self.byte_chars = bytes_to_unicode()
        absent = [c for c in self.byte_chars.values() if c not in self.vocab]
        if absent:
            raise ValueError(f"vocab lacks {len(absent)} byte symbols (e.g. {absent[:3]}): not a byte-level vocabulary")
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.start_id, self.end_id = self.vocab[START_TOKEN], self.vocab[END_TOKEN]
        self.context_length = context_length
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike, **kwargs) -> "CLIPTokenizer":
        """From ``vocab.json`` and ``merges.txt`` (a ``#version`` header line is skipped)."""
        with open(vocab_file, encoding="utf-8") as f:
            try:
                vocab = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"could not parse {os.fspath(vocab_file)!r} as JSON: {error}") from error
        merges = []
        with open(merges_file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line or (number == 1 and line.startswith("#version")):
                    continue
                pair = line.split(" ")
                if len(pair) != 2:
                    raise ValueError(f"{os.fspath(merges_file)!r} line {number}: expected two symbols, got {line!r}")
                merges.append((pair[0], pair[1]))
        return cls(vocab=vocab, merges=merges, **kwargs)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike, **kwargs) -> "CLIPTokenizer":
        """From the BPE model inside a `tokenizers` ``tokenizer.json`` (what transformers 5 saves)."""
        with open(path, encoding="utf-8") as f:
            model = json.load(f).get("model", {})
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
            raise ValueError(f"{os.fspath(path)!r} does not hold a CLIP BPE model (type BPE, end_of_word_suffix </w>)")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return cls(vocab=model["vocab"], merges=merges, **kwargs)

    @classmethod
    def from_bpe_file(cls, path: str | os.PathLike, **kwargs) -> "CLIPTokenizer":
        """From the merge list CLIP was released with (``bpe_simple_vocab_16e6.txt.gz``, shipped by OpenAI's
        CLIP, open_clip and the original OneFormer; gzipped or plain). The vocabulary is built as they build it
        (and as transformers' conversion laid out ``vocab.json``): the 256 byte symbols, the same with
        ``</w>``, one token per merge of the first 48,894, then ``<|startoftext|>`` and ``<|endoftext|>``."""
        import gzip

        opener = gzip.open if os.fspath(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        bad = [i + 2 for i, pair in enumerate(merges) if len(pair) != 2]
        if bad or len(merges) != 49152 - 256 - 2:
            raise ValueError(f"{os.fspath(path)!r} is not CLIP's BPE merge list (expected 48894 merges after a header "
                             f"line; got {len(merges)}, malformed lines {bad[:5]})")
        symbols = sorted(bytes_to_unicode().values())  # CLIP's order: the printable bytes, then the remapped ones
        tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(pair) for pair in merges)]
        vocab = {token: i for i, token in enumerate([*tokens, START_TOKEN, END_TOKEN])}
        return cls(vocab=vocab, merges=merges, **kwargs)

    def files(self) -> dict[str, bytes]:
        """``vocab.json`` and ``merges.txt`` of this tokenizer (what :meth:`from_pretrained` reads back)."""
        merges = [pair for pair, _ in sorted(self.ranks.items(), key=lambda item: item[1])]
        return {"vocab.json": json.dumps(self.vocab, ensure_ascii=False).encode("utf-8"),
                "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8")}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs) -> "CLIPTokenizer":
        """From a checkpoint folder holding ``vocab.json`` and ``merges.txt`` (the hub checkpoints), or else
        ``tokenizer.json`` (a transformers 5 ``save_pretrained`` folder)."""
        paths = [os.path.join(folder, name) for name in ("vocab.json", "merges.txt")]
        if all(os.path.isfile(p) for p in paths):
            return cls.from_files(*paths, **kwargs)
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return cls.from_tokenizer_json(os.path.join(folder, "tokenizer.json"), **kwargs)
        raise FileNotFoundError(f"CLIP tokenizer files not found in {os.fspath(folder)!r}: vocab.json + merges.txt "
                                "or tokenizer.json")

    # ------------------------------------------------------------------ encoding
    def _bpe(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = [self.byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        while len(symbols) > 1:
            ranked = [(self.ranks.get(pair, -1), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
            ranked = [r for r in ranked if r[0] >= 0]
            if not ranked:
                break
            best = symbols[min(ranked)[1]], symbols[min(ranked)[1] + 1]
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        unknown = [s for s in symbols if s not in self.vocab]
        if unknown:  # a merge whose result is not in the vocabulary: inconsistent files
            raise ValueError(f"BPE symbols {unknown} of {word!r} are not in the vocabulary")
        ids = [self.vocab[s] for s in symbols]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start/end tokens and untruncated."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        start = 0
        while start <= len(text):
            # the next special token in the raw text, if any
            found = [(i, t) for t in (START_TOKEN, END_TOKEN) if (i := text.find(t, start)) >= 0]
            end, special = min(found) if found else (len(text), None)
            for word in _words(_normalize(text[start:end])):
                ids.extend(self._bpe(word))
            if special is None:
                break
            ids.append(self.vocab[special])
            start = end + len(special)
        return ids

    def __call__(self, texts: str | Sequence[str], *, context_length: int | None = None) -> torch.Tensor:
        """One text or a list -> (B, context_length) int64: start, ids (truncated), end, then 0s."""
        length = self.context_length if context_length is None else context_length
        if length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {length}")
        batch = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros((len(batch), length), dtype=torch.int64)
        for row, text in enumerate(batch):
            ids = [self.start_id, *self.encode(text)[: length - 2], self.end_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={len(self.vocab)}, merges={len(self.ranks)}, "
                f"context_length={self.context_length})")


def find_clip_tokenizer(spec: Any = None, *, model: Any = None) -> CLIPTokenizer | None:
    """A OneFormer's CLIP tokenizer. ``spec``: a :class:`CLIPTokenizer`, a folder (``vocab.json`` + ``merges.txt``,
    or ``tokenizer.json``) or CLIP's BPE merge list (``bpe_simple_vocab_16e6.txt.gz``); anything else is a
    ValueError. Without ``spec``: the tokenizer files ``model`` brought from its checkpoint folder
    (``model.extra_files``, also set by fine-tuning), else None."""
    import tempfile

    if isinstance(spec, CLIPTokenizer):
        return spec
    if spec is not None:
        if os.path.isdir(spec):
            return CLIPTokenizer.from_pretrained(spec)
        if os.path.isfile(spec):
            return CLIPTokenizer.from_bpe_file(spec)
        raise ValueError(f"tokenizer {os.fspath(spec)!r} is neither a CLIPTokenizer, a folder nor a BPE merge file")
    files = getattr(model, "extra_files", None) or {}
    names = [name for name in ("vocab.json", "merges.txt", "tokenizer.json") if name in files]
    if not ({"vocab.json", "merges.txt"} <= set(names) or "tokenizer.json" in names):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(files[name])
        return CLIPTokenizer.from_pretrained(tmp)
