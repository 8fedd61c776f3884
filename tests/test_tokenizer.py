"""The World tokenizer against BlinkDL's own tokenizer in the rwkv package."""

from __future__ import annotations

import os
import random

import pytest

from rwkv_diffusion_rnn import MASK_ID, load_tokenizer
from rwkv_diffusion_rnn.errors import DiffRwkvError
from tests.conftest import real_text_lines

MULTILINGUAL = [
    "Hello, world!",
    "Ünïcödé façade — naïve café",
    "日本語のテキストと中文混合",
    "Привет, мир! Здравствуйте.",
    "مرحبا بالعالم",
    "emoji 🐶🐱‍👤👍🏽 and flags 🇫🇷",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "code: def f(x):\n    return x ** 2  # ok",
    "",
]


@pytest.fixture(scope="module")
def oracle():
    rwkv = pytest.importorskip("rwkv")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


def _random_unicode(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0xA0, 0x24F), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_ids_equal_rwkv_package_multilingual(oracle):
    tok = load_tokenizer("BlinkDL/rwkv7-g1")
    rng = random.Random()
    texts = MULTILINGUAL + [_random_unicode(rng, rng.randint(1, 60)) for _ in range(200)]
    for s in texts:
        assert tok.encode(s) == oracle.encode(s), s
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode_batch(texts) == [oracle.encode(s) for s in texts]


def test_ids_equal_rwkv_package_on_all_val_captions(oracle):
    lines = real_text_lines()
    tok = load_tokenizer("rwkv-world")
    ours = tok.encode_batch(lines)
    for s, ids in zip(lines, ours, strict=True):
        assert ids == oracle.encode(s), s
    assert tok.decode_batch(ours) == lines


def test_special_ids():
    tok = load_tokenizer("rwkv-world")
    ids = tok.encode("a dog")
    assert tok.eot_id == tok.pad_id == 0 and tok.mask_id == MASK_ID == 65536
    assert tok.decode([0, *ids, MASK_ID], skip_special_tokens=True) == "a dog"
    assert tok.decode([*ids, 0]) == "a dog<|endoftext|>"
    assert tok.decode([*ids, MASK_ID]) == "a dog<mask>"
    with pytest.raises(DiffRwkvError, match="token id 70000"):
        tok.decode([70000])


def test_partial_utf8_decodes_with_replacement():
    tok = load_tokenizer("rwkv-world")
    ids = tok.encode("🐶")
    assert len(ids) > 1  # the emoji spans byte tokens
    assert tok.decode(ids[:1]) == "\ufffd"


def test_unknown_tokenizer_is_one_line_error(tmp_path):
    with pytest.raises(DiffRwkvError) as e:
        load_tokenizer("no-such-org/no-such-tokenizer", local_files_only=True, cache_dir=str(tmp_path))
    assert "no-such-org/no-such-tokenizer" in str(e.value) and "\n" not in str(e.value)
