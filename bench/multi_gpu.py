"""Multi-GPU training: DDP scaling, FSDP2 full fine-tuning of the 2.9B shape, checkpoint N -> M resume.

Run from the repository root on one machine with 4 GPUs; the script launches ``torchrun`` itself (one launch per
measurement, each printed before it runs, so any of them can also be run by hand) and rewrites
``--out/results.json`` after every launch, so a timeout keeps what finished::

    PYTHONPATH=$PWD python bench/multi_gpu.py --parts ddp    --out $OUT/multi_gpu   # ~4-7 min (1, 2, 4 GPUs)
    PYTHONPATH=$PWD python bench/multi_gpu.py --parts fsdp   --out $OUT/multi_gpu   # ~3-6 min (2.9B, 4 GPUs)
    PYTHONPATH=$PWD python bench/multi_gpu.py --parts resume --out $OUT/multi_gpu   # ~3-5 min (4 -> 2 GPUs)
    python bench/multi_gpu.py --parts ddp --gpus 1,2 --device cpu --shape tiny --length 32 --batch 2 \\
        --steps 2 --warmup 1 --out /tmp/mg                                            # CPU smoke (gloo)

Parts (``--parts``, comma-separated):

* ``ddp``: the 0.4B shape (L24 D1024, vocab 65536), rows of ``--length`` (512) text tokens plus one latent prefix
  and one readout position, bf16 autocast, unfrozen backbone, ``training.strategy=ddp``, the same per-GPU batch on
  1, 2 and 4 GPUs (``--gpus``). tokens/s = text tokens of the global batch / median step time (after
  ``--warmup`` steps); efficiency(N) = tok/s(N) / (N x tok/s(1)).
* ``fsdp``: the 2.9B shape (L32 D2560) fully fine-tuned with ``training.strategy=fsdp`` and activation
  checkpointing on ``--fsdp-gpus`` (4) GPUs: whether it fits, tokens/s, and peak memory per GPU
  (``torch.cuda.max_memory_allocated``; a step that runs out of memory is reported as ``OOM``).
* ``resume``: ``--resume-shape`` (0.4B) under fsdp: 6 steps on 4 GPUs writing a DCP checkpoint after step 3, then
  the checkpoint resumed on 2 GPUs with twice the per-GPU batch (the same global batch and rows per micro-step)
  for steps 4-6; reports both loss sequences and their largest relative difference (bf16 compute: equal to ~1e-2).

Everything runs through ``Trainer.train_step`` of improved_trainer.py (what ``diffrwkv train`` runs). Data: random
token rows and random unit latents in the JSON + per-row file layout (written once to ``--work``). Backbone: a
BlinkDL-format ``.pth`` of a new RWKV-7 (BlinkDL's init on the GPU, stored bf16 like a g1 file), loaded as fp32
master weights, as a pretrained g1 checkpoint would be -- so no rank runs a CPU init of 2.9B parameters; each rank
reads the file (memory-mapped) and FSDP2 shards the model on its GPU.

NCCL NVLink multicast stays off: every launch gets ``NCCL_NVLS_ENABLE=0`` and ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import backbone_file, synthetic_data  # noqa: E402

SHAPES = {"tiny": (2, 64, 512), "0.1b": (12, 768, 65536), "0.4b": (24, 1024, 65536), "1.5b": (24, 2048, 65536),
          "2.9b": (32, 2560, 65536)}  # fmt: skip
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ inputs


# ------------------------------------------------------------------------------------------------ worker


def worker(a: argparse.Namespace) -> None:
    """One torchrun process: build the Trainer from the job's settings, train, report from rank 0."""
    for k, v in NCCL_ENV.items():
        os.environ[k] = v
    import torch

    from rwkv_diffusion_rnn import distributed
    from rwkv_diffusion_rnn.config import TrainConfig
    from rwkv_diffusion_rnn.improved_trainer import Trainer

    job = json.loads(Path(a.job).read_text())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    say = log if rank == 0 else (lambda msg: None)
    cfg = TrainConfig()
    m, d, t, lg = cfg.model, cfg.data, cfg.training, cfg.logging
    m.rwkv_name, m.freeze_backbone = job["backbone"], False
    d.json_path, d.token_dir, d.latent_dir = job["data"]["json"], job["data"]["tokens"], job["data"]["latents"]
    d.pad_to_length = d.max_length = job["length"]
    d.validation_fraction = 0.0
    t.dtype, t.train_batch_size, t.device, t.strategy = job["dtype"], job["batch"], job["device"], job["strategy"]
    t.activation_checkpointing = job.get("activation_checkpointing", False)
    t.max_steps, t.warmup_steps, t.lr, t.loss_type, t.seed = job["max_steps"], 2, 1e-4, "mixed", 0
    t.resume = job.get("resume")
    lg.save_dir, lg.progress, lg.tensorboard, lg.keep_last = job["save_dir"], False, False, 2
    lg.checkpoint_format = "dcp"
    t0 = time.perf_counter()
    result: dict = {"job": job["name"], "world_size": world, "device": job["device"]}
    try:
        trainer = Trainer(cfg)
    except torch.OutOfMemoryError:
        result["status"] = "OOM at build"
        _report(a.result, result, rank)
        _end_if_distributed(rank, world, "OOM at build")
        return
    dev = trainer.device
    cuda = dev.type == "cuda"
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["params"] = sum(p.numel() for p in trainer.model.parameters())
    result["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    say(f"{job['name']}: built on {world} x {dev} in {result['build_s']} s, {result['params'] / 1e9:.3f}B params, "
        f"global batch {trainer.global_batch}, start step {trainer.step}")  # fmt: skip
    times, losses = [], []
    status = "ok"
    try:
        while trainer.step < t.max_steps:
            if cuda:
                torch.cuda.synchronize(dev)
            distributed.barrier()
            s0 = time.perf_counter()
            rec = trainer.train_step()
            if cuda:
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - s0)
            losses.append(rec["loss"])
            say(f"{job['name']}: step {trainer.step} loss {rec['loss']:.5f} {times[-1]:.3f} s")
            if job.get("save_at") == trainer.step:
                path = trainer.save()
                result["saved"] = str(path)
                say(f"{job['name']}: checkpoint {path}")
    except torch.OutOfMemoryError:
        status = "OOM"
        if world > 1:  # rank 0's own numbers only: no collective after an OOM
            result.update(status=status, losses=losses)
            if cuda:
                result["peak_gib_rank0"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
            _report(a.result, result, rank)
            _end_if_distributed(rank, world, f"OOM at step {trainer.step + 1}")
    result["status"] = status
    result["losses"] = losses
    result["first_step"] = t.max_steps - len(losses) if status == "ok" else None
    timed = times[job["warmup"] :]
    if timed:
        med = statistics.median(timed)
        result["step_s"] = med
        result["tokens_per_s"] = trainer.global_batch * job["length"] / med  # text tokens of the global batch
    if cuda:
        peak = torch.tensor([torch.cuda.max_memory_allocated(dev) / 2**30], device=dev)
        peaks = [torch.zeros_like(peak) for _ in range(world)] if world > 1 else [peak]
        if world > 1:
            torch.distributed.all_gather(peaks, peak)
        result["peak_gib_per_gpu"] = [round(float(p), 2) for p in peaks]
    trainer.close()
    _report(a.result, result, rank)
    distributed.cleanup()


def _end_if_distributed(rank: int, world: int, why: str) -> None:
    """Under several processes, leave at once with a non-zero status: the other ranks may wait in a collective this
    one will not join, and torchrun ends them only when a rank fails (a clean exit would leave them hanging)."""
    if world > 1:
        print(f"rank {rank}: {why}; ending the job", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)


def _report(path: str, result: dict, rank: int) -> None:
    if rank == 0:
        Path(path).write_text(json.dumps(result, indent=1))
        log(f"{result['job']}: {result.get('status')} {result.get('tokens_per_s', 0):,.0f} tok/s")


# ------------------------------------------------------------------------------------------------ driver


def launch(a, name: str, nproc: int, job: dict) -> dict:
    """Run one job under torchrun; returns rank 0's result (or the failure)."""
    work = Path(a.work)
    job_file, result_file = work / f"{name}.job.json", work / f"{name}.result.json"
    job_file.write_text(json.dumps(dict(job, name=name, device=a.device)))
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "worker", "--job", str(job_file), "--result", str(result_file)]  # fmt: skip
    env = dict(os.environ, **NCCL_ENV, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    timeout = min(a.launch_timeout, a.deadline - time.monotonic())
    if timeout < 60:
        log(f"{name}: skipped, {max(timeout, 0):.0f} s of the --budget left")
        return {"job": name, "status": "skipped (--budget spent)"}
    log(f"launch (timeout {timeout:.0f} s): {' '.join(cmd)}")
    t0 = time.perf_counter()
    # torchrun starts every worker in a session of its own: only torchrun itself can end them, on SIGTERM (a
    # SIGKILL, as subprocess.run's timeout sends, would leave them holding the GPUs)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"{name}: timed out after {timeout:.0f} s; stopping torchrun")
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        rc = "timeout"
    out = json.loads(result_file.read_text()) if result_file.exists() else {"job": name}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    if rc == "timeout" and out.get("status") in (None, "ok"):
        out["status"] = f"timeout ({timeout:.0f} s)"
    elif out.get("status") is None or (rc != 0 and out["status"] == "ok"):
        out["status"] = f"failed (exit {rc})"
    return out


def part_ddp(a, results: dict, save) -> None:
    shape = SHAPES[a.shape]
    common = dict(backbone=a.backbone(shape), data=a.dataset(shape, 8 * a.batch * max(a.gpus)), length=a.length,
                  dtype=a.dtype, batch=a.batch, strategy="ddp", max_steps=a.warmup + a.steps, warmup=a.warmup,
                  save_dir=str(Path(a.work) / "runs" / "ddp"))  # fmt: skip
    rows = results.setdefault("ddp", {"shape": a.shape, "per_gpu_batch": a.batch, "length": a.length, "runs": {}})
    for n in a.gpus:
        rows["runs"][str(n)] = launch(a, f"ddp_{a.shape}_{n}gpu", n, common)
        base = rows["runs"].get("1", {}).get("tokens_per_s")
        for k, r in rows["runs"].items():
            if base and r.get("tokens_per_s"):
                r["efficiency"] = r["tokens_per_s"] / (int(k) * base)
        save()


def part_fsdp(a, results: dict, save) -> None:
    shape = SHAPES[a.fsdp_shape]
    n = a.fsdp_gpus
    job = dict(backbone=a.backbone(shape), data=a.dataset(shape, 4 * a.fsdp_batch * n), length=a.length,
               dtype=a.dtype, batch=a.fsdp_batch, strategy="fsdp", activation_checkpointing=True,
               max_steps=a.warmup + a.steps, warmup=a.warmup, save_dir=str(Path(a.work) / "runs" / "fsdp"))  # fmt: skip
    results["fsdp"] = {"shape": a.fsdp_shape, "gpus": n, "per_gpu_batch": a.fsdp_batch, "length": a.length,
                       "activation_checkpointing": True}  # fmt: skip
    results["fsdp"].update(launch(a, f"fsdp_{a.fsdp_shape}_{n}gpu", n, job))
    save()


def part_resume(a, results: dict, save) -> None:
    import shutil

    shape = SHAPES[a.resume_shape]
    big, small = 4 if max(a.gpus) >= 4 else max(a.gpus), 2 if max(a.gpus) >= 4 else 1
    save_dir = Path(a.work) / "runs" / "resume"
    shutil.rmtree(save_dir, ignore_errors=True)
    per_small = a.batch * big // small
    common = dict(backbone=a.backbone(shape), data=a.dataset(shape, 8 * a.batch * big), length=a.length,
                  dtype=a.dtype, strategy="fsdp", max_steps=6, warmup=0, save_dir=str(save_dir))  # fmt: skip
    res = results.setdefault("resume", {"shape": a.resume_shape, "saved_on": big, "resumed_on": small,
                                        "global_batch": a.batch * big})  # fmt: skip
    res["full"] = launch(a, f"resume_full_{big}gpu", big, dict(common, batch=a.batch, save_at=3))
    save()
    ckpt = res["full"].get("saved")
    if not ckpt:
        res["status"] = "no checkpoint written"
        save()
        return
    res["resumed"] = launch(a, f"resume_from_{big}_on_{small}gpu", small, dict(common, batch=per_small, resume=ckpt))
    full, resumed = res["full"].get("losses", [])[3:], res["resumed"].get("losses", [])
    if len(full) == len(resumed) == 3:
        res["max_rel_diff"] = max(abs(x - y) / abs(x) for x, y in zip(full, resumed, strict=True))
        res["status"] = "ok" if res["max_rel_diff"] < 2e-2 else "losses differ"
    else:
        res["status"] = "incomplete"
    save()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("worker", help="internal: one torchrun process")
    w.add_argument("--job", required=True)
    w.add_argument("--result", required=True)
    p.add_argument("--parts", default="ddp,fsdp,resume")
    p.add_argument("--out", default=None, help="folder for results.json")
    p.add_argument("--work", default=None, help="data, backbone files and checkpoints (default: a temp folder)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--gpus", default="1,2,4", help="process counts of the ddp part")
    p.add_argument("--shape", default="0.4b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=8, help="per-GPU batch (ddp and resume parts)")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fsdp-shape", default="2.9b", choices=sorted(SHAPES))
    p.add_argument("--fsdp-gpus", type=int, default=4)
    p.add_argument("--fsdp-batch", type=int, default=8)
    p.add_argument("--resume-shape", default="0.4b", choices=sorted(SHAPES))
    p.add_argument("--launch-timeout", type=int, default=560, help="seconds per torchrun launch")
    p.add_argument(
        "--budget",
        type=int,
        default=530,
        help="seconds for this whole invocation (no launch starts or runs past it; 10-min device calls)",
    )
    a = p.parse_args(argv)
    a.deadline = time.monotonic() + a.budget
    if a.cmd == "worker":
        worker(a)
        return 0
    for k, v in NCCL_ENV.items():
        os.environ[k] = v
    a.gpus = [int(x) for x in a.gpus.split(",")]
    a.work = a.work or tempfile.mkdtemp(prefix="multi_gpu_")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else None
    results: dict = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "env": dict(NCCL_ENV)}
    if out and (out / "results.json").exists():
        results = json.loads((out / "results.json").read_text())  # parts run separately add to one file

    def save() -> None:
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))

    a.backbone = lambda shape: str(backbone_file(Path(a.work), shape, a.device, log))
    a.dataset = lambda shape, rows: synthetic_data(Path(a.work) / f"data_T{a.length}_V{shape[2]}_{rows}", rows,
                                                   a.length, shape[2])  # fmt: skip
    parts = {"ddp": part_ddp, "fsdp": part_fsdp, "resume": part_resume}
    for name in a.parts.split(","):
        if name not in parts:
            print(f"error: unknown part '{name}' (ddp, fsdp, resume)", file=sys.stderr)
            return 2
        log(f"part {name}")
        parts[name](a, results, save)
        log(f"part {name}: {json.dumps(results.get(name))[:2000]}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
