"""BlinkDL's RWKV-7 training step (RWKV-LM, RWKV-v7/train_temp) on one GPU: its wall time and its GPU kernel time.

    PYTHONPATH=$PWD python bench/blinkdl_step.py --src bench/_external/blinkdl-src --shape 0.1b --out $OUT/bl_0.1b.json
    python bench/blinkdl_step.py --src DIR --shape 0.4b --dry-run        # checks the arguments, prints the plan

``--src`` is a folder holding his ``src/model.py`` and the ``cuda/`` sources it builds (a copy of
RWKV-v7/train_temp; nothing of his is in this repository). His module is imported from there, as his trainer sets it
up (``train.py``): ``RWKV_MY_TESTING=x070``, ``RWKV_JIT_ON=1``, ``RWKV_HEAD_SIZE=64``, ``RWKV_CTXLEN=T``,
``RWKV_FLOAT_MODE=bf16``, ``RWKV_HEAD_L2WRAP_CE_CHUNK`` (0: full logits and his fused L2Wrap cross-entropy) and
``RWKV_KERNEL`` (``@rwkv3``, his H100 WKV kernel, as his demo script runs; ``""`` his first one). Importing it builds
his ~10 CUDA extensions with ``torch.utils.cpp_extension`` (nvcc, ninja) into ``TORCH_EXTENSIONS_DIR``; one at a
time that takes minutes, so ``--prebuild`` (default on) first records his ``load(...)`` calls without building and
builds them in parallel processes; the import then finds each built.

The step, as his trainer runs one (Lightning + DeepSpeed stage 2 in bf16 there, plain PyTorch here): his ``RWKV``
model at a g1 shape (``--shape``: L layers, D width, vocabulary 65536), weights in bf16 (his trainer trains bf16
weights), initialised by his ``generate_init_weight``; ``training_step`` on random tokens (``--batch`` x
``--length``), backward, gradient clipping at 1.0, ``torch.optim.AdamW(fused=True)`` with weight decay on the
matrices (his grouping). Timed: the median of ``--steps`` steps each timed alone (CUDA events) after ``--warmup``
steps, and the same number back to back with one wait; then ``torch.profiler`` over ``--profile-steps`` steps: the
GPU kernel time of one step (sum of the CUDA kernels' durations) and the kernels launched per step. tokens/s is
reported for both: wall (tokens / median step) and kernel-bound (tokens / kernel time: the step on a host that
launches instantly; his step is host-bound on slow-launching hosts).

His module imports ``pytorch_lightning`` at import time (the base class ``LightningModule``, ``rank_zero_info``,
``DeepSpeedStrategy`` for a type check in ``configure_optimizers``) and ``deepspeed`` only when installed (used with
``grad_cp=1``, not here). Where ``pytorch_lightning`` is not installed, stub modules stand in (``sys.modules``):
``LightningModule`` is ``torch.nn.Module``, the rest no-ops; the step uses nothing of Lightning's. The JSON says which.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import multiprocessing
import os
import re
import statistics
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput, when run as a script
from throughput import SHAPES, _timed, host_info, kernel_profile, log  # noqa: E402

CHUNK = 16  # his WKV kernel's chunk: T must be a multiple
KERNELS = ("@rwkv3", "")


def his_env(a) -> dict[str, str]:
    """The environment his train.py sets before importing src/model.py."""
    return {
        "RWKV_MY_TESTING": "x070",
        "RWKV_KERNEL": a.kernel,
        "RWKV_CTXLEN": str(a.length),
        "RWKV_HEAD_SIZE": "64",
        "RWKV_HEAD_SIZE_A": "64",  # the name older train_temp versions read
        "RWKV_HEAD_L2WRAP_CE_CHUNK": str(a.head_chunk),
        "RWKV_FLOAT_MODE": "bf16",
        "RWKV_JIT_ON": str(a.jit),
    }


def his_args(a, shape: tuple[int, int, int]) -> SimpleNamespace:
    """The ``args`` his model reads (train.py's defaults and his demo script's values)."""
    L, D, V = shape
    return SimpleNamespace(n_layer=L, n_embd=D, vocab_size=V, ctx_len=a.length, head_size=64, head_size_a=64,
                           dim_att=D, dim_ffn=int((D * 3.5) // 32 * 32), my_testing="x070", grad_cp=0,
                           accelerator="GPU", weight_decay=a.weight_decay, lr_init=a.lr, betas=(0.9, 0.99),
                           adam_eps=1e-18, head_chunk=a.head_chunk)  # fmt: skip


def check(a) -> str | None:
    """One line naming what is wrong with the arguments, or None."""
    if a.shape not in SHAPES:
        return f"--shape {a.shape}: expected one of {', '.join(SHAPES)}"
    if a.length <= 0 or a.length % CHUNK:
        return f"--length {a.length}: his WKV kernel needs a positive multiple of {CHUNK}"
    if a.batch <= 0 or a.steps <= 0 or a.warmup < 0 or a.profile_steps < 0:
        return "--batch and --steps must be positive, --warmup and --profile-steps not negative"
    if a.kernel not in KERNELS:
        return f"--kernel {a.kernel!r}: expected '@rwkv3' (his H100 kernel) or '' (his first one)"
    if a.jit not in (0, 1):
        return f"--jit {a.jit}: expected 0 or 1"
    model = Path(a.src) / "src" / "model.py"
    if not model.is_file():
        return f"--src {a.src}: no src/model.py there (a copy of RWKV-LM's RWKV-v7/train_temp is expected)"
    missing = [f for f in cuda_sources(model.read_text(), a) if not (Path(a.src) / f).is_file()]
    if missing:
        return f"--src {a.src}: {missing[0]} is missing (his model builds it)"
    return None


def cuda_sources(text: str, a) -> list[str]:
    """The cuda/ files his model.py names, less the WKV kernel variant ``--kernel`` does not pick and the chunked
    head (built only with ``--head-chunk`` > 0)."""
    files = sorted(set(re.findall(r"['\"](cuda/[\w.]+\.(?:cu|cpp))['\"]", text)))
    skip = {"cuda/rwkv7_clampw.cu", "cuda/rwkv7_clampw.cpp"} if a.kernel == "@rwkv3" else {
        "cuda/rwkv7_clampw_v3_for_h100.cu", "cuda/rwkv7_clampw_v3.cpp"}  # fmt: skip
    if a.head_chunk <= 0:
        skip |= {f for f in files if "head_l2wrap" in f}
    return [f for f in files if f not in skip]


# ---------------------------------------------------------------------------------------------- importing his model
def stub_lightning() -> str:
    """``pytorch_lightning`` as installed, or stub modules in ``sys.modules`` (his module uses it only as the base
    class and for logging / a type check in ``configure_optimizers``, which the step never calls). Returns which."""
    try:
        import pytorch_lightning  # noqa: F401

        return "installed"
    except Exception:
        pass
    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = torch.nn.Module
    utilities = types.ModuleType("pytorch_lightning.utilities")
    utilities.rank_zero_info = lambda *args, **kwargs: None
    utilities.rank_zero_only = lambda fn: fn
    strategies = types.ModuleType("pytorch_lightning.strategies")
    strategies.DeepSpeedStrategy = type("DeepSpeedStrategy", (), {})
    pl.utilities, pl.strategies = utilities, strategies
    sys.modules.update({"pytorch_lightning": pl, "pytorch_lightning.utilities": utilities,
                        "pytorch_lightning.strategies": strategies})  # fmt: skip
    return "stub"


@contextlib.contextmanager
def in_folder(path: Path):
    """His model.py builds ``cuda/...`` relative to the working directory."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _exec_model(src: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, src / "src" / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # inspect (TorchScript reads his sources) finds a class's file through sys.modules
    with in_folder(src):
        spec.loader.exec_module(module)
    return module


