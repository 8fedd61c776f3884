"""Captions harness, step 3 (CPU): score the GPU runs against the floor and the human reference; one markdown table.

    python bench/captions_score.py --runs /tmp/cap1.tar /tmp/cap2.tar --bundle .device/captions/bundle \\
        --out docs/captions_scores.md

``--runs``: folders or tars written by ``bench/captions_run.py`` (every ``<variant>.json`` in them; a variant met
twice is an error). The generated World ids are decoded with the World tokenizer and RE-ENCODED with the bundle's
encoder (all-MiniLM-L6-v2 + the saved PCA-32: ``latent_encoder.LatentEncoder``, from the bundle's recorded
``--encoder-dir``). Definitions are the project's (``metrics.py`` / ``evaluate.l2t_scores``):

* L2T cos: cosine of the re-encoded generation to the source latent (caption-1 of the image), mean over images;
  R@1: share of images whose own source latent is the nearest of all the evaluated images' (ties count against);
  BLEU / chrF: sacrebleu corpus scores against caption-1 (one reference; 0-100);
* T2L cos: cosine of the predicted latent to caption-1's true latent; STS-B rho: Spearman of the cosine of the
  predicted latents of each STS-B dev pair against the human score, beside the encoder's own 32-d rho (ceiling);
* bits/tok: the diffusion text NELBO (latent given; an upper bound) or the AR baseline's exact NLL, both over the
  same 40-token rows of the 5 x 1014 validation captions (end-of-text padding included, as trained);
* latent bits/tok: the same bits/tok with each validation row given the NEXT row's latent (another image) minus
  bits/tok with its own: what the model reads from the latent (0: it ignores it);
* STS-B by genre (when the STS-B csv the bundle recorded, or ``--stsb``, is here): each genre's Spearman for every
  T2L run beside the encoder's own on the same pairs, and the share of the genre's sentences holding a token that no
  training caption has — a model trained from scratch on captions has never seen those words;
* reference rows: ``floor`` — a random TRAINING caption per image (seeded, from the bundle), re-encoded (for T2L:
  its latent; STS-B 0 by definition: a latent that ignores the text ranks pairs at random); ``human`` — caption-2
  of the same image written by another person, re-encoded (what a perfect captioner that is not a copier scores).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

COLUMNS = [
    ("variant", "run"),
    ("decoder", "decoder"),
    ("steps", "steps"),
    ("train_s", "train s"),
    ("n", "images"),
    ("l2t_cosine", "L2T cos"),
    ("l2t_retrieval_top1", "L2T R@1"),
    ("bleu", "BLEU"),
    ("chrf", "chrF"),
    ("t2l_cosine", "T2L cos"),
    ("sts_spearman", "STS-B rho"),
    ("bits", "bits/tok"),
    ("latent_info", "latent bits/tok"),
]


class ScoreError(Exception):
    """A one-line, user-facing problem with the inputs."""


def collect_runs(paths: list[str], scratch: Path) -> dict[str, tuple[dict, Path]]:
    """``{variant: (result, folder)}`` from folders and tars of captions_run outputs."""
    from rwkv_diffusion_rnn.data_io import extract_tar

    found: dict[str, tuple[dict, Path]] = {}
    for k, p in enumerate(map(Path, paths)):
        if p.is_file() and tarfile.is_tarfile(p):
            dest = scratch / f"tar{k}"
            with tarfile.open(p) as tf:
                extract_tar(tf, dest)
            folders = sorted({f.parent for f in dest.rglob("*.json")})
        elif p.is_dir():
            folders = [p]
        else:
            raise ScoreError(f"{p}: not a folder or tar of captions_run.py outputs")
        for folder in folders:
            for f in sorted(folder.glob("*.json")):
                if f.name == "summary.json":
                    continue
                try:
                    res = json.loads(f.read_text())
                except ValueError as exc:
                    raise ScoreError(f"{f}: not JSON ({exc})") from exc
                if not isinstance(res, dict) or "variant" not in res or "kind" not in res:
                    continue
                v = res["variant"]
                if v in found:
                    raise ScoreError(f"{f}: variant {v!r} also in {found[v][1]}; score one result per variant")
                found[v] = (res, folder)
    if not found:
        raise ScoreError(f"no <variant>.json results in {', '.join(paths)}")
    return found


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def read_genres(path: str | Path, scores: np.ndarray) -> list[str]:
    """The genre (first field) of each STS-B pair of ``path``, checked against the bundle's scores row by row: the
    file the bundle was built from, not merely one of the same length."""
    import csv

    path, genres, found = Path(path), [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                if row and "".join(row).strip():
                    genres.append(row[0])
                    found.append(float(row[4]))
    except (OSError, IndexError, ValueError) as exc:
        raise ScoreError(f"{path}: cannot read the STS-B genres ({exc})") from exc
    if len(found) != len(scores) or not np.allclose(found, scores, atol=1e-3):
        raise ScoreError(f"{path}: its {len(found)} pairs are not the bundle's {len(scores)} (scores differ)")
    return genres


def by_genre(pred: np.ndarray, sts_lat: np.ndarray, sts_scores: np.ndarray, genres: list[str], oov) -> list:
    """STS-B Spearman per genre: the T2L latents' (``pred``: the 2P STS-B rows, sentence-1s then sentence-2s) and the
    encoder's own (the ceiling), with the share of the genre's sentences holding a token that no training caption
    has (what a model trained from scratch on the captions never saw)."""
    from rwkv_diffusion_rnn.evaluate import sts_spearman

    P, out = len(sts_scores), []
    g = np.asarray(genres)
    for name in ["all"] + sorted(set(genres)):
        m = np.ones(P, bool) if name == "all" else g == name
        row = {
            "genre": name,
            "pairs": int(m.sum()),
            "encoder": sts_spearman(sts_lat[:P][m], sts_lat[P:][m], sts_scores[m]),
            "unseen_token_share": float(np.concatenate([oov[:P][m], oov[P:][m]]).mean()),
            "t2l": sts_spearman(pred[:P][m], pred[P:][m], sts_scores[m]),
        }
        out.append(row)
    return out


def unseen_rows(bundle: dict) -> np.ndarray:
    """Per STS-B sentence (2P): does it hold a token absent from every training caption?"""
    seen = np.zeros(65536, bool)
    seen[np.asarray(bundle["train_tokens"], dtype=np.int64)] = True
    tok, off = np.asarray(bundle["stsb_tokens"], dtype=np.int64), np.asarray(bundle["stsb_offsets"])
    return np.array([not seen[tok[off[i] : off[i + 1]]].all() for i in range(len(off) - 1)])


def score(
    runs: dict[str, tuple[dict, Path]],
    bundle: dict,
    encoder,
    tokenizer,
    batch_size: int = 64,
    genres: list[str] | None = None,
) -> dict:
    """All rows of the table. ``encoder``: ``encode(texts) -> [N, 32]`` (the bundle's encoder; tests inject one)."""
    from rwkv_diffusion_rnn import metrics as M
    from rwkv_diffusion_rnn.eval_data import Targets, encode_texts
    from rwkv_diffusion_rnn.evaluate import l2t_scores, sts_spearman

    folder = Path(bundle["dir"])
    val_texts = json.loads((folder / "val_texts.json").read_text(encoding="utf-8"))
    floor_texts = json.loads((folder / "floor.json").read_text(encoding="utf-8"))["texts"]
    val_lat = np.asarray(bundle["val_latents"], dtype=np.float32)
    n_img = int(bundle["meta"]["counts"]["val_images"])
    pairs_all = int(bundle["meta"]["counts"]["stsb_pairs"])
    sts_lat = np.asarray(bundle["stsb_latents"], dtype=np.float32)
    sts_scores = np.asarray(bundle["stsb_scores"], dtype=np.float64)
    train_mean = np.asarray(bundle["train_latents"], dtype=np.float64).mean(0)

    def targets(n: int) -> Targets:
        return Targets(texts=val_texts[:n], tokens=[], latents=val_lat[:n])

    def enc(texts: list[str]) -> np.ndarray:
        return encode_texts(encoder, texts, batch_size)

    rows, examples, sizes, genre_rows, rerank_rows = [], {}, set(), [], []
    oov = unseen_rows(bundle) if genres is not None else None
    for variant, (res, where) in sorted(
        runs.items(), key=lambda kv: list(VARIANT_ORDER).index(kv[0]) if kv[0] in VARIANT_ORDER else 99
    ):
        tr = res.get("train") or {}
        base = {
            "variant": variant,
            "steps": tr.get("steps"),
            "train_s": tr.get("train_s"),
            "bits": (res.get("eval") or {}).get("nelbo_bits"),
            "latent_info": (res.get("eval") or {}).get("latent_info_bits"),
            "kind": res["kind"],
        }
        t2l = {}
        if res.get("t2l"):
            info = res["t2l"]
            n, pairs = int(info["rows"]["val"]), int(info["rows"]["stsb_pairs"])
            pred = load_t2l(where / info["file"], (n + 2 * pairs, val_lat.shape[1]))
            cos, half = M.mean_and_halfwidth(M.cosine_rows(pred[:n], val_lat[:n]))
            s1 = sts_lat[:pairs]
            s2 = sts_lat[pairs_all : pairs_all + pairs]
            t2l = {
                "t2l_cosine": cos,
                "t2l_cosine_ci95": half,
                "sts_spearman": sts_spearman(pred[n : n + pairs], pred[n + pairs :], sts_scores[:pairs]),
                "sts_pairs": pairs,
                "sts_encoder_spearman": sts_spearman(s1, s2, sts_scores[:pairs]),
                "n_t2l": n,
            }
            if genres is not None and pairs == pairs_all:
                genre_rows.append({"variant": variant, "genres": by_genre(pred[n:], sts_lat, sts_scores, genres, oov)})
                sp = res.get("t2l_spelled") or {}
                if sp.get("file"):  # captions_run.py --t2l-spell-unseen: the same T2L, unseen tokens spelled
                    spred = load_t2l(where / sp["file"], pred.shape)
                    genre_rows.append({"variant": f"{variant} (unseen tokens spelled)",
                                       "genres": by_genre(spred[n:], sts_lat, sts_scores, genres, oov)})  # fmt: skip
        decoders = res.get("l2t") or {}
        if not decoders:
            rows.append({**base, "decoder": "—", **t2l})
        for k, (dec, out) in enumerate(decoders.items()):
            ids = out["world_ids"]
            n = len(ids)
            if n > n_img:
                raise ScoreError(f"{where}/{variant}.json: {n} generations for {n_img} validation images")
            sizes.add(n)
            texts = [tokenizer.decode([i for i in r if 0 < i < 65536]) for r in ids]
            sc = l2t_scores(texts, enc(texts), targets(n))
            rows.append({**base, "decoder": dec, "n": n, **sc, **(t2l if k == 0 else {})})
            examples[f"{variant} ({dec})"] = texts[:5]
            if out.get("rerank"):
                rerank_rows.append({"variant": variant, "decoder": dec, **rerank_analysis(out["rerank"], enc, tokenizer,
                                                                                            val_lat[:n])})  # fmt: skip
    refs = []
    for n in sorted(sizes or {min(n_img, len(floor_texts))}):
        fl = floor_texts[:n]
        fl_lat = enc(fl)
        floor = {"variant": "floor", "decoder": "random training caption", "n": n, **l2t_scores(fl, fl_lat, targets(n))}
        floor["t2l_cosine"], floor["t2l_cosine_ci95"] = M.mean_and_halfwidth(M.cosine_rows(fl_lat, val_lat[:n]))
        floor["sts_spearman"] = 0.0
        human_txt = val_texts[n_img : n_img + n]
        human = {
            "variant": "human",
            "decoder": "caption-2 of the same image",
            "n": n,
            **l2t_scores(human_txt, enc(human_txt), targets(n)),
        }
        human["sts_spearman"] = sts_spearman(sts_lat[:pairs_all], sts_lat[pairs_all:], sts_scores)
        human["decoder"] += " (STS-B: the encoder itself)"
        const = {
            "variant": "constant",
            "decoder": "T2L = the training-mean latent",
            "n": n,
            "t2l_cosine": float(M.cosine_rows(np.broadcast_to(train_mean, (n, train_mean.size)), val_lat[:n]).mean()),
        }
        refs += [floor, human, const]
        examples.setdefault("source (caption-1)", val_texts[:5])
        examples.setdefault("floor", fl[:5])
    return {
        "rows": rows,
        "references": refs,
        "examples": examples,
        "stsb_encoder_spearman": float(bundle["meta"].get("stsb_encoder_spearman", float("nan"))),
        "stsb_by_genre": genre_rows,
        "rerank": rerank_rows,
    }


def rerank_analysis(rec: dict, enc, tokenizer, target: np.ndarray) -> dict:
    """How the model's own choice among K candidates compares with the encoder's: every candidate re-encoded;
    the round-trip cosine of candidate 1 alone, of the model's choice, of the best candidate by the encoder (an
    upper bound no decoder without the encoder can reach), and how often the model picked candidate 1 / the
    encoder's best."""
    from rwkv_diffusion_rnn import metrics as M

    cands = rec.get("candidates") or []
    choice = np.asarray(rec.get("choice", []), dtype=np.int64)
    n = len(target)
    if (
        not cands
        or any(len(c) != n for c in cands)
        or choice.shape != (n,)
        or not ((0 <= choice) & (choice < len(cands))).all()
    ):
        raise ScoreError(f"a rerank record does not fit {n} rows x {len(cands)} candidates")
    texts = [[tokenizer.decode([i for i in r if 0 < i < 65536]) for r in c] for c in cands]
    cos = np.stack([M.cosine_rows(enc(t), target) for t in texts])  # [K, N]
    rows = np.arange(n)
    chosen = cos[choice, rows]
    return {
        "k": len(cands),
        "first_cosine": float(cos[0].mean()),
        "chosen_cosine": float(chosen.mean()),
        "oracle_cosine": float(cos.max(0).mean()),
        # by text and by score: duplicate candidates (argmax decodes, short captions) are the same choice
        "chose_first": float(np.mean([texts[int(c)][i] == texts[0][i] for i, c in enumerate(choice)])),
        "chose_oracle": float((chosen >= cos.max(0) - 1e-6).mean()),
    }


def load_t2l(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A run's T2L predictions (float64), or a one-line error naming the file."""
    try:
        pred = np.load(path, allow_pickle=False).astype(np.float64)
    except (OSError, ValueError) as exc:
        raise ScoreError(f"{path}: cannot read the T2L predictions ({exc})") from exc
    if pred.shape != tuple(shape):
        raise ScoreError(f"{path}: shape {pred.shape}; expected {tuple(shape)}")
    return pred


VARIANT_ORDER = ("causal", "twice", "bidirectional", "sequential", "uniform", "v", "x0", "ar", "regress")


def table(scores: dict) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in scores["rows"] + scores["references"]:
        cells = []
        for key, _ in COLUMNS:
            v = r.get(key)
            digits = 1 if key in ("bleu", "chrf", "train_s") else 3
            cells.append(_fmt(v, digits))
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    if scores.get("stsb_by_genre"):
        first = scores["stsb_by_genre"][0]["genres"]
        out += "\nSTS-B Spearman by genre: T2L latents / the encoder's own 32-d (ceiling); share of sentences with a "
        out += (
            "token no training caption has:\n\n| run | "
            + " | ".join(f"{g['genre']} ({g['pairs']} pairs)" for g in first)
            + " |\n|---|"
            + "---|" * len(first)
            + "\n"
        )
        for r in scores["stsb_by_genre"]:
            cells = [f"{_fmt(g['t2l'], 3)} / {_fmt(g['encoder'], 3)}" for g in r["genres"]]
            out += f"| {r['variant']} | " + " | ".join(cells) + " |\n"
        out += "| unseen-token share | " + " | ".join(f"{g['unseen_token_share']:.2f}" for g in first) + " |\n"
    if scores.get("rerank"):
        out += "\nSelf-reranking: round-trip cosine of candidate 1, of the model's choice, of the encoder's best of K "
        out += "(an upper bound), and how often the model picked candidate 1 / the encoder's best:\n\n"
        out += "| run | decoder | K | candidate 1 | model's choice | encoder's best | chose 1 | chose encoder's |\n"
        out += "|---|---|---:|---:|---:|---:|---:|---:|\n"
        for r in scores["rerank"]:
            out += f"| {r['variant']} | {r['decoder']} | {r['k']} | {r['first_cosine']:.3f} "
            out += f"| {r['chosen_cosine']:.3f} | {r['oracle_cosine']:.3f} | {r['chose_first']:.2f} "
            out += f"| {r['chose_oracle']:.2f} |\n"
    out += "\nExamples (first validation images; generations from caption-1's latent):\n\n"
    for name, texts in scores["examples"].items():
        out += f"* **{name}**: " + " / ".join(repr(t) for t in texts[:3]) + "\n"
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="captions_run.py output folders or tars")
    ap.add_argument("--bundle", default=".device/captions/bundle")
    ap.add_argument("--encoder-dir", help="prepare-latents folder of the encoder (default: the bundle's source)")
    ap.add_argument("--out", required=True, help="markdown table to write (a .json with every number beside it)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--stsb",
        help="the STS-B csv the bundle was built from, for the by-genre table (default: the bundle's recorded source; "
        "skipped with a note when that file is not here)",
    )
    return ap


def main(argv: list[str] | None = None, encoder=None, tokenizer=None) -> int:
    """``encoder`` / ``tokenizer``: injected by tests; default the bundle's LatentEncoder and the World tokenizer."""
    args = build_parser().parse_args(argv)
    from captions_prepare import BundleError, load_bundle

    from rwkv_diffusion_rnn.errors import DiffRwkvError

    try:
        bundle = load_bundle(args.bundle)
        if encoder is None:
            from rwkv_diffusion_rnn.latent_encoder import LatentEncoder

            enc_dir = args.encoder_dir or bundle["meta"]["sources"]["encoder_dir"]
            encoder = LatentEncoder.from_dir(enc_dir)
        if tokenizer is None:
            from rwkv_diffusion_rnn.tokenizer import load_tokenizer

            tokenizer = load_tokenizer("rwkv-world")
        genres, scores_b = None, np.asarray(bundle["stsb_scores"], dtype=np.float64)
        recorded = bundle["meta"].get("sources", {}).get("stsb")
        if args.stsb:  # asked for: it must be there and be the bundle's
            if not Path(args.stsb).is_file():
                raise ScoreError(f"--stsb {args.stsb}: no such file")
            genres = read_genres(args.stsb, scores_b)
        elif recorded and Path(recorded).is_file():  # the recorded source: optional, a mismatch only skips the table
            try:
                genres = read_genres(recorded, scores_b)
            except ScoreError as exc:
                print(f"note: no by-genre table: {exc} (give --stsb)", file=sys.stderr)
        else:
            print(f"note: STS-B csv {recorded} not here; no by-genre table (give --stsb)", file=sys.stderr)
        with tempfile.TemporaryDirectory() as scratch:
            runs = collect_runs(args.runs, Path(scratch))
            scores = score(runs, bundle, encoder, tokenizer, args.batch_size, genres)
    except (ScoreError, BundleError, DiffRwkvError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    md = table(scores)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    from rwkv_diffusion_rnn.evaluate import _jsonable

    out.with_suffix(".json").write_text(json.dumps(_jsonable(scores), indent=1) + "\n")
    print(md, flush=True)
    print(f"written: {out} and {out.with_suffix('.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
