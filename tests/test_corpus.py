"""The embedded corpus: deterministic, distinct, short, grammatical by construction, slots that match the text."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from rwkv_diffusion_rnn import cli
from rwkv_diffusion_rnn.corpus import COLOURS, NUMBERS, generate, generate_records
from rwkv_diffusion_rnn.errors import DiffRwkvError

VOWEL_START = re.compile(r"^[aeiou]")


def test_deterministic_distinct_and_prefix_stable():
    a = generate(3000, seed=5)
    assert a == generate(3000, seed=5)
    assert len(set(a)) == 3000
    assert generate(100, seed=5) == a[:100]
    b = generate(3000, seed=6)
    assert len(set(a) & set(b)) < 600  # another seed gives mostly other sentences


def test_shape_of_sentences():
    for s in generate(4000, seed=1):
        words = s.split()
        assert 5 <= len(words) <= 20, s
        assert s[0].isupper() and s[-1] in ".?", s
        assert "  " not in s and not re.search(r"\s[.?,]", s), s


def test_articles_agree_with_the_next_word():
    for s in generate(4000, seed=2):
        words = s.lower().replace(",", "").rstrip(".?").split()
        for art, nxt in zip(words, words[1:], strict=False):
            if art == "a":
                assert not VOWEL_START.match(nxt), s
            if art == "an":
                assert VOWEL_START.match(nxt), s


def test_subject_verb_agreement():
    for rec in generate_records(3000, seed=3):
        words = rec.text.rstrip(".?").split()
        if rec.slots["pattern"] in ("transitive", "intransitive") and rec.slots["tense"] == "progressive":
            aux = "are" if "subject_number" in rec.slots else "is"
            assert f" {aux} " in rec.text, rec.text
        if rec.slots["pattern"] == "question":
            assert words[0] == ("Are" if "subject_number" in rec.slots else "Is"), rec.text


def test_slots_appear_in_the_text_and_vocabulary_is_small_but_varied():
    recs = generate_records(4000, seed=4)
    for rec in recs:
        text = rec.text.lower()
        for key in ("place", "time", "colour", "subject_number", "object_number"):
            if rec.slots.get(key):
                assert rec.slots[key].lower() in text, (key, rec)
    vocab = Counter(w.strip(".,?").lower() for r in recs for w in r.text.split())
    assert 200 <= len(vocab) <= 600
    assert {c for c in COLOURS if vocab[c] > 20} == set(COLOURS)
    assert {n for n in NUMBERS if vocab[n] > 20} == set(NUMBERS)
    patterns = Counter(r.slots["pattern"] for r in recs)
    assert len(patterns) == 5 and min(patterns.values()) > 150


def test_running_out_of_distinct_sentences_is_an_error(monkeypatch):
    import rwkv_diffusion_rnn.corpus as corpus

    draws = iter(["One two three four five.", "Six seven eight nine ten."] * 20_000)
    monkeypatch.setattr(corpus, "_one", lambda b: corpus.Sentence(next(draws)))
    with pytest.raises(DiffRwkvError, match="only 2 distinct sentences found; expected 3"):
        generate_records(3, seed=0)


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_make_corpus_cli(tmp_path, fmt):
    out = tmp_path / f"c.{fmt}"
    assert cli.main(["make-corpus", "--n", "50", "--seed", "9", "--format", fmt, "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 50
    if fmt == "txt":
        assert lines == generate(50, seed=9)
    else:
        assert '"slots"' in lines[0] and generate(1, seed=9)[0] in lines[0]
