"""GPU check of the compiled RWKV-7 blocks (``compile_blocks``) against the same model run eagerly (outside CI).

    PYTHONPATH=$PWD python bench/gpu_check_compiled.py [--width 768] [--layers 4] [--out results.json]

Inductor's settings are whatever the process has (``DIFFRWKV_MIX_ORDER_REDUCTION``, ``DIFFRWKV_WKV_IN_GRAPH``), so one
script checks each combination a speed call times. For every parameter's gradient and the logits, one random model
(WKV backend ``cuda``) on two batches of the training shape (B 4, T 512) run one after the other, so a gradient the
compiled backward leaves unwritten (it would keep the previous batch's values) fails the second:

- fp32 weights, no autocast: compiled against eager, bound 1e-4 relative (the same operations fused; only the order of
  the per-channel sums differs);
- fp32 weights under bf16 autocast, with and without ``set_bf16_residual``: compiled against the eager fp32 run (the
  ground truth), bound 2x the eager bf16 run's own error against it (or 5e-2, whichever is larger). bf16 rounding
  alone moves a small tensor's gradient by a few percent, and the compiled kernels round in other places than eager
  (they keep bf16 intermediates in fp32); a wrong gradient (Inductor's mix-order reduction has been reported to
  produce them: unwritten or stale memory) moves it by far more.

Prints one line a check and the worst parameter; exits non-zero if a bound is missed or a run raised.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import traceback

import torch
from check_common import rel

rows: list[dict] = []


def run(model, ids, autocast: bool):
    """Logits and every parameter's gradient of one forward + backward (the LM loss)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=autocast):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


def compare(name: str, got, truth, bound_of) -> None:
    """Record the logits and the worst parameter gradient of ``got`` against ``truth``; ``bound_of(key)``."""
    errs = {"logits": rel(got[0], truth[0])} | {n: rel(got[1][n], truth[1][n]) for n in truth[1]}
    missing = sorted(set(truth[1]) - set(got[1]))
    worst = max(errs, key=lambda k: errs[k] / bound_of(k))
    ok = not missing and all(errs[k] <= bound_of(k) for k in errs)
    rows.append({"check": name, "worst": worst, "err": errs[worst], "bound": bound_of(worst), "ok": ok,
                 "missing_grads": missing})  # fmt: skip
    print(f"{'ok  ' if ok else 'FAIL'} {name}: worst {worst} {errs[worst]:.2e} (bound {bound_of(worst):.2e})"
          + (f"; no gradient for {missing}" if missing else ""), flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--cpu", action="store_true", help="a dry run of the script on the CPU (reference WKV backend)")
    a = ap.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check_compiled: no CUDA device", file=sys.stderr)
        return 2
    import torch._inductor.config as inductor_config

    from rwkv_diffusion_rnn.models import wkv7_cuda
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7, set_bf16_residual
    from rwkv_diffusion_rnn.models.rwkv7_compile import compile_blocks

    cfg = RWKV7Config.for_shape(a.layers, a.width, vocab_size=4096)
    g = torch.Generator().manual_seed(0)
    device = "cpu" if a.cpu else "cuda"
    # two batches, run one after the other: a gradient the compiled backward never writes would keep the previous
    # batch's values (the allocator hands the same block back), which the second batch's comparison catches
    batches = [torch.randint(1, cfg.vocab_size, (a.batch, a.length), generator=g).to(device) for _ in range(2)]
    eager = random_rwkv7(cfg, seed=0, wkv_backend="reference" if a.cpu else "cuda").to(device).train()
    settings = {"in_graph": wkv7_cuda.IN_GRAPH, "width": a.width, "layers": a.layers}
    try:
        truth = [run(eager, ids, autocast=False) for ids in batches]
        for residual in (False, True):
            set_bf16_residual(eager, residual)
            ref = [run(eager, ids, autocast=True) for ids in batches]
            model = copy.deepcopy(eager)
            compile_blocks(model)
            settings["mix_order_reduction"] = getattr(inductor_config.triton, "mix_order_reduction", None)
            tag = "bf16 residual" if residual else "fp32 residual"
            for i, ids in enumerate(batches):
                if not residual:
                    compare(f"fp32, compiled vs eager, batch {i}", run(model, ids, autocast=False), truth[i],
                            lambda k: 1e-4)  # fmt: skip
                (lg, gr), (lg0, gr0) = ref[i], truth[i]
                own = {"logits": rel(lg, lg0)} | {n: rel(gr[n], gr0[n]) for n in gr0}
                compare(f"bf16 autocast, {tag}: compiled vs fp32 eager, batch {i}", run(model, ids, autocast=True),
                        truth[i], lambda k, own=own: max(5e-2, 2 * own[k]))  # fmt: skip
            torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - a raised run is a failed check, reported with the others
        traceback.print_exc()
        rows.append({"check": "run", "ok": False, "error": traceback.format_exc(limit=3)})
    print(f"settings: {settings}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=1)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
