"""CLIPTokenizer: the exact ids of transformers' CLIPTokenizer on the real CLIP vocabulary.

The vocabulary is built from open_clip's packaged BPE merges (tests/oneformer_helpers.py). The strings:
every ADE20K, COCO-panoptic and Cityscapes class name in OneFormer's prompt template and alone, the task
prompts and placeholder texts, punctuation, digits, accents, other scripts, emoji, whitespace variants,
special tokens inside text, empty and over-long strings, and seeded random Unicode strings. Ids are
compared exactly, both as OneFormer's processor pads them (B, 77) and untruncated.
"""

from __future__ import annotations

import json
import random
import unicodedata

import pytest
import torch

from maskformers.processing import CLIPTokenizer
from oneformer_helpers import DATASETS, class_info, write_clip_vocab

transformers = pytest.importorskip("transformers")
pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    return write_clip_vocab(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def reference(vocab_dir):
    return transformers.CLIPTokenizer.from_pretrained(vocab_dir)


@pytest.fixture(scope="module")
def ours(vocab_dir):
    return CLIPTokenizer.from_pretrained(vocab_dir)


def _class_prompts() -> list[str]:
    texts = []
    for dataset in DATASETS:
        for info in class_info(dataset).values():
            name = info["name"]
            texts += [f"a photo with a {name}", name, name.upper(), f"A Photo With A {name.title()}"]
    return texts


TASK_TEXTS = [f"the task is {task}" for task in ("semantic", "instance", "panoptic")] + [
    "a semantic photo", "an instance photo", "an panoptic photo", "a panoptic photo",
]
PUNCTUATION = [
    "hello, world!", "what?!", "...", "a.b.c", "(parenthesised)", "[brackets] {braces} <angles>", "a--b", "x_y_z",
    "e-mail@example.com", "https://example.com/a?b=c&d=e#f", "#hashtag @mention $5 %20 ^_^ *star* ~tilde~",
    "semi;colon: quote\"double\" 'single'", "back\\slash/forward", "it's", "IT'S", "we're they've I'm you'll he'd",
    "don't can't won't", "'s 't 're", "''s", "!'s", "rock'n'roll", "o'clock", "a'b", "`backtick`", "|pipe|",
    "2+2=4", "50% off", "3.14159", "1,000,000", "007", "1st 2nd 3rd 4th", "10x", "x10", "v2.0.1", "A4 B5",
    "12:30pm", "2023-01-01", "-1", "+1", "0", "9876543210", "½ ¼ ¾", "²³ superscripts", "Ⅻ roman", "٣ arabic digit",
]
UNICODE = [
    "café", "naïve", "résumé", "Crème Brûlée", "São Paulo", "Zürich", "Ångström", "øre", "Łódź", "Dvořák",
    "cafe\u0301", "e\u0301\u0301", "A\u030a", "ΣΑΣ", "ΟΔΥΣΣΕΥΣ", "σοφός", "İstanbul", "ıi", "Straße", "STRASSE",
    "ẞ", "ǅ dz", "ﬁ ligature", "Ｆｕｌｌｗｉｄｔｈ １２３", "Москва", "привет мир", "日本語のテキスト", "東京タワー",
    "中文字符", "한국어", "\u1112\u1161\u11ab", "עברית", "العربية", "हिन्दी", "ภาษาไทย", "ქართული", "Ελληνικά",
    "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷🇩🇪", "❤️", "a😀b", "★☆♠♣", "→←↑↓", "∑∫∂√∞", "©®™", "€£¥₹", "§¶†‡",
    "tab\tseparated", "new\nline", "cr\r\nlf", "  leading and trailing  ", "multiple     spaces",
    "nbsp\u00a0here", "ideographic\u3000space", "line\u2028separator", "para\u2029graph", "nel\u0085char",
    "unit\x1fsep", "group\x1dsep", "record\x1esep", "file\x1csep", "zero\u200bwidth", "joiner\u200djoin",
    "soft\u00adhyphen", "bom\ufeffmark", "control\x00null", "bell\x07", "rtl \u202eoverride", "’curly’ “quotes”",
    "a <|endoftext|> b", "<|startoftext|>x", "x<|startoftext|>y<|endoftext|>", "<|ENDOFTEXT|>", "<|endoftext",
    "<|startoftext|><|endoftext|>", "!<|endoftext|>", "<|endoftext|>'s",
]
EDGE = ["", " ", "\t\n ", "a", "A", "'", "a" * 300, "pneumonoultramicroscopicsilicovolcanoconiosis" * 5]


def _long_texts(reference) -> list[str]:
    """Over-long texts, and texts of exactly 74-77 content tokens around the truncation point."""
    words = "the quick brown fox jumps over the lazy dog".split()
    texts = [" ".join(words * 20), "word " * 200, "1" * 100, "; ".join(_class_prompts()[:60])]
    for n in (74, 75, 76, 77):
        texts.append(" ".join(["cat"] * n))
        assert len(reference(texts[-1], add_special_tokens=False)["input_ids"]) == n
    return texts


def _random_texts(count: int = 400) -> list[str]:
    """Seeded random strings over many scripts and symbol blocks (assigned characters only)."""
    ranges = [
        (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF),
        (0x900, 0x97F), (0xE00, 0xE7F), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x20A0, 0x20CF), (0x2100, 0x22FF),
        (0x2460, 0x24FF), (0x3000, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xFF00, 0xFFEF), (0x1F300, 0x1F6FF),
    ]
    pool = [chr(c) for lo, hi in ranges for c in range(lo, hi + 1) if unicodedata.category(chr(c)) != "Cn"]
    rng = random.Random(0)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 24))) for _ in range(count)]


