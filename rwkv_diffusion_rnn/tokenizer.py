"""Tokenizers: the RWKV World vocabulary offline, anything else through transformers.

The RWKV-7 "g1" models use BlinkDL's World vocabulary (``rwkv_vocab_v20230424``): 65,529 byte strings matched
greedily, longest first. We encode with the Rust implementation in the ``pyrwkv-tokenizer`` package (its ids are
checked against BlinkDL's own ``rwkv`` package in ``tests/test_tokenizer.py``) and decode ourselves from the same
vocabulary file, because a token may hold part of a UTF-8 character and the Rust decoder panics on those.

Special ids (documented contract, used by every other module):

* ``0``     end of text; also the padding id (padding is always paired with an ``attention_mask``).
* ``65536`` ``<mask>``, the absorbing state of masked diffusion. It is one past the World vocabulary, so the
  denoiser adds one embedding row for it.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from rwkv_diffusion_rnn.errors import DiffRwkvError

EOT_ID = 0
PAD_ID = 0
MASK_ID = 65536
WORLD_VOCAB_SIZE = 65536  # embedding rows of a g1 checkpoint: ids 0..65535 (0 = end of text)

#: Names that resolve to the World vocabulary (lower-cased comparison).
WORLD_ALIASES = frozenset({"rwkv-world", "rwkv_world", "world", "rwkv_vocab_v20230424", "blinkdl/rwkv7-g1"})


def _world_vocab_path() -> str:
    try:
        import pyrwkv_tokenizer
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise DiffRwkvError(
            "the RWKV World tokenizer needs the package 'pyrwkv-tokenizer' (pip install pyrwkv-tokenizer)"
        ) from exc
    return str(Path(pyrwkv_tokenizer.__file__).with_name("rwkv_vocab_v20230424.txt"))


@lru_cache(maxsize=4)
def _read_vocab(path: str) -> tuple[bytes, ...]:
    """Return the byte string of every id (index = id; id 0 and unused ids map to b"")."""
    entries: dict[int, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            try:
                idx = int(line[: line.index(" ")])
                lit = ast.literal_eval(line[line.index(" ") : line.rindex(" ")])
                length = int(line[line.rindex(" ") :])
            except (ValueError, SyntaxError) as exc:
                raise DiffRwkvError(f"{path}:{lineno}: expected '<id> <python literal> <byte length>'") from exc
            tok = lit.encode("utf-8") if isinstance(lit, str) else lit
            if len(tok) != length:
                raise DiffRwkvError(f"{path}:{lineno}: token has {len(tok)} bytes, the line says {length}")
            entries[idx] = tok
    table = [b""] * (max(entries) + 1)
    for idx, tok in entries.items():
        table[idx] = tok
    return tuple(table)


class RWKVWorldTokenizer:
    """BlinkDL's World tokenizer: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, batched variants.

    ``decode`` drops the special ids (end of text / pad = 0, ``<mask>`` = 65536) when ``skip_special_tokens`` is
    true; otherwise it renders them as ``<|endoftext|>`` and ``<mask>``. Byte sequences that are not valid UTF-8 (a
    generation cut inside a character) decode with U+FFFD replacement characters instead of failing.
    """

    eot_id = EOT_ID
    pad_id = PAD_ID
    mask_id = MASK_ID
    vocab_size = WORLD_VOCAB_SIZE
    name = "rwkv-world"

    def __init__(self, vocab_file: str | os.PathLike | None = None) -> None:
        import pyrwkv_tokenizer

        self.vocab_file = str(vocab_file) if vocab_file is not None else _world_vocab_path()
        if not os.path.isfile(self.vocab_file):
            raise DiffRwkvError(f"{self.vocab_file}: vocabulary file not found")
        self._bytes = _read_vocab(self.vocab_file)
        self._rust = pyrwkv_tokenizer.WorldTokenizer(self.vocab_file)

    @property
    def token_bytes(self) -> tuple[bytes, ...]:
        """The byte string of every id (index = id; id 0 and unused ids: b"")."""
        return self._bytes

    def encode(self, text: str) -> list[int]:
        return list(self._rust.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many strings at once (the Rust side runs them in parallel)."""
        return [list(ids) for ids in self._rust.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        table = self._bytes
        out = []
        for i in ids:
            i = int(i)
            if i == EOT_ID or i == MASK_ID:
                if not skip_special_tokens:
                    out.append(b"<|endoftext|>" if i == EOT_ID else b"<mask>")
            elif 0 < i < len(table):
                out.append(table[i])
            else:
                raise DiffRwkvError(
                    f"token id {i} is outside the World vocabulary (0..{len(table) - 1}, mask {MASK_ID})"
                )
        return b"".join(out).decode("utf-8", errors="replace")

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __repr__(self) -> str:
        return f"RWKVWorldTokenizer(vocab_file={self.vocab_file!r})"


class HFTokenizer:
    """Adapter giving a transformers tokenizer the same small interface (no special tokens added on encode)."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.name = getattr(tok, "name_or_path", "hf")
        self.vocab_size = len(tok)
        self.eot_id = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eot_id
        self.mask_id = self.vocab_size  # one new row, as for the World vocabulary

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i != self.mask_id]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def load_tokenizer(
    name: str = "rwkv-world",
    *,
    trust_remote_code: bool = False,
    local_files_only: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
):
    """Return a tokenizer with ``encode``/``decode``/``encode_batch``/``decode_batch`` and the special ids.

    ``name`` may be ``rwkv-world`` or ``BlinkDL/rwkv7-g1`` (and the other aliases in :data:`WORLD_ALIASES`), which
    resolve offline to the World vocabulary; a path to a World-format ``*.txt`` vocabulary; or any other Hugging Face
    tokenizer id or folder, loaded through ``transformers.AutoTokenizer`` (remote code only with
    ``trust_remote_code=True``).
    """
    if name.lower() in WORLD_ALIASES or name.lower().startswith("blinkdl/rwkv7"):
        return RWKVWorldTokenizer()
    if name.endswith(".txt") and os.path.isfile(name):
        return RWKVWorldTokenizer(name)
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise DiffRwkvError(
            f"tokenizer '{name}' is not the RWKV World vocabulary and transformers is not installed "
            "(pip install 'diffrwkv[hf]', or use tokenizer 'rwkv-world')"
        ) from exc
    try:
        tok = AutoTokenizer.from_pretrained(
            name,
            trust_remote_code=trust_remote_code,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            revision=revision,
        )
    except Exception as exc:  # transformers raises many types (OSError, ValueError, HTTP errors)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffRwkvError(
            f"cannot load tokenizer '{name}': {first} (offline? use tokenizer 'rwkv-world', or --cache-dir with "
            "--local-files-only pointing at a populated cache)"
        ) from exc
    return HFTokenizer(tok)
