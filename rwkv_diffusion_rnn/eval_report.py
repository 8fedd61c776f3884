"""Outputs of ``diffrwkv evaluate``: ``metrics.json``, ``report.md`` and PNG plots, each written atomically.

    paths = write_outputs(result.metrics, Path("outputs/eval"), run_dir=Path("outputs/rwkv_mmdit"))

* ``metrics.json`` -- everything :func:`rwkv_diffusion_rnn.evaluate.evaluate` measured (JSON, NaN as null);
* ``report.md`` -- tables with the floor, the model at every step count and the source text side by side, then
  example generations;
* ``loss_curves.png`` -- training curves from the run's ``metrics.jsonl`` (the trainer's JSON lines in
  ``logging.save_dir``), when that file exists;
* ``metrics_vs_steps.png`` -- round-trip and T2L metrics against sampling steps, when several were evaluated.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from rwkv_diffusion_rnn.data_io import atomic_write_bytes, atomic_write_json
from rwkv_diffusion_rnn.errors import DiffRwkvError

TRAIN_KEYS = ("loss", "text_loss", "latent_loss")
#: the trainer's validation (train_metrics.py); its metrics.jsonl from before 2026-12-06 holds the masked
#: cross-entropy as ``val_text_nelbo_bits`` (not a NELBO), plotted under the current name
VAL_KEYS = ("val_masked_ce_bits", "val_text_nelbo_bits", "val_latent_mse")
OLD_NAMES = {"val_text_nelbo_bits": "val_masked_ce_bits (logged as val_text_nelbo_bits)"}
#: (metrics key, label, decimals) of the round-trip table, in order
L2T_ROWS = (
    ("l2t_cosine", "round-trip cosine", 3),
    ("l2t_retrieval_top1", "retrieval top-1", 3),
    ("bleu", "BLEU", 1),
    ("chrf", "chrF", 1),
    ("exact_match", "exact match", 3),
    ("distinct_1", "distinct-1", 3),
    ("distinct_2", "distinct-2", 3),
    ("empty_fraction", "empty outputs (share)", 3),
)


def write_outputs(metrics: dict[str, Any], out: Path, run_dir: Path | None = None) -> dict[str, Path]:
    """Write every output into ``out`` (created); returns ``{name: path}`` of what was written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffRwkvError(f"{out}: cannot create the output folder ({exc.strerror})") from exc
    paths: dict[str, Path] = {}
    jsonl = run_dir / "metrics.jsonl" if run_dir is not None else None
    curves = read_metrics_jsonl(jsonl) if jsonl is not None and jsonl.is_file() else []
    if curves:
        paths["loss curves"] = out / "loss_curves.png"
        atomic_write_bytes(paths["loss curves"], plot_loss_curves(curves))
    if len(metrics["steps"]) > 1:
        paths["metrics vs steps"] = out / "metrics_vs_steps.png"
        atomic_write_bytes(paths["metrics vs steps"], plot_metrics_vs_steps(metrics))
    paths["metrics"] = out / "metrics.json"
    atomic_write_json(paths["metrics"], metrics)
    paths["report"] = out / "report.md"
    note = None if curves else f"no training curves: {jsonl} not found or empty"
    text = render_report(metrics, {k: v.name for k, v in paths.items() if v.suffix == ".png"}, note)
    atomic_write_bytes(paths["report"], text.encode("utf-8"))
    return paths


