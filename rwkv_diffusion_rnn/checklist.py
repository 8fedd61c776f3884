"""The regression checklist behind ``diffrwkv evaluate --checklist CKPT --data DIR``.

Each :class:`Check` has an id, a claim with its threshold, what a failure usually means, and the code that tests it.
:data:`CHECKS` is the single source of truth: the numbered list in ``eval_checklist.md`` (between the
``checks:begin`` / ``checks:end`` markers) is GENERATED from it, so the words a user reads and the thresholds the
code applies cannot drift apart. Thresholds are module constants interpolated into the claims. After changing a
check, regenerate the list::

    python -m rwkv_diffusion_rnn.checklist --write     # rewrite the block in eval_checklist.md
    python -m rwkv_diffusion_rnn.checklist --check     # exit 1 if the markdown is stale (tests run this too)

Why generate the markdown rather than parse it: a threshold parsed out of prose is fragile and untyped, and a check
needs code anyway; generating keeps one definition and the test ``test_checklist_markdown_in_sync`` fails the
moment someone edits one side only. Prose outside the markers is free text.

A check reports PASS or FAIL with a one-line detail (the measured numbers); a check whose prerequisite failed (the
checkpoint did not load) reports SKIP. The command exits 1 if any check is not PASS.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.eval_data import EvalData, Targets, encode_texts, resolve_data, take_targets
from rwkv_diffusion_rnn.evaluate import (
    EvalOptions,
    EvalResult,
    Sampler,
    collate_rows,
    default_sampler,
    evaluate,
    generate_l2t,
    generate_t2l,
    likelihood_metrics,
    pick_device,
    special_token_rows,
)
from rwkv_diffusion_rnn.metrics import cosine_rows
from rwkv_diffusion_rnn.pipeline import LoadedModel

COSINE_MARGIN = 0.05  # model cosine must exceed the floor's by this much (MiniLM PCA-32 floor: ~0.00)
RETRIEVAL_MARGIN = 0.05  # model retrieval top-1 must exceed the floor's by this much (floor ~ 1 / rows)
ENCODER_COSINE_MIN = 0.99  # source texts must re-encode to their stored latents
TEXT_DEPENDENCE_MIN = 1e-3  # median relative change of the latent prediction when one token changes
DEPENDENCE_ROWS = 8
REPRO_ROWS = 4
CHECKLIST_SAMPLES = 64  # default --num-samples of the checklist
CHECKLIST_ELBO_ROWS = 512  # default --elbo-rows of the checklist
MARKDOWN = Path(__file__).with_name("eval_checklist.md")
BEGIN = (
    "<!-- checks:begin: generated from rwkv_diffusion_rnn/checklist.py; edit there, then run "
    "python -m rwkv_diffusion_rnn.checklist --write -->"
)
END = "<!-- checks:end -->"


@dataclass
class CheckContext:
    """What checks read; the model, data and evaluation are computed once, on first use."""

    checkpoint: str
    data_dir: str | None
    opts: EvalOptions = field(default_factory=EvalOptions)
    sampler: Sampler | None = None
    _failure: DiffRwkvError | None = field(default=None, init=False, repr=False)

    @cached_property
    def model(self) -> LoadedModel:
        from rwkv_diffusion_rnn.pipeline import load_trained

        return load_trained(self.checkpoint, device=pick_device(self.opts.device))

    @cached_property
    def data(self) -> EvalData:
        return resolve_data(self.model, self.data_dir, self.opts.split, encoder_device=pick_device(self.opts.device))

    @cached_property
    def likelihood(self) -> dict:
        o = self.opts
        return likelihood_metrics(
            self.model,
            self.data.rows,
            batch_size=o.batch_size,
            max_rows=o.elbo_rows,
            device=pick_device(o.device),
            seed=o.seed,
            progress=o.progress,
        )

    @cached_property
    def result(self) -> EvalResult:
        """The evaluation (sampling included), reusing :attr:`likelihood`. A failure is remembered, so the checks
        that read it fail with the same message instead of running the whole evaluation again."""
        if self._failure is not None:
            raise self._failure
        try:
            return evaluate(self.model, self.data, self.opts, self.get_sampler(), likelihood=self.likelihood)
        except DiffRwkvError as exc:
            self._failure = exc
            raise

    def get_sampler(self) -> Sampler:
        return self.sampler or default_sampler()

    @property
    def row(self) -> dict:
        """Metrics at the last sampling-step count."""
        return self.result.metrics["by_steps"][str(self.opts.steps[-1])]


Outcome = tuple[bool, str]


@dataclass(frozen=True)
class Check:
    id: str
    claim: str  # what must hold, with its threshold (one sentence)
    failure: str  # what a failure usually means
    run: Callable[[CheckContext], Outcome]
    needs: tuple[str, ...] = ("loads",)


@dataclass
class CheckResult:
    id: str
    status: str  # PASS | FAIL | SKIP
    detail: str


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _loads(ctx: CheckContext) -> Outcome:
    import json

    m = ctx.model  # load_trained verifies every checkpoint file and a backbone file's sha256
    bb = json.loads((m.path / "meta.json").read_text(encoding="utf-8")).get("backbone")
    if not bb:
        return True, f"{m.path} (step {m.step}); backbone trained in the checkpoint"
    sha = bb.get("sha256")
    if sha and Path(bb["path"]).is_file():
        return True, f"{m.path} (step {m.step}); backbone {bb['path']} sha256 {sha[:12]}... matches"
    return True, f"{m.path} (step {m.step}); backbone {bb['path']} has no recorded file hash (folder): not verified"


def _encoder(ctx: CheckContext) -> Outcome:
    t = take_targets(ctx.data.rows, ctx.opts.num_samples)
    cos = float(np.mean(cosine_rows(encode_texts(ctx.data.encoder, t.texts, ctx.opts.batch_size), t.latents)))
    return cos >= ENCODER_COSINE_MIN, f"{len(t.texts)} source texts re-encode at mean cosine {cos:.4f}"


def _nelbo(ctx: CheckContext) -> Outcome:
    lik = ctx.likelihood
    v, u = lik["val_text_nelbo_bits"], lik["uniform_bits"]
    return v is not None and v < u, f"{_f(v)} bits/token vs uniform {_f(u)} ({lik['rows']} rows)"


def _latent_mse(ctx: CheckContext) -> Outcome:
    lik = ctx.likelihood
    v, triv = lik["val_latent_mse"], lik["trivial_latent_mse"]
    return v is not None and triv is not None and v < triv, f"{_f(v)} vs trivial predictor {_f(triv)}"


@torch.no_grad()
def _text_dependence(ctx: CheckContext) -> Outcome:
    m, rows, device = ctx.model, ctx.data.rows, pick_device(ctx.opts.device)
    n = min(DEPENDENCE_ROWS, len(rows))
    items = [rows[i] for i in range(n)]
    batch = {k: v.to(device) for k, v in collate_rows(m, items).items()}
    ids, attn = batch["input_ids"], batch["attention_mask"]
    pos = torch.tensor([len(it["input_ids"]) // 2 for it in items], device=device)
    changed = ids.clone()
    r = torch.arange(n, device=device)
    changed[r, pos] = ids[r, pos] % (m.denoiser.vocab_size - 1) + 1  # always a different real token
    g = torch.Generator().manual_seed(ctx.opts.seed)
    eps = torch.randn(n, m.normalizer.dim, generator=g).to(device)
    t_lat = torch.full((n,), 0.5, device=device)
    z_t = m.latent.q_sample(m.normalizer.normalize(batch["latent"]), t_lat, eps)
    zero = torch.zeros(n, device=device)
    a = m.denoiser(ids, attn, z_t, zero, t_lat).latent
    b = m.denoiser(changed, attn, z_t, zero, t_lat).latent
    rel = ((a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)).cpu().numpy()
    med = float(np.median(rel))
    return med >= TEXT_DEPENDENCE_MIN, f"median relative change {med:.3g} over {n} rows (one token changed each)"


def _margin(key: str, margin: float) -> Callable[[CheckContext], Outcome]:
    def run(ctx: CheckContext) -> Outcome:
        v, floor = ctx.row.get(key), ctx.result.metrics["floor"].get(key)
        ok = v is not None and floor is not None and v >= floor + margin
        return ok, f"{_f(v)} vs floor {_f(floor)} ({ctx.result.metrics['rows']} rows, {ctx.opts.steps[-1]} steps)"

    return run


def _special(ctx: CheckContext) -> Outcome:
    ids = ctx.result.samples[ctx.opts.steps[-1]]["ids"]
    bad = special_token_rows(ctx.model, ids)
    if not bad:
        return True, f"{len(ids)} samples, none with id 0 or >= {ctx.model.denoiser.vocab_size}"
    return False, f"{len(bad)} of {len(ids)} samples; first: row {bad[0]} ids {ids[bad[0]][:16]}"


def _reproducible(ctx: CheckContext) -> Outcome:
    m, t, k, dev = ctx.model, ctx.result.targets, ctx.opts.steps[-1], pick_device(ctx.opts.device)
    sub = Targets(t.texts[:REPRO_ROWS], t.tokens[:REPRO_ROWS], t.latents[:REPRO_ROWS])
    sampler = ctx.get_sampler()
    runs = [
        (
            generate_l2t(m, sampler, sub, num_steps=k, opts=ctx.opts, device=dev),
            generate_t2l(m, sampler, sub.tokens, num_steps=k, opts=ctx.opts, device=dev),
        )
        for _ in range(2)
    ]
    same_text, same_latent = runs[0][0] == runs[1][0], np.array_equal(runs[0][1], runs[1][1])
    return same_text and same_latent, (
        f"{len(sub.texts)} rows, seed {ctx.opts.seed}: L2T ids "
        f"{'identical' if same_text else 'DIFFER'}, T2L latents "
        f"{'identical' if same_latent else 'DIFFER'}"
    )


CHECKS: tuple[Check, ...] = (
    Check(
        "loads",
        "The checkpoint loads: every file matches the sha256 in its meta.json, and a backbone file it "
        "references still has the sha256 recorded at training.",
        "a truncated or edited checkpoint, or the backbone .pth was replaced since training.",
        _loads,
        (),
    ),
    Check(
        "encoder_consistent",
        f"The data's LatentEncoder re-encodes the source texts to their stored latents: "
        f"mean cosine >= {ENCODER_COSINE_MIN}.",
        "--data points at another encoder or projection than the latents were made with; every round-trip "
        "number is then meaningless.",
        _encoder,
    ),
    Check(
        "nelbo",
        "Validation text NELBO (bits/token, latent given, fixed noise) is finite and below log2(V), "
        "the cost of a uniform prediction (16 bits for the RWKV World vocabulary of 65,536 ids).",
        "the text head did not train (or diverged).",
        _nelbo,
    ),
    Check(
        "latent_mse",
        "Validation latent MSE (text given, fixed noise) is below the MSE of the trivial "
        "predictor that ignores the text (the linear estimate of the target from the noisy latent alone).",
        "the latent head does not use the text.",
        _latent_mse,
    ),
    Check(
        "t2l_text_dependence",
        f"Changing one token changes the text->latent prediction: median relative change "
        f"of the latent output >= {TEXT_DEPENDENCE_MIN:g} over {DEPENDENCE_ROWS} rows (t_latent = 0.5).",
        "the latent is read where the text is not visible (e.g. from the prefix), or the latent head is still "
        "at its zero initialisation.",
        _text_dependence,
    ),
    Check(
        "t2l_cosine",
        f"T2L cosine to the true latent beats the floor (a random training sentence's latent) by >= {COSINE_MARGIN}.",
        "text->latent generation ignores the text or did not train.",
        _margin("t2l_cosine", COSINE_MARGIN),
    ),
    Check(
        "l2t_cosine",
        f"L2T round-trip cosine (generated text re-encoded) beats the random-training-sentence "
        f"floor by >= {COSINE_MARGIN}.",
        "latent->text generation ignores the latent.",
        _margin("l2t_cosine", COSINE_MARGIN),
    ),
    Check(
        "l2t_retrieval",
        f"L2T retrieval top-1 among the evaluated rows beats the floor by >= {RETRIEVAL_MARGIN}.",
        "generations are generic: they do not single out their own latent.",
        _margin("l2t_retrieval_top1", RETRIEVAL_MARGIN),
    ),
    Check(
        "no_special_tokens",
        "No L2T sample holds pad / end-of-text (id 0), <mask> (id V) or an id outside the vocabulary.",
        "the sampler leaves masks behind or does not cut at end-of-text.",
        _special,
    ),
    Check(
        "reproducible",
        f"Sampling twice with the same seed gives identical L2T token ids and T2L latents ({REPRO_ROWS} rows).",
        "a sampler draws from an unseeded generator.",
        _reproducible,
    ),
)


def run_checklist(ctx: CheckContext, checks: Sequence[Check] | None = None) -> list[CheckResult]:
    """Run ``checks`` (default :data:`CHECKS`) in order. A check raising a DiffRwkvError FAILs with its message;
    one whose ``needs`` did not PASS is SKIPped."""
    results: list[CheckResult] = []
    status: dict[str, str] = {}
    for check in CHECKS if checks is None else checks:
        missing = [n for n in check.needs if status.get(n) != "PASS"]
        if missing:
            results.append(CheckResult(check.id, "SKIP", f"needs {', '.join(missing)}"))
        else:
            try:
                ok, detail = check.run(ctx)
                results.append(CheckResult(check.id, "PASS" if ok else "FAIL", detail))
            except DiffRwkvError as exc:
                results.append(CheckResult(check.id, "FAIL", str(exc)))
        status[check.id] = results[-1].status
    return results


# ------------------------------------------------------------------------------------------------ markdown sync


def render_checks(checks: Sequence[Check] = CHECKS) -> str:
    """The generated numbered list (what sits between the markers in eval_checklist.md)."""
    items = [(f"{i}. ", c) for i, c in enumerate(checks, 1)]
    return "\n".join(f"{n}**`{c.id}`**: {c.claim}\n{' ' * len(n)}*If it fails:* {c.failure}" for n, c in items)


def listed_ids(markdown: str) -> list[str]:
    """The check ids listed between the markers of ``markdown`` (in order)."""
    return re.findall(r"^\d+\. \*\*`([a-z0-9_]+)`\*\*", _block(markdown), flags=re.M)


def _block(markdown: str) -> str:
    try:
        start = markdown.index(BEGIN) + len(BEGIN)
        return markdown[start : markdown.index(END, start)]
    except ValueError:
        raise DiffRwkvError(f"{MARKDOWN}: the checks:begin / checks:end markers are missing") from None


def synced_markdown(markdown: str) -> str:
    """``markdown`` with the block between the markers replaced by :func:`render_checks`."""
    block = _block(markdown)
    return markdown.replace(BEGIN + block + END, f"{BEGIN}\n{render_checks()}\n{END}", 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m rwkv_diffusion_rnn.checklist", description="Keep eval_checklist.md's list in sync with CHECKS."
    )
    ap.add_argument("--write", action="store_true", help="rewrite the generated block of eval_checklist.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if the generated block is stale")
    args = ap.parse_args(argv)
    text = MARKDOWN.read_text(encoding="utf-8")
    new = synced_markdown(text)
    if args.write and new != text:
        from rwkv_diffusion_rnn.data_io import atomic_write_bytes

        atomic_write_bytes(MARKDOWN, new.encode("utf-8"))
        print(f"rewrote the check list in {MARKDOWN}")
        return 0
    if new != text:
        print(f"{MARKDOWN} is stale; run python -m rwkv_diffusion_rnn.checklist --write", file=sys.stderr)
        return 1
    print(f"{MARKDOWN} is in sync ({len(CHECKS)} checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
