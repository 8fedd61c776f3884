"""GPU check of the CUDA-graphed block stack (models/graphs.py, ``training.cuda_graphs``) against eager (outside CI).

    PYTHONPATH=$PWD python bench/gpu_check_graphs.py [--out results.json]

1. Model level: a random RWKV-7 (L4 D256 V1000, fla backend), ``forward_embeds(need_state=False)`` with a FiLM hook
   on every block, graphed vs eager on a copy, 3 iterations with fresh inputs each (the graph replays new data):
   output and every parameter / input gradient; fp32 and bf16 autocast (no cast cache in both); rows full or
   right-padded; causal or bidirectional.
2. Trainer level: ``Trainer.train_step`` with ``training.cuda_graphs`` on and off from the same seed (L4 D256 V65536,
   mixed modes, bf16, padded rows), with 1 and with 2 micro-batches a step (gradient accumulation): the losses of 6
   steps, and the step time of each.

Prints a table; exits non-zero if a bound is missed or a graphed run raised.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from check_common import rel

sys.path.insert(0, str(Path(__file__).resolve().parent))
rows: list[dict] = []


def record(name: str, err: float, bound: float) -> None:
    ok = err <= bound
    rows.append({"check": name, "rel_err": err, "bound": bound, "ok": ok})
    print(f"{name:70s} {err:9.2e} {bound:8.1e}  {'yes' if ok else 'NO'}", flush=True)


def model_level(dtype: torch.dtype | None, padded: bool, bidirectional: bool) -> None:
    from rwkv_diffusion_rnn.models.graphs import enable_cuda_graphs
    from rwkv_diffusion_rnn.time_conditioning import SiteModulation

    L, C, V, B, T = 4, 256, 1000, 4, 96
    eager = random_rwkv7_cuda(L, C, V)
    graphed = copy.deepcopy(eager)
    assert enable_cuda_graphs(graphed) == 1
    tag = f"{'bf16' if dtype else 'fp32'} {'padded' if padded else 'full'} {'bidir' if bidirectional else 'causal'}"
    bound = 1e-2 if dtype else 1e-5
    for it in range(3):
        ids = torch.randint(0, V, (B, T), device="cuda")
        mask = torch.ones(B, T, dtype=torch.long, device="cuda")
        if padded:
            mask[1, T // 2 :] = 0
            mask[3, T - 7 :] = 0
        mod = (0.1 * torch.randn(B, 1, L, 2, C, device="cuda")).requires_grad_()
        g_out = torch.randn(B, T, C, device="cuda")
        results = []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            m = mod.detach().clone().requires_grad_()
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
                x = model.emb(ids)
                h, state = model.forward_embeds(x, None, mask, pre_block=SiteModulation(m, "film", L),
                                                bidirectional=bidirectional, need_state=False)  # fmt: skip
            assert state is None
            (h.float() * g_out).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((h.detach().float().clone(), m.grad.clone(), grads))
        (h0, m0, g0), (h1, m1, g1) = results
        assert graphed.graphs.replays == it + 1, "the graphed model did not replay a graph"
        record(f"model {tag} iter {it}: output", rel(h1, h0), bound)
        record(f"model {tag} iter {it}: FiLM input gradient", rel(m1, m0), bound * 10)
        assert set(g0) == set(g1), sorted(set(g0) ^ set(g1))
        worst = max(g0, key=lambda n: rel(g1[n], g0[n]))
        record(f"model {tag} iter {it}: worst param grad ({worst})", rel(g1[worst], g0[worst]), bound * 10)


def random_rwkv7_cuda(L: int, C: int, V: int):
    """A new RWKV-7 on the GPU with every zero-initialised matrix (output projections, ...) made non-zero."""
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = RWKV7(RWKV7Config.for_shape(L, C, V))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.train()


def trainer_level(work: Path, accum: int = 1) -> None:
    from synthetic import backbone_file, synthetic_data

    from rwkv_diffusion_rnn.config import TrainConfig
    from rwkv_diffusion_rnn.improved_trainer import Trainer

    shape, length, pad_to = (4, 256, 65536), 48, 64
    data = synthetic_data(work / "data", 64, length, shape[2])
    backbone = str(backbone_file(work, shape, "cuda"))
    out = {}
    for graphs in (False, True):
        cfg = TrainConfig()
        m, d, t, lg = cfg.model, cfg.data, cfg.training, cfg.logging
        m.rwkv_name, m.freeze_backbone, m.film_every_block = backbone, False, True
        d.json_path, d.token_dir, d.latent_dir = data["json"], data["tokens"], data["latents"]
        d.pad_to_length, d.max_length, d.validation_fraction = pad_to, pad_to, 0.0
        t.dtype, t.train_batch_size, t.device, t.max_steps, t.warmup_steps, t.lr = "bf16", 8, "cuda", 100, 2, 1e-3
        t.loss_type, t.seed, t.cuda_graphs, t.grad_accum_steps = "mixed", 0, graphs, accum
        lg.save_dir, lg.progress, lg.tensorboard = str(work / f"run_{graphs}_{accum}"), False, False
        trainer = Trainer(cfg)
        losses, times = [], []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses.append(trainer.train_step()["loss"])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if graphs:
            replays = trainer.model.backbone.graphs.replays
            assert replays == 6 * accum, f"{replays} graph replays in 6 steps of {accum} micro-batches"
        trainer.close()
        out[graphs] = (losses, statistics.median(times[2:]))
        print(f"trainer cuda_graphs={graphs} grad_accum_steps={accum}: losses {[round(x, 5) for x in losses]}, "
              f"median step {out[graphs][1] * 1e3:.1f} ms", flush=True)  # fmt: skip
    diff = max(abs(a - b) / abs(a) for a, b in zip(out[False][0], out[True][0], strict=True))
    record(f"trainer, {accum} micro-batch(es) a step: losses of 6 steps, graphs vs eager (bf16)", diff, 1e-3)
    rows.append({"check": f"trainer step ms (eager, graphs), accum {accum}", "eager_ms": out[False][1] * 1e3,
                 "graphs_ms": out[True][1] * 1e3})  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    failed = []
    cases = [(dt, pad, bi) for dt in (None, torch.bfloat16) for pad in (False, True) for bi in (False, True)]
    for dt, pad, bi in cases:
        try:
            model_level(dt, pad, bi)
        except Exception as e:  # report every case
            traceback.print_exc()
            failed.append(f"model {dt} {pad} {bi}: {type(e).__name__}: {e}")
    # 2 micro-batches a step: the graph's static gradient buffers must not be adopted as p.grad (graphs.own_gradients)
    for accum in (1, 2):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                trainer_level(Path(tmp), accum)
        except Exception as e:
            traceback.print_exc()
            failed.append(f"trainer (accum {accum}): {type(e).__name__}: {e}")
    bad = [r for r in rows if r.get("ok") is False]
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | {len(rows)} rows, {len(bad)} over their "
          f"bound, {len(failed)} errors", flush=True)  # fmt: skip
    for f in failed:
        print("ERROR", f)
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows, "errors": failed}, indent=1))
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
