"""vocab.py: the compact vocabulary's spelling of ids the model never saw."""

from __future__ import annotations

import random

from rwkv_diffusion_rnn.vocab import TokenMap


def random_table(rng: random.Random, n: int) -> list[bytes]:
    """A World-like byte table: id 0 empty (end of text), every single letter a-h, then random 2-5 letter strings."""
    letters = b"abcdefgh"
    table = [b""] + [bytes([c]) for c in letters]
    while len(table) < n:
        table.append(bytes(rng.choice(letters) for _ in range(rng.randint(2, 5))))
    return table


def test_spell_keeps_seen_ids_and_spells_unseen_ones_longest_first():
    rng = random.Random()
    table = random_table(rng, 400)
    seen = sorted({0, *rng.sample(range(1, len(table)), 150)} - {ord("z")})
    # at least one letter unseen, so that some bytes cannot be spelled
    gone = rng.choice(b"abcdefgh")
    seen = [w for w in seen if bytes([gone]) not in table[w]]
    tm = TokenMap(seen + [-1])
    pieces = {table[w]: k for k, w in enumerate(tm.vocab_ids[:-1]) if w > 0}
    words = [rng.randrange(1, len(table)) for _ in range(300)]
    out = tm.spell(words, table)
    # walk the output back against the input, token by token
    pos = 0
    for w in words:
        if w in seen:
            assert out[pos] == seen.index(w)
            pos += 1
            continue
        b, i = table[w], 0
        while i < len(b):
            k = out[pos]
            pos += 1
            if k == tm.unk:  # a run of bytes no seen piece starts with: one unknown id
                assert all(b[i : i + n] not in pieces for n in range(1, len(b) - i + 1))
                while i < len(b) and all(b[i : i + n] not in pieces for n in range(1, len(b) - i + 1)):
                    i += 1
                continue
            piece = table[tm.vocab_ids[k]]
            assert b[i : i + len(piece)] == piece
            assert not any(b[i : i + n] in pieces for n in range(len(piece) + 1, len(b) - i + 1))  # longest first
            i += len(piece)
    assert pos == len(out)
    assert any(w not in seen for w in words) and len(out) > len(words)  # something was spelled


def test_spell_of_a_fully_seen_row_equals_to_model():
    import torch

    rng = random.Random()
    table = random_table(rng, 200)
    seen = sorted({0, *rng.sample(range(1, 200), 80)})
    tm = TokenMap(seen + [-1])
    row = [rng.choice(seen) for _ in range(50)]
    assert tm.spell(row, table) == tm.to_model(torch.tensor(row)).tolist()