def exec_without_building(src: Path) -> tuple[types.ModuleType | None, list[dict]]:
    """Run his module with ``load`` (and what needs its result: the autograd registrations, TorchScript functions)
    stood in for, building nothing: the module (None where it failed) and its ``load(...)`` calls, up to any
    failure."""
    from torch.utils import cpp_extension

    calls: list[dict] = []

    def fake_load(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace()

    saved = (cpp_extension.load, torch.library.register_autograd, torch.jit.script)
    cpp_extension.load, torch.library.register_autograd, torch.jit.script = (
        fake_load, lambda *args, **kwargs: None, lambda fn, *args, **kwargs: fn)  # fmt: skip
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return _exec_model(src, "_blinkdl_model_unbuilt"), calls
    except Exception as exc:
        log(f"  running his module without builds stopped at {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return None, calls
    finally:
        cpp_extension.load, torch.library.register_autograd, torch.jit.script = saved
        sys.modules.pop("_blinkdl_model_unbuilt", None)


def _build_one(job: tuple[str, dict]) -> tuple[str, float, str | None]:
    src, kwargs = job
    from torch.utils import cpp_extension

    t0 = time.perf_counter()
    try:
        with in_folder(Path(src)), contextlib.redirect_stdout(io.StringIO()):
            cpp_extension.load(**{**kwargs, "verbose": False})
        return kwargs["name"], time.perf_counter() - t0, None
    except Exception as exc:
        return kwargs["name"], time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc).splitlines()[-1][:160]}"


