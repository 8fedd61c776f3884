"""A compact vocabulary for backbones trained from scratch (``model.vocab: data``).

A new model trained on a small corpus uses a few hundred or thousand of the World vocabulary's 65,536 tokens; the
embedding, the text head and their optimizer state would still cost 65,536 rows. With ``model.vocab: data`` the
model's vocabulary is the sorted set of token ids that occur in the training data, plus end-of-text (0, which stays
compact id 0) and one unknown id (last) for tokens never seen in training. ``<mask>`` is the compact vocabulary size,
as for the full vocabulary.

The data pipeline keeps World ids on disk; the trainer maps batches with :class:`TokenMap`, and a checkpoint stores
the id list, so :class:`CompactTokenizer` (``encode`` -> compact ids, ``decode`` compact ids -> text) lets samplers and
evaluation work in the model's ids without knowing about the mapping.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError


class TokenMap:
    """World ids <-> compact ids. ``vocab_ids[k]`` is the World id of compact id k; the last entry is the unknown id
    (World id -1, decoded as U+FFFD)."""

    def __init__(self, vocab_ids: Sequence[int]) -> None:
        ids = [int(i) for i in vocab_ids]
        if not ids or ids[0] != 0 or ids[-1] != -1 or sorted(ids[:-1]) != ids[:-1] or len(set(ids)) != len(ids):
            raise DiffRwkvError(
                "vocab_ids must start with 0 (end of text), be sorted and unique, and end with -1 (unknown)"
            )
        self.vocab_ids = ids
        self.size = len(ids)
        self.unk = self.size - 1
        top = max(ids[:-1]) + 1
        table = np.full(max(top, 65537), self.unk, dtype=np.int64)
        table[np.array(ids[:-1])] = np.arange(self.size - 1)
        self._to_model = torch.from_numpy(table)
        self._to_world = torch.tensor(ids, dtype=torch.long)
        self._pieces: tuple[Sequence[bytes], dict[bytes, int], int] | None = (
            None  # spell(): (table, bytes->id, longest)
        )

    @classmethod
    def from_token_arrays(cls, arrays: Iterable[np.ndarray]) -> TokenMap:
        seen: set[int] = {0}
        for a in arrays:
            seen.update(np.unique(np.asarray(a)).tolist())
        return cls(sorted(seen) + [-1])

    def to_model(self, ids: torch.Tensor) -> torch.Tensor:
        """World ids (any shape) -> compact ids; ids outside the table become the unknown id."""
        table = self._to_model.to(ids.device)
        return table[ids.clamp(0, table.numel() - 1)].masked_fill(ids >= table.numel(), self.unk)

    def to_world(self, ids: torch.Tensor) -> torch.Tensor:
        return self._to_world.to(ids.device)[ids]

    def spell(self, world_ids: Iterable[int], token_bytes: Sequence[bytes]) -> list[int]:
        """World ids -> compact ids, each id the model never saw spelled with ids it did see instead of collapsing
        to the unknown id: its bytes (``token_bytes[id]``, the World tokenizer's table) split greedily, longest
        seen token first. A byte no seen token starts with becomes the unknown id (one per run of such bytes).

        Why: a model trained from scratch on captions has one unknown id for every other word, so "Obama visited
        France" and "Putin toured China" read alike to it; spelled, different unseen words stay different and a
        repeated one repeats (``bench/captions_run.py --t2l-spell-unseen`` measures it on STS-B). Seen ids map as
        :meth:`to_model` maps them."""
        if self._pieces is None or self._pieces[0] is not token_bytes:  # built once per byte table
            pieces = {}
            for k, w in enumerate(self.vocab_ids[:-1]):
                b = token_bytes[w] if 0 < w < len(token_bytes) else b""
                if b:
                    pieces[b] = k
            self._pieces = (token_bytes, pieces, max(map(len, pieces), default=0))
        _, pieces, longest = self._pieces
        table, out = self._to_model, []
        for w in world_ids:
            w = int(w)
            k = int(table[w]) if 0 <= w < table.numel() else self.unk
            if k != self.unk or not 0 < w < len(token_bytes):
                out.append(k)
                continue
            b, i, gap = token_bytes[w], 0, False
            while i < len(b):
                for n in range(min(longest, len(b) - i), 0, -1):
                    k = pieces.get(b[i : i + n])
                    if k is not None:
                        out.append(k)
                        i, gap = i + n, False
                        break
                else:
                    if not gap:
                        out.append(self.unk)
                    i, gap = i + 1, True
        return out


class CompactTokenizer:
    """The base tokenizer seen through a :class:`TokenMap`: same interface, compact ids."""

    def __init__(self, base, token_map: TokenMap) -> None:
        self.base, self.map = base, token_map
        self.name = f"{getattr(base, 'name', 'tokenizer')}+compact{token_map.size}"
        self.vocab_size = token_map.size
        self.eot_id = self.pad_id = 0
        self.mask_id = token_map.size

    def encode(self, text: str) -> list[int]:
        return self.map.to_model(torch.tensor(self.base.encode(text), dtype=torch.long)).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [
            self.map.to_model(torch.tensor(ids, dtype=torch.long)).tolist() for ids in self.base.encode_batch(texts)
        ]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.mask_id:
                out.append(self.base.mask_id)
            elif i == self.map.unk:
                out.append(None)
            else:
                out.append(self.map.vocab_ids[i])
        text, run = [], []
        for w in out:  # unknown ids render as U+FFFD between the decoded runs
            if w is None:
                text.append(self.base.decode(run, skip_special_tokens) + "\ufffd")
                run = []
            else:
                run.append(w)
        text.append(self.base.decode(run, skip_special_tokens))
        return "".join(text)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]
