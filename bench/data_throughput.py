"""Data-pipeline throughput on the Flickr30k captions in ../shared/data (the figures in docs/RESULTS.md).

Stages (``--stages``, default all but ``prepare``):

* ``tokenizer``  -- ids/s of BlinkDL's ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER`` (per row, as the upstream script used
  it) vs ours (:func:`~rwkv_diffusion_rnn.preprocess_tokenize_text.encode_texts`), on all 145k training captions;
  asserts identical ids. Best of ``--repeats``.
* ``prepare``    -- the whole ``diffrwkv prepare-latents`` (MiniLM + PCA-32) on train.1-5 + val.1-5 (~8 min on 2 cores).
* ``tokenize``   -- the whole ``diffrwkv tokenize`` command (read + validate JSON, encode, write 145k .npz files).
* ``pack``       -- ``diffrwkv pack`` of the tokenized training split.
* ``loader``     -- samples/s of the trainer's reads (``stream_rows`` order, ``collate_batch``) over the pack and over
  the per-row files (batch 64, shuffled, in-process).

Command (outputs under --work, never in the repository)::

    python bench/data_throughput.py --work /tmp/diffrwkv_bench --stages prepare,tokenizer,tokenize,pack,loader

``prepare`` must have run once (in this or an earlier call with the same --work) for tokenize/pack/loader.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
CAPTIONS = REPO.parent / "shared" / "data" / "flickr30k-captions"


def report(name: str, **values) -> None:
    print(json.dumps({"stage": name, **values}), flush=True)


def bench_tokenizer(repeats: int) -> None:
    import rwkv.rwkv_tokenizer as rt

    from rwkv_diffusion_rnn import load_tokenizer
    from rwkv_diffusion_rnn.preprocess_tokenize_text import encode_texts

    texts = []
    for k in range(1, 6):
        with gzip.open(CAPTIONS / f"train.{k}.en.gz", "rt", encoding="utf-8") as f:
            texts += [line.rstrip("\n") for line in f]
    trie = rt.TRIE_TOKENIZER(os.path.join(os.path.dirname(rt.__file__), "rwkv_vocab_v20230424.txt"))
    tok = load_tokenizer("BlinkDL/rwkv7-g1")

    def timed(fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - w, time.process_time() - c, out

    # interleaved A/B rounds: both sides see the same background load (this machine is shared)
    rounds = []
    for _ in range(repeats):
        t_trie, c_trie, ref = timed(lambda: [trie.encode(t) for t in texts])
        t_ours, c_ours, (flat, offsets) = timed(lambda: encode_texts(tok, texts))
        t_row, _, _ = timed(lambda: [tok.encode(t) for t in texts])
        rounds.append((t_trie, t_ours, t_row, c_trie, c_ours))
    ours = [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(texts))]
    assert ours == ref, "ids differ from TRIE_TOKENIZER"
    n = len(texts)
    best = [min(r[k] for r in rounds) for k in range(5)]
    ratios = sorted(r[0] / r[1] for r in rounds)
    report(
        "tokenizer",
        rows=n,
        tokens=int(offsets[-1]),
        identical_ids=True,
        trie_rows_per_s=round(n / best[0]),
        ours_rows_per_s=round(n / best[1]),
        speedup_best=round(best[0] / best[1], 1),
        speedup_rounds=[round(x, 1) for x in ratios],
        speedup_cpu_time=round(best[3] / best[4], 1),
        rust_per_row_speedup=round(best[0] / best[2], 1),
        seconds_best={"trie": round(best[0], 3), "ours": round(best[1], 3), "rust_per_row": round(best[2], 3)},
    )


def bench_prepare(work: Path) -> None:
    from rwkv_diffusion_rnn.prepare_latents import main

    out = work / "qwen_32d"
    args = ["--input", *[str(CAPTIONS / f"train.{k}.en.gz") for k in range(1, 6)]]
    args += ["--validation-input", *[str(CAPTIONS / f"val.{k}.en.gz") for k in range(1, 6)]]
    args += ["--output_dir", str(out), "--overwrite"]
    t0 = time.perf_counter()
    main(args)
    dt = time.perf_counter() - t0
    rows = sum(len(json.loads((out / f"{s}_data.json").read_text())) for s in ("train", "validation"))
    report("prepare", rows=rows, seconds=round(dt, 1), rows_per_s=round(rows / dt, 1))


def bench_tokenize(work: Path) -> None:
    from rwkv_diffusion_rnn.preprocess_tokenize_text import tokenize_json

    out = work / "rwkv_tokens"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    meta = tokenize_json(work / "qwen_32d" / "train_data.json", out, max_length=512)
    dt = time.perf_counter() - t0
    report(
        "tokenize",
        rows=meta["rows"],
        seconds=round(dt, 2),
        rows_per_s=round(meta["rows"] / dt),
        encode_seconds=meta["encode_seconds"],
        truncated=meta["truncated"],
    )


def bench_pack(work: Path) -> None:
    from rwkv_diffusion_rnn.data_pack import pack_dataset

    t0 = time.perf_counter()
    meta = pack_dataset(
        str(work / "qwen_32d" / "train_data.json"), str(work / "rwkv_tokens" / "train"), str(work / "packed" / "train"),
        overwrite=True,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    report("pack", rows=meta["count"], seconds=round(dt, 2), rows_per_s=round(meta["count"] / dt))


def bench_loader(work: Path, seconds: float) -> None:
    from rwkv_diffusion_rnn.data_simple import DataConfig, build_datasets, collate_batch, stream_rows

    layouts = {
        "packed": DataConfig(token_dir=str(work / "packed" / "train")),
        "files": DataConfig(
            token_dir=str(work / "rwkv_tokens" / "train"), latent_dir=str(work / "qwen_32d" / "latents" / "train")
        ),
    }
    for layout, cfg in layouts.items():
        train, _ = build_datasets(cfg)
        n, step, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            rows = stream_rows(cfg.seed, len(train), step * 64, 64)
            batch = collate_batch([train[int(i)] for i in rows])
            n += batch["input_ids"].shape[0]
            step += 1
        dt = time.perf_counter() - t0
        report("loader", layout=layout, num_workers=0, batch_size=64, samples=n, samples_per_s=round(n / dt))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/diffrwkv_bench", help="scratch folder for outputs (not in the repo)")
    p.add_argument("--stages", default="tokenizer,tokenize,pack,loader")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loader-seconds", type=float, default=10.0)
    args = p.parse_args()
    if not CAPTIONS.is_dir():
        print(f"{CAPTIONS} not found: this benchmark needs the shared Flickr30k captions", file=sys.stderr)
        return 2
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report(
        "machine",
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    stages = args.stages.split(",")
    for stage in ("prepare", "tokenizer", "tokenize", "pack", "loader"):
        if stage not in stages:
            continue
        if stage == "tokenizer":
            bench_tokenizer(args.repeats)
        elif stage == "loader":
            bench_loader(work, args.loader_seconds)
        else:
            globals()[f"bench_{stage}"](work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