def prebuild(src: Path, jobs: int) -> list[dict]:
    """Build his extensions in parallel processes (spawned: this one has initialised CUDA; they need not, as
    ``TORCH_CUDA_ARCH_LIST`` is set)."""
    _, calls = exec_without_building(src)
    log(f"  building {len(calls)} extensions of his, {jobs} at a time")
    if not calls:
        return []
    with multiprocessing.get_context("spawn").Pool(max(1, min(jobs, len(calls)))) as pool:
        done = pool.map(_build_one, [(str(src), kw) for kw in calls])
    for name, secs, err in done:
        log(f"  built {name} in {secs:.0f} s" + (f" FAILED {err}" if err else ""))
    return [{"name": n, "s": round(s, 1), "error": e} for n, s, e in done]


def import_his_model(src: Path) -> types.ModuleType:
    return _exec_model(src, "blinkdl_rwkv7_model")


# ---------------------------------------------------------------------------------------------- the step
def build_step(model_mod, a, shape, dev: torch.device):
    args = his_args(a, shape)
    torch.manual_seed(0)
    model = model_mod.RWKV(args)
    if a.init == "his" and hasattr(model, "generate_init_weight"):
        with contextlib.redirect_stdout(io.StringIO()):  # he prints a line per tensor
            weights = model.generate_init_weight()
        model.load_state_dict(weights)
    model = model.to(dev, torch.bfloat16).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n.endswith(".weight") and "emb" not in n]
    ids_decay = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids_decay]
    groups = [{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": args.weight_decay}]
    opt = torch.optim.AdamW(groups, lr=args.lr_init, betas=args.betas, eps=args.adam_eps, fused=True)
    g = torch.Generator(dev).manual_seed(0)
    tokens = torch.randint(0, shape[2], (a.batch, a.length + 1), device=dev, generator=g)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    params = list(model.parameters())

    def step() -> torch.Tensor:
        loss = model.training_step(batch, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    n_params = sum(p.numel() for p in params)
    return step, n_params


def measure(step, a, dev: torch.device) -> dict:
    first = None
    for i in range(a.warmup):
        loss = float(step())
        first = loss if i == 0 else first
        log(f"  warm-up step {i + 1}/{a.warmup}: loss {loss:.4f}")
    times = [_timed(step, dev) for _ in range(a.steps)]
    run_s = _timed(lambda: [step() for _ in range(a.steps)], dev)
    tokens = a.batch * a.length
    med = statistics.median(times)
    out = {
        "first_loss": first,
        "step_ms": [round(1000 * t, 2) for t in times],
        "step_ms_median": 1000 * med,
        "tokens_per_s": tokens / med,
        "tokens_per_s_run": tokens * a.steps / run_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30,
    }
    if a.profile_steps:
        prof = kernel_profile(step, dev, a.top, steps=a.profile_steps)
        out.update(
            profile=prof,
            gpu_kernel_ms_per_step=prof["gpu_kernel_ms_per_step"],
            kernels_per_step=prof["kernels_per_step"],
            tokens_per_s_kernel_bound=tokens / (prof["gpu_kernel_ms_per_step"] / 1000),
        )
    return out


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="folder with his src/model.py and cuda/ (RWKV-v7/train_temp)")
    p.add_argument("--shape", default="0.1b", help=f"one of {', '.join(SHAPES)} (L, D, vocabulary)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=512, help="tokens per row (T; a multiple of 16)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps (0: no kernel time)")
    p.add_argument("--top", type=int, default=12, help="kernels kept in the profile's list")
    p.add_argument("--kernel", default="@rwkv3", help="RWKV_KERNEL: '@rwkv3' (his H100 WKV kernel) or ''")
    p.add_argument("--jit", type=int, default=1, help="RWKV_JIT_ON (his trainer: 1)")
    p.add_argument("--head-chunk", type=int, default=0, help="RWKV_HEAD_L2WRAP_CE_CHUNK (his demo: 0)")
    p.add_argument("--init", default="his", choices=("his", "plain"), help="his generate_init_weight, or none")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--weight-decay", type=float, default=0.001)
    p.add_argument("--no-prebuild", dest="prebuild", action="store_false", help="let his import build one by one")
    p.add_argument("--build-jobs", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and print the plan; no GPU needed")
    return p


def plan(a) -> dict:
    L, D, V = SHAPES[a.shape]
    text = (Path(a.src) / "src" / "model.py").read_text()
    return {
        "shape": a.shape, "layers": L, "width": D, "vocab": V, "batch": a.batch, "length": a.length,
        "tokens_per_step": a.batch * a.length, "env": his_env(a), "cuda_sources": cuda_sources(text, a),
        "weights": "bf16", "init": a.init, "optimizer": "torch.optim.AdamW(fused=True), clip 1.0",
        "steps": a.steps, "warmup": a.warmup, "profile_steps": a.profile_steps, "prebuild": a.prebuild,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    problem = check(a)
    if problem:
        print(problem)
        return 2
    info = plan(a)
    if a.dry_run:
        print(json.dumps(info, indent=1))
        return 0
    dev = torch.device(a.device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        print(f"--device {a.device}: his kernels need a CUDA GPU (use --dry-run to check the arguments)")
        return 2
    from rwkv_diffusion_rnn.models.wkv7_cuda import _cuda_home

    home = _cuda_home()
    if home is None:
        print("his kernels need nvcc: install the CUDA toolkit or set CUDA_HOME")
        return 2
    from torch.utils import cpp_extension

    os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = home
    os.environ.update(his_env(a))
    # the build processes and the import compile for this GPU alike (one key for the extensions' build folders)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "{}.{}".format(*torch.cuda.get_device_capability()))
    src = Path(a.src).resolve()
    result = {**info, "src": str(src), "lightning": stub_lightning()}
    t0 = time.perf_counter()
    if a.prebuild:
        result["builds"] = prebuild(src, a.build_jobs)
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as his train.py for bf16
    result["host"] = host_info(dev)
    log(f"importing his model from {src} (builds what is not built yet)")
    model_mod = import_his_model(src)
    result["build_s"] = time.perf_counter() - t0
    log(f"his model imported after {result['build_s']:.0f} s; building the {a.shape} step")
    step, n_params = build_step(model_mod, a, SHAPES[a.shape], dev)
    result["params"] = n_params
    result.update(measure(step, a, dev))
    result["status"] = "ok"
    log(f"{a.shape}: {result['tokens_per_s']:,.0f} tokens/s wall ({result['step_ms_median']:.1f} ms a step), "
        f"{result.get('tokens_per_s_kernel_bound', 0):,.0f} tokens/s kernel-bound "
        f"({result.get('gpu_kernel_ms_per_step', 0):.1f} ms of kernels, {result.get('kernels_per_step', 0):.0f} "
        "launches a step)")  # fmt: skip
    text = json.dumps(result, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
