"""A newcomer's first hour: README section 3's practice walkthrough runs as written, and the help and errors a new
user meets point the way (did you mean, the hub's .pth repos, no path outside the repository in any help text).

The walkthrough's commands are read out of README.md (its first ``bash`` block under "### 3. Training"), so the
README and this test cannot drift apart. They run in a temporary folder standing in for a fresh clone after the
demo: ``outputs/demo/data`` is built here the demo's way, only smaller (corpus sentences, prepare-latents, tokens)
and with the tests' fast hash encoder in place of MiniLM.
"""

from __future__ import annotations

import re
import shlex
import sys

import pytest

from rwkv_diffusion_rnn import cli
from tests.data_helpers import REPO

README = REPO / "README.md"


def section(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    nxt = text.find("\n### ", start + len(heading))
    return text[start : nxt if nxt > 0 else len(text)]


def bash_commands(block_source: str) -> list[str]:
    """The commands of the first ```bash block: continuation lines joined, comments and blank lines dropped."""
    block = re.search(r"```bash\n(.*?)```", block_source, re.S)
    assert block, "no bash block"
    joined = re.sub(r"\\\n\s*", " ", block[1])
    return [line for line in (shlex.join(shlex.split(x, comments=True)) for x in joined.splitlines()) if line]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build_demo_data(root) -> None:
    """``root/outputs/demo/data``: what ``diffrwkv demo`` writes there (qwen_32d/ with train + validation and the
    encoder, rwkv_tokens/), from 96 corpus sentences and the hash encoder."""
    from rwkv_diffusion_rnn.corpus import generate
    from rwkv_diffusion_rnn.preprocess_tokenize_text import tokenize_json

    data = root / "outputs" / "demo" / "data"
    src = root / "corpus.txt"
    src.write_text("\n".join(generate(96, seed=5)) + "\n")
    args = ["prepare-latents", "--input", str(src), "--output_dir", str(data / "qwen_32d"), "--encoder", "test-hash",
            "--validation-fraction", "0.25"]  # fmt: skip
    assert cli.main(args) == 0
    for split in ("train", "validation"):
        tokenize_json(data / "qwen_32d" / f"{split}_data.json", data / "rwkv_tokens", max_length=64)


@pytest.mark.slow
def test_readme_training_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    commands = bash_commands(section("### 3. Training"))
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # diffrwkv train hands Hydra its arguments through sys.argv
    assert [c.split()[:2] for c in commands] == [["diffrwkv", "smoke"], ["diffrwkv", "train"],
                                                  ["diffrwkv", "sample"], ["diffrwkv", "evaluate"]]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build_demo_data(tmp_path)
    capsys.readouterr()
    outputs = []
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv[0] == "train":
            argv.append("logging.progress=false")  # the one addition: no progress bar in the test log
        rc = cli.main(argv)
        cap = capsys.readouterr()
        assert rc == 0, f"{command}\n{cap.out[-2000:]}\n{cap.err[-2000:]}"
        outputs.append(cap.out + cap.err)
    ckpt = re.search(r"checkpoint written to (\S+)", outputs[1])
    assert ckpt, outputs[1][-2000:]
    assert (tmp_path / ckpt[1]).is_dir() and ckpt[1] == "outputs/practice/step_00000040"
    assert "diffrwkv sample --checkpoint outputs/practice --data outputs/demo/data" in outputs[1]
    assert "diffrwkv evaluate --checkpoint outputs/practice --data outputs/demo/data" in outputs[1]
    assert len([line for line in outputs[2].splitlines() if line.startswith("{")]) == 4  # four decoded rows
    assert "L2T cos" in outputs[3] and (tmp_path / "outputs" / "practice" / "eval").is_dir()

    # text -> latent -> text in two commands, no glue; T2L compares with the data's encoder found from the checkpoint
    to_latent = ["sample", "--checkpoint", "outputs/practice", "--text", "A dog runs.", "--out", "z.jsonl"]
    assert cli.main([*to_latent, "--no-progress"]) == 0
    assert "cosine to the data's encoder (outputs/demo/data/qwen_32d)" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint", "outputs/practice", "--latents", "z.jsonl", "--no-progress"]) == 0
    assert '"text"' in capsys.readouterr().out


def test_readme_walkthrough_without_the_demo_data_stops_in_one_line(tmp_path, monkeypatch, capsys):
    """Run before the demo (no outputs/), the walkthrough's training command says in one line what is missing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train = shlex.split(bash_commands(section("### 3. Training"))[1])[1:]
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    assert run_cli(train) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "outputs/" in err, err


def run_cli(argv: list[str]) -> int:
    """``diffrwkv ...`` in this process: its exit status, whether returned or raised (argparse, Hydra)."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["sampel"], "did you mean sample?"),
        (["sample", "--checkpoint", "x", "--data", "y", "--temprature", "0"], "did you mean --temperature?"),
        (["sample", "--checkpoint", "x", "--data", "y", "--preset", "varyed"], "did you mean 'varied'?"),
        (["evaluate", "--checkpoint", "x", "--num-sampels", "3"], "did you mean --num-samples?"),
        (["train", "training.num_epoch=1"], "did you mean training.num_epochs?"),
        (["train", "model.rwkv_filname=x.pth"], "did you mean model.rwkv_filename?"),
        (["train", "num_epochs=1"], "did you mean training.num_epochs?"),
    ],
)
def test_near_misses_get_a_did_you_mean(argv, needle, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "error" in err, err


def test_config_did_you_mean():
    from rwkv_diffusion_rnn.config import did_you_mean

    assert did_you_mean("training.num_epoch") == "training.num_epochs"
    assert did_you_mean("model.rwkv_filname") == "model.rwkv_filename"
    assert did_you_mean("data.pad_to_length") is None  # a real key
    assert did_you_mean("completely.unrelated") is None


def test_hub_error_for_a_pth_repo_names_rwkv_filename(monkeypatch):
    from rwkv_diffusion_rnn.errors import DiffRwkvError
    from rwkv_diffusion_rnn.pretrained_rwkv import resolve_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffRwkvError) as exc:
        resolve_checkpoint("BlinkDL/rwkv7-g1")
    msg = str(exc.value)
    assert "model.rwkv_filename" in msg and "\n" not in msg


def test_no_help_text_shows_a_path_outside_the_repository(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    for verb in cli.VERBS:
        assert run_cli([verb, "--help"]) == 0, verb
        out = capsys.readouterr().out
        assert out.strip() and "../" not in out, f"diffrwkv {verb} --help: {out}"