def _processor_ids(reference, texts) -> torch.Tensor:
    """What transformers' OneFormerProcessor._preprocess_text computes: padded ids times the attention mask."""
    tokens = reference(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return tokens["input_ids"] * tokens["attention_mask"]


def test_more_than_a_thousand_strings_match_transformers(reference, ours):
    texts = _class_prompts() + TASK_TEXTS + PUNCTUATION + UNICODE + EDGE + _long_texts(reference) + _random_texts()
    assert len(texts) > 1000 and len(set(texts)) > 1000
    expected = _processor_ids(reference, texts)
    got = ours(texts)
    assert got.dtype == torch.int64 and got.shape == (len(texts), 77)
    mismatched = [t for t, g, e in zip(texts, got, expected) if not torch.equal(g, e)]
    assert not mismatched, f"{len(mismatched)} strings differ, e.g. {mismatched[:5]}"
    untruncated = reference(texts, add_special_tokens=False)["input_ids"]
    assert [ours.encode(t) for t in texts] == untruncated
    assert max(map(len, untruncated)) > 200  # the over-long strings really are


def test_layout_of_a_row(ours):
    row = ours("the task is semantic")[0]
    assert row[:7].tolist() == [49406, 518, 10549, 533, 29119, 1550, 49407]  # known CLIP ids
    assert (row[7:] == 0).all()
    assert ours("")[0, :3].tolist() == [49406, 49407, 0]
    long = ours("cat " * 100)[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long[1:-1] != 0).all()
    assert ours(["a", "b"], context_length=5).shape == (2, 5)
    assert ours(["cat cat cat cat"], context_length=4)[0].tolist() == [49406, 2368, 2368, 49407]


def test_bad_inputs(tmp_path, vocab_dir, ours):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="text must be a str"):
        ours([b"bytes"])
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        ours("a", context_length=1)
    with pytest.raises(ValueError, match=r"vocab has no \['<\|startoftext\|>'"):
        CLIPTokenizer(vocab={"<|endoftext|>": 0}, merges=[])
    with pytest.raises(ValueError, match="byte symbols"):
        CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="could not parse"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text((vocab_dir / "vocab.json").read_text())
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="line 2: expected two symbols"):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_from_bpe_file_builds_the_released_vocabulary(vocab_dir, ours, tmp_path):
    """CLIP's released merge list (open_clip's copy) -> the vocab.json + merges.txt of the hub checkpoints,
    byte for byte once written back by ``files()``; a file that is not that list is refused."""
    from oneformer_helpers import clip_bpe_file

    built = CLIPTokenizer.from_bpe_file(clip_bpe_file())
    assert list(built.vocab.items()) == list(ours.vocab.items()) and built.ranks == ours.ranks
    files = built.files()
    assert files["merges.txt"] == (vocab_dir / "merges.txt").read_bytes()
    assert json.loads(files["vocab.json"]) == json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    text = "the task is panoptic, a photo with a Café 42"
    assert torch.equal(built([text]), ours([text]))
    short = tmp_path / "short.txt"
    short.write_text("#version\na b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not CLIP's BPE merge list"):
        CLIPTokenizer.from_bpe_file(short)


def test_find_clip_tokenizer_takes_each_source_and_names_a_bad_one(vocab_dir, ours, tmp_path):
    from types import SimpleNamespace

    from maskformers.processing.clip_tokenizer import find_clip_tokenizer
    from oneformer_helpers import clip_bpe_file

    assert find_clip_tokenizer(ours) is ours
    sentence = "a photo with a traffic light"
    for spec in (vocab_dir, clip_bpe_file()):  # a folder, CLIP's merge list
        assert torch.equal(find_clip_tokenizer(spec)(sentence), ours(sentence))
    carried = SimpleNamespace(extra_files=ours.files())  # a model loaded from a folder, or fine-tuned
    assert torch.equal(find_clip_tokenizer(model=carried)(sentence), ours(sentence))
    assert find_clip_tokenizer(model=SimpleNamespace(extra_files={"vocab.json": b"{}"})) is None
    assert find_clip_tokenizer(model=object()) is None
    with pytest.raises(ValueError, match="'.*missing' is neither a CLIPTokenizer, a folder nor a BPE merge file"):
        find_clip_tokenizer(tmp_path / "missing")