def read_metrics_jsonl(path: Path) -> list[dict[str, float]]:
    """The trainer's JSON lines (one object of numbers per logged step); unreadable lines are skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash mid-write
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                records.append(rec)
    return records


# ------------------------------------------------------------------------------------------------------------ plots


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; safe to call repeatedly
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(records: list[dict[str, float]]) -> bytes:
    """Training losses, and validation masked CE and latent MSE when logged, against the training step; PNG bytes."""
    plt = _pyplot()
    groups = {
        "training loss": TRAIN_KEYS,
        "validation masked CE, bits/masked token": VAL_KEYS[:2],
        "validation latent MSE": VAL_KEYS[2:],
    }
    panels = [p for p, keys in groups.items() if any(_finite(r.get(k)) for r in records for k in keys)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=False):
        for key in groups[panel]:
            pts = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=OLD_NAMES.get(key, key), marker="." if len(pts) < 30 else None)
        ax.set_xlabel("training step")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend()
    return _figure_bytes(fig)


def plot_metrics_vs_steps(metrics: dict[str, Any]) -> bytes:
    """Model metrics against sampling steps, the floor as a dashed line; PNG bytes."""
    plt = _pyplot()
    steps = metrics["steps"]
    panels = [
        ("l2t_cosine", "L2T round-trip cosine"),
        ("l2t_retrieval_top1", "L2T retrieval top-1"),
        ("chrf", "chrF"),
        ("t2l_cosine", "T2L cosine"),
    ]
    if metrics.get("sts"):
        panels.append(("sts_spearman", "STS-B Spearman (T2L)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        ys = [metrics["by_steps"][str(k)].get(key) for k in steps]
        ax.plot(steps, [math.nan if y is None else y for y in ys], marker="o", label="model")
        floor = metrics["floor"].get(key)
        if _finite(floor):
            ax.axhline(floor, linestyle="--", color="gray", label="floor")
        if key == "sts_spearman":
            ax.axhline(metrics["sts"]["encoder_spearman"], linestyle=":", color="green", label="encoder")
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("sampling steps")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _figure_bytes(fig)


# ----------------------------------------------------------------------------------------------------------- report


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _num(x: Any, ci: Any = None, decimals: int | None = None) -> str:
    """A number for a table: 3 decimals below 10, else 1 (or ``decimals``); with its 95% half-width if given."""
    if not _finite(x):
        return "n/a"
    d = decimals if decimals is not None else (1 if abs(x) >= 10 else 3)
    text = f"{x:.{d}f}"
    return f"{text} ± {ci:.3f}" if _finite(ci) and ci > 0 else text


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def render_report(metrics: dict[str, Any], plots: dict[str, str], note: str | None = None) -> str:
    """The markdown report of one evaluation (see the module docstring)."""
    m, steps = metrics, [str(k) for k in metrics["steps"]]
    lik, floor, src, by = m["likelihood"], m["floor"], m["source_text"], m["by_steps"]
    out = [f"# Evaluation: {m['checkpoint']} (training step {m['step']})", ""]
    out += [
        f"- data: `{m['data']}`, split `{m['split']}` ({m.get('split_source') or 'as trained'}); "
        f"{m['rows']} rows sampled (the first of the split); "
        f"seed {m['seed']}; device `{m['device']}`; {m['seconds']:.0f} s",
        f"- sampler options: L2T {m['l2t_options'] or 'defaults'}, T2L {m['t2l_options'] or 'defaults'}",
    ]
    if m["oracle_length"]:
        out.append(
            "- **oracle length**: the model was trained without `data.pad_to_length`, so L2T was given each "
            "target's true token length"
        )
    else:
        out.append(f"- L2T length chosen by the model (trained with `data.pad_to_length={m['pad_to_length']}`)")
    out += ["", "## Likelihood (validation, fixed noise)", ""]
    out += _table(
        ["measure", "model", "reference level"],
        [
            [
                "text NELBO, bits/token (latent given)",
                _num(lik["val_text_nelbo_bits"], decimals=3),
                f"{_num(lik['uniform_bits'], decimals=3)} (uniform prediction, log2 V)",
            ],
            [
                "latent MSE (text given)",
                _num(lik["val_latent_mse"]),
                f"{_num(lik['trivial_latent_mse'])} (trivial predictor, ignores the text)",
            ],
        ],
    )
    out.append(f"\n{lik['rows']} rows, {lik['tokens']} tokens.")
    out += ["", "## Latent -> text (round trip through the data's encoder)", ""]
    header = ["measure", "floor: random training sentence"] + [f"model, {k} steps" for k in steps]
    header.append("source text")
    rows = [
        [label, _num(floor.get(key), decimals=d)]
        + [_num(by[k].get(key), by[k].get(key + "_ci95"), d) for k in steps]
        + [_num(src.get(key), decimals=d)]
        for key, label, d in L2T_ROWS
    ]
    rows.append(["rows with pad/mask ids", "—"] + [str(by[k].get("special_token_rows")) for k in steps] + ["—"])
    rows.append(["L2T sentences/s", "—"] + [_num(by[k].get("l2t_sentences_per_s"), decimals=1) for k in steps] + ["—"])
    out += _table(header, rows)
    out.append(
        "\nRetrieval top-1: the re-encoded output's nearest target (cosine, among the rows above) is its own; "
        "ties count as misses. The source-text column checks the encoder: it should be ~1."
    )
    out += ["", "## Text -> latent", ""]
    header = ["measure", "floor"] + [f"model, {k} steps" for k in steps] + ["ceiling"]
    rows = [
        ["cosine to the true latent", _num(floor.get("t2l_cosine"))]
        + [_num(by[k].get("t2l_cosine"), by[k].get("t2l_cosine_ci95")) for k in steps]
        + ["1.000"]
    ]
    if m.get("sts"):
        rows.append(
            [f"STS-B Spearman ({m['sts']['pairs']} pairs)", "0 (expected)"]
            + [_num(by[k].get("sts_spearman")) for k in steps]
            + [f"{_num(m['sts']['encoder_spearman'])} (encoder, 32-d)"]
        )
    out += _table(header, rows)
    out += ["", f"## Examples ({steps[-1]} steps)", ""]
    out += _table(
        ["target", "generated", "floor"],
        [[_cell(e["target"]), _cell(e["generated"]), _cell(e["floor"])] for e in m["examples"]],
    )
    if plots or note:
        out += ["", "## Plots", ""]
        out += [f"![{name}]({file})" for name, file in plots.items()]
        if note:
            out.append(f"\n({note})")
    return "\n".join(out) + "\n"


def summary_line(metrics: dict[str, Any]) -> str:
    """One line: the headline numbers of the last step count beside the floor."""
    k = str(metrics["steps"][-1])
    r, f, lik = metrics["by_steps"][k], metrics["floor"], metrics["likelihood"]

    def fmt(x: Any, decimals: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{decimals}f}"

    return (
        f"step {metrics['step']}, {metrics['rows']} rows, {k} sampling steps: "
        f"L2T cos {fmt(r['l2t_cosine'])} (floor {fmt(f['l2t_cosine'])}), "
        f"R@1 {fmt(r['l2t_retrieval_top1'])} (floor {fmt(f['l2t_retrieval_top1'])}), "
        f"BLEU {fmt(r['bleu'], 1)}, T2L cos {fmt(r['t2l_cosine'])}, "
        f"NELBO {fmt(lik['val_text_nelbo_bits'])} bits/token"
    )
