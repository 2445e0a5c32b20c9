"""Bad input to train.py: each case is one `error: ...` line on stderr and exit status 1.

Cases: teacher and student vocabularies that differ beyond padding (while a special placeholder
token past the models' rows, as in Gemma 3's tokenizer, trains, and data that spells it out is
refused), tokenizers that differ,
an empty dataset, a malformed JSONL line, a missing file, an unknown setting, a non-finite
loss (stops, keeps the last good checkpoint, says which), `resume` with no checkpoint, and a
fresh run into a directory that already holds checkpoints. One case runs `train.py` as a
subprocess to check the real exit status and the absence of a traceback; the others call
`train.cli` in this process (the same code path, without another interpreter start).

Run: .venv/bin/python -m pytest -q tests/test_train_errors.py
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import TINY_VOCAB_SIZE, make_tiny_tokenizer

import train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("errors")
    teacher = make_tiny_checkpoint(d / "teacher", "llama", vocab_size=TINY_VOCAB_SIZE)
    make_tiny_tokenizer(teacher)
    data = d / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"The river rises {i} times."}) + "\n" for i in range(8))
    )
    return {"dir": d, "teacher": teacher, "data": data}


def fails(argv: list[str], capsys) -> str:
    """Run train.cli; return its one stderr line after checking the status and the format."""
    capsys.readouterr()  # drop what the fixtures printed (transformers' progress bars)
    assert train.cli(argv) == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def base(assets: dict[str, Path], **settings: str) -> list[str]:
    values = {
        "teacher": assets["teacher"],
        "student_layers": "0",
        "data": assets["data"],
        "out": assets["dir"] / "run",
        "max_steps": 2,
        "batch_size": 2,
        "seq_len": 32,
        "precision": "fp32",
        **settings,
    }
    return [f"--{k}={v}" for k, v in values.items()]


def test_unknown_setting_exits_1_in_one_line_without_traceback(assets):
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *base(assets), "--learning_rate=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "error: unknown setting '--learning_rate'; run `train.py --help` for the list"
    )


def test_vocabularies_that_differ_beyond_padding(assets, capsys):
    small = make_tiny_checkpoint(assets["dir"] / "small_vocab", "llama", vocab_size=256)
    line = fails(base(assets, student_layers="", student=small), capsys)
    assert "512 tokens" in line and "vocab_size 256" in line


def test_tokenizers_that_differ(assets, capsys):
    other = make_tiny_checkpoint(assets["dir"] / "other_tok", "llama", vocab_size=TINY_VOCAB_SIZE)
    make_tiny_tokenizer(other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids: same text, other ids
    (other / "tokenizer.json").write_text(json.dumps(spec))
    line = fails(base(assets, student_layers="", student=other), capsys)
    assert f"tokenizer of {other} differs" in line


@pytest.mark.parametrize(
    "content, words",
    [
        ("", "the file is empty"),
        ('{"text": "fine"}\n{"text": "broken"\n', ":2: not a valid UTF-8 JSON line"),
    ],
)
def test_bad_data_files(assets, capsys, content, words, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert words in fails(base(assets, data=path), capsys)


def test_missing_files(assets, capsys):
    assert "nope.jsonl" in fails(base(assets, data=assets["dir"] / "nope.jsonl"), capsys)
    assert "no tokenizer.json" in fails(base(assets, teacher=assets["dir"] / "no_teacher"), capsys)


def test_resume_without_checkpoint(assets, capsys, tmp_path):
    assert "no complete checkpoint" in fails(
        base(assets, out=tmp_path / "fresh", resume="true"), capsys
    )


def test_non_finite_loss_keeps_last_good_checkpoint_then_new_run_is_refused(
    assets, capsys, tmp_path
):
    out = tmp_path / "diverged"
    # lr 1e30: the first update blows the weights up; step 2's gradients are NaN.
    line = fails(
        base(
            assets,
            out=out,
            lr="1e30",
            warmup_steps="0",
            save_every="1",
            max_steps="5",
            log_every="5",
        ),
        capsys,
    )
    assert (
        "not finite" in line
        and f"last good checkpoint: {out / 'checkpoints' / 'step_000001'}" in line
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]
    assert "already holds checkpoints" in fails(base(assets, out=out), capsys)


def test_special_tokens_past_the_embeddings_train_unless_the_data_spells_them(
    assets, capsys, tmp_path
):
    """Gemma 3's case: the tokenizer has one more token (a special placeholder) than the models
    have rows. Training runs; a data file that spells the token out is one error line."""
    from tokenizers import Tokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(assets["teacher"], teacher)
    tok = Tokenizer.from_file(str(teacher / "tokenizer.json"))
    tok.add_special_tokens(["<image_soft_token>"])
    assert tok.get_vocab_size(with_added_tokens=True) == TINY_VOCAB_SIZE + 1
    tok.save(str(teacher / "tokenizer.json"))
    capsys.readouterr()
    assert train.cli(base(assets, teacher=teacher, out=tmp_path / "run")) == 0
    spelled = tmp_path / "spelled.jsonl"
    spelled.write_text(json.dumps({"text": "a picture: <image_soft_token> of a river"}) + "\n")
    line = fails(base(assets, teacher=teacher, data=spelled, out=tmp_path / "run2"), capsys)
    assert f"{spelled}: example 1" in line and "'<image_soft_token>' (id 512)" in line
