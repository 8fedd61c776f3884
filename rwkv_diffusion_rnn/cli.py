"""``diffrwkv <verb>``: the one command in front of every entry point.

Each verb names a module-level ``main(argv: list[str] | None) -> int`` that owns its own argparse parser, so
``python rwkv_diffusion_rnn/<module>.py ...`` (the original rwkv_diffusion_rnn scripts' commands) and
``diffrwkv <verb> ...`` are the same code.
Modules are imported only when their verb runs, so ``diffrwkv --help`` is instant. This module is only that
front: the library never imports it (the shared error handling is :func:`rwkv_diffusion_rnn.entry.run_main`).

A :class:`~rwkv_diffusion_rnn.errors.DiffRwkvError` (bad input, missing file, offline hub) is printed as one line,
``error: ...``, with exit status 2; set ``DIFFRWKV_DEBUG=1`` to see the traceback instead. A near-miss verb, flag or
choice gets a "did you mean" (flags and choices: every verb's argparse errors, while the verb runs).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import re
import sys
from collections.abc import Iterable, Iterator

from rwkv_diffusion_rnn.entry import run_main

#: verb -> ("module:function", one-line help). Registry rather than if/elif: adding a verb is one line.
VERBS: dict[str, tuple[str, str]] = {
    "smoke": (
        "rwkv_diffusion_rnn.smoke:main",
        "load (or build) an RWKV-7 checkpoint, tokenize, forward: a quick check",
    ),
    "convert": (
        "rwkv_diffusion_rnn.pretrained_rwkv:convert_main",
        "convert a checkpoint: BlinkDL .pth <-> HF safetensors",
    ),
    "prepare-latents": ("rwkv_diffusion_rnn.prepare_latents:main", "encode text into 32-d latents (original layout)"),
    "tokenize": ("rwkv_diffusion_rnn.preprocess_tokenize_text:main", "tokenize the JSON rows into .npz files"),
    "pack": ("rwkv_diffusion_rnn.data_pack:main", "pack a dataset into memory-mapped arrays"),
    "check-data": ("rwkv_diffusion_rnn.check_data:main", "validate a dataset folder and print a summary"),
    "make-corpus": ("rwkv_diffusion_rnn.corpus:main", "write the embedded default corpus of English sentences"),
    "train": ("rwkv_diffusion_rnn.train_rwkv:main", "train the denoiser (Hydra config, as the original train_rwkv.py)"),
    "sample": ("rwkv_diffusion_rnn.sample_cli:main", "generate text from latents, latents from text, or both"),
    "evaluate": ("rwkv_diffusion_rnn.eval_cli:main", "evaluate a checkpoint"),
    "demo": ("rwkv_diffusion_rnn.demo:main", "the offline end-to-end demo"),
    "serve": ("rwkv_diffusion_rnn.serve:main", "a local playground page over a trained model (127.0.0.1)"),
}


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: diffrwkv <verb> [options]   (diffrwkv <verb> --help for its options)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    return "\n".join(lines)


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to a misspelled ``word``, or None when none is close."""
    hit = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return hit[0] if hit else None


def flag_hint(parser: argparse.ArgumentParser, message: str) -> str:
    """ "; did you mean ...?" for an argparse error about an unknown flag or an invalid choice, else ""."""
    if message.startswith("unrecognized arguments: "):
        flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
        for word in message.split(": ", 1)[1].split():
            if word.startswith("--") and (hit := nearest(word.split("=")[0], flags)):
                return f"; did you mean {hit}?"
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice and (hit := nearest(choice[1], re.findall(r"'([^']*)'", choice[2]) or choice[2].split(", "))):
        return f"; did you mean '{hit}'?"
    return ""


@contextlib.contextmanager
def flag_suggestions() -> Iterator[None]:
    """While active, argparse errors end with :func:`flag_hint` (the verbs own their parsers; this adds the hint
    to all of them without touching each)."""
    original = argparse.ArgumentParser.error

    def error(self: argparse.ArgumentParser, message: str):
        return original(self, message + flag_hint(self, message))

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        hit = nearest(verb, VERBS)
        print(f"error: unknown verb '{verb}'{f'; did you mean {hit}?' if hit else ''}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = VERBS[verb]
    module_name, fn_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"error: 'diffrwkv {verb}' is not available in this version", file=sys.stderr)
            return 2
        raise
    with flag_suggestions():
        return run_main(getattr(module, fn_name), rest)


if __name__ == "__main__":
    sys.exit(main())
