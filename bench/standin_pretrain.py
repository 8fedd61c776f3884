"""Pretrain a stand-in RWKV-7 language model (next-token loss, World vocabulary) on the corpus of
``bench/standin_corpus.py`` for a fixed wall-clock budget, and save it as a BlinkDL-format ``.pth`` that
``load_rwkv_model`` reads exactly as it reads a user's g1 file (docs/pretrained.md).

    python bench/standin_pretrain.py --corpus /tmp/standin/corpus --out /tmp/standin/standin-L6-D512.pth \
        --n-layer 6 --n-embd 512 --budget-s 300 --device cuda --fast --report standin.json

The corpus folder holds ``train_tokens.npy`` (uint16 ids, documents joined by end-of-text 0), ``heldout_tokens.npy``
and optionally ``captions_val_tokens.npy`` (``.npy.xz`` files are read too). Training windows of ``--length`` + 1
tokens start at random offsets (seeded); the learning rate warms up over ``--warmup`` steps and follows a cosine over
the elapsed share of the budget (the captions study's schedule, ``captions_common.TimeCosineLR``). At the end: bits
per token and perplexity on the held-out corpus text and on the validation captions (every position of
non-overlapping windows), the weights written in bf16 (as g1 files are), read back through ``load_rwkv_model`` and
checked to give the same logits; the report records the file's sha256.

``--device cpu`` with a tiny shape is the CPU-sized version (tests/test_pretrained_recipe.py pretrains its own
tiny LM in-process with :func:`pretrain` instead).
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captions_common import BudgetClock, StepClock, TimeCosineLR, train_for_budget  # noqa: E402

from rwkv_diffusion_rnn.checkpoints import file_sha256  # noqa: E402


def read_tokens(path: Path) -> np.ndarray:
    """A uint16 token array from ``X.npy`` or ``X.npy.xz``."""
    if path.is_file():
        return np.load(path)
    xz = path.with_name(path.name + ".xz")
    if xz.is_file():
        import io

        with lzma.open(xz) as f:
            return np.load(io.BytesIO(f.read()))
    raise SystemExit(f"error: {path}: token file not found (nor {xz.name}); run bench/standin_corpus.py --tokenize")


def window_nll_bits(model, tokens: np.ndarray, length: int, device, batch: int = 16, dtype=torch.bfloat16) -> dict:
    """Mean next-token NLL (bits/token) over non-overlapping windows of ``length`` + 1 tokens covering ``tokens``."""
    import torch.nn.functional as F

    ids = torch.as_tensor(tokens.astype(np.int64))
    n_win = max(1, (ids.numel() - 1) // length)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n_win, batch):
            rows = []
            for w in range(i, min(n_win, i + batch)):
                seg = ids[w * length : w * length + length + 1]
                if seg.numel() < 2:
                    continue
                rows.append(seg)
            width = max(r.numel() for r in rows)
            x = torch.zeros(len(rows), width, dtype=torch.long)
            m = torch.zeros(len(rows), width - 1, dtype=torch.bool)
            for j, r in enumerate(rows):
                x[j, : r.numel()] = r
                m[j, : r.numel() - 1] = True
            x, m = x.to(device), m.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                logits = model(x[:, :-1])
            nll = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            total += float(nll[m.flatten()].sum())
            count += int(m.sum())
    bits = total / max(1, count) / math.log(2)
    return {"bits_per_token": round(bits, 4), "perplexity": round(2**bits, 2), "tokens": count}


def pretrain(
    tokens: np.ndarray,
    *,
    n_layer: int,
    n_embd: int,
    length: int,
    batch: int,
    lr: float,
    warmup: int,
    budget: float,
    budget_in_steps: bool,
    device: torch.device,
    seed: int = 0,
    fast: bool = False,
    wkv_backend: str | None = None,
    log=print,
):
    """Train a new RWKV-7 (BlinkDL's init at this shape, World vocabulary) on random windows of ``tokens``.
    Returns (model, record)."""
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7

    model = random_rwkv7(RWKV7Config.for_shape(n_layer, n_embd), seed=seed, wkv_backend=wkv_backend).to(device)
    model.train()
    if fast:
        from rwkv_diffusion_rnn.models.graphs import enable_cuda_graphs
        from rwkv_diffusion_rnn.models.rwkv7_compile import compile_blocks

        compile_blocks(model, 1.0)
        enable_cuda_graphs(model)
    import torch.nn.functional as F

    from rwkv_diffusion_rnn.models.chunked_ce import linear_cross_entropy

    data = torch.as_tensor(tokens.astype(np.int64), device=device)
    if data.numel() < length + 2:
        raise SystemExit(f"error: the corpus holds {data.numel()} tokens, fewer than one window of {length + 1}")
    gen = torch.Generator(device).manual_seed(seed)
    offs = torch.arange(length + 1, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2 and p.shape[0] >= 32 and p.shape[1] >= 32]
    rest = [p for p in params if not any(p is q for q in decay)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.99), eps=1e-8, fused=True,
    )  # fmt: skip
    clock = StepClock() if budget_in_steps else BudgetClock()
    sched = TimeCosineLR(opt, lr, warmup, budget, 0.1, clock)
    ac = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)

    state = {"n": 0, "loss": float("nan")}

    def step() -> dict:
        start = torch.randint(0, data.numel() - length - 1, (batch, 1), device=device, generator=gen)
        x = data[start + offs]
        with ac:
            h = model.hidden_states(x[:, :-1])
            if device.type == "cuda":  # the 65,536-way head in row chunks, no [B*T, V] logits kept
                loss = linear_cross_entropy(h.flatten(0, 1), model.head.weight, x[:, 1:].flatten())[0].mean()
            else:  # on the CPU the plain head is ~3x faster at the tiny test shapes
                loss = F.cross_entropy(model.head(h).flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        state["n"] += 1
        if state["n"] % 25 == 0 or state["n"] <= 2:  # a read waits for the device: only every 25 steps
            state["loss"] = float(loss.detach())
        return {"loss": state["loss"], "lr": sched.get_last_lr()[0]}

    t0 = time.perf_counter()
    tr = train_for_budget(step, budget, clock, untimed_steps=2, log=log, log_every_s=30.0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tr["wall_s_total"] = round(time.perf_counter() - t0, 1)
    tr["tokens_seen"] = tr["steps"] * batch * length
    tr["epochs"] = round(tr["tokens_seen"] / data.numel(), 3)
    return model, tr


def plain_copy(model, n_layer: int, n_embd: int, device) -> torch.nn.Module:
    """The trained weights in a fresh, uncompiled, ungraphed model (evaluation and saving read this one)."""
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config

    with torch.device("meta"):
        m = RWKV7(RWKV7Config.for_shape(n_layer, n_embd), init=False)
    sd = {k.replace("._orig_mod", ""): v.detach().clone() for k, v in model.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    return m.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="folder of bench/standin_corpus.py --tokenize")
    ap.add_argument("--out", required=True, help="the .pth to write (BlinkDL format, bf16)")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--length", type=int, default=512, help="tokens per training window")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--budget-steps", type=int, default=0, help="> 0: a budget in steps instead of seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fast", action="store_true", help="compiled blocks replayed as CUDA graphs")
    ap.add_argument("--wkv-backend", default=None, help="auto | reference | fla | triton")
    ap.add_argument("--report", help="write the record (JSON) here")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    corpus = Path(a.corpus)
    train = read_tokens(corpus / "train_tokens.npy")
    heldout = read_tokens(corpus / "heldout_tokens.npy")
    cap_path = corpus / "captions_val_tokens.npy"
    captions = (
        read_tokens(cap_path) if cap_path.exists() or cap_path.with_name(cap_path.name + ".xz").exists() else None
    )
    print(f"[pretrain] corpus: {train.size:,} train tokens, {heldout.size:,} held-out; L{a.n_layer} D{a.n_embd}, "
          f"T {a.length}, batch {a.batch}, budget {a.budget_steps or a.budget_s} {'steps' if a.budget_steps else 's'}",
          flush=True)  # fmt: skip
    torch.manual_seed(a.seed)
    model, tr = pretrain(
        train, n_layer=a.n_layer, n_embd=a.n_embd, length=a.length, batch=a.batch, lr=a.lr, warmup=a.warmup,
        budget=a.budget_steps or a.budget_s, budget_in_steps=a.budget_steps > 0, device=dev, seed=a.seed,
        fast=a.fast, wkv_backend=a.wkv_backend, log=lambda s: print(f"[pretrain] {s}", flush=True),
    )  # fmt: skip
    print(f"[pretrain] {tr['steps']} steps, {tr['tokens_seen'] / 1e6:.1f}M tokens ({tr['epochs']} epochs) in "
          f"{tr['train_s']} s (+{tr['warmup_s']} s first steps)", flush=True)  # fmt: skip
    plain = plain_copy(model, a.n_layer, a.n_embd, dev)
    del model
    ev = {"heldout": window_nll_bits(plain, heldout, a.length, dev)}
    if captions is not None:
        ev["captions_val"] = window_nll_bits(plain, captions, a.length, dev)
    print(f"[pretrain] eval: {json.dumps(ev)}", flush=True)

    from rwkv_diffusion_rnn.pretrained_rwkv import load_rwkv_model, save_pth

    out = Path(a.out)
    save_pth({k: v.to(torch.bfloat16) for k, v in plain.state_dict().items()}, out)
    back = load_rwkv_model(out, dtype="fp32", device=dev, wkv_backend=a.wkv_backend)
    probe = torch.as_tensor(heldout[:129].astype(np.int64), device=dev)[None]
    with torch.no_grad():
        ref = plain.to(torch.bfloat16).float()(probe)
        got = back(probe)
    diff = float((got - ref).abs().max() / ref.abs().max())
    ok = diff < 1e-3
    print(f"[pretrain] saved {out} ({out.stat().st_size / 2**20:.1f} MiB); read back through load_rwkv_model: "
          f"logits rel. diff {diff:.2e} ({'ok' if ok else 'MISMATCH'})", flush=True)  # fmt: skip
    rec = {
        "shape": {"n_layer": a.n_layer, "n_embd": a.n_embd, "vocab": 65536},
        "settings": {k: v for k, v in vars(a).items() if k not in ("corpus", "out", "report")},
        "corpus_tokens": {"train": int(train.size), "heldout": int(heldout.size)},
        "train": {k: v for k, v in tr.items() if k != "curve"},
        "curve": tr["curve"],
        "eval": ev,
        "file": {"path": str(out), "sha256": file_sha256(out), "bytes": out.stat().st_size},
        "reload_logits_rel_diff": diff,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
    }
    if a.report:
        Path(a.report).write_text(json.dumps(rec, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
