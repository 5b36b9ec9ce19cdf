"""The int4ops command: the no-argument demo, quantize, info."""

import pytest
import torch

from int4ops import load_quantized
from int4ops.cli import main

from conftest import shared_path

transformers = pytest.importorskip("transformers")


def test_demo_runs_with_no_arguments_and_reports(capsys):
    assert main(["--tokens", "32", "--decode-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights from seed 0" in out
    assert "replaced 28 linear layers" in out
    rel = float(out.split("relative Frobenius error ")[1].split(",")[0])
    assert 0 < rel < 0.6
    for piece in ("backend: reference for the 32-token prefill", "prefill 32 tokens", "decode, batch 1", "MiB ->"):
        assert piece in out


def test_quantize_command_round_trip(tmp_path, capsys):
    src = shared_path("models", "stories260K")
    dst = tmp_path / "q"
    assert main(["quantize", str(src), str(dst), "--group-size", "64", "--device", "cpu", "--dtype", "float32"]) == 0
    assert "replaced 35 linear layers" in capsys.readouterr().out
    model = load_quantized(dst)
    tok = transformers.AutoTokenizer.from_pretrained(dst)  # the tokenizer travels with the model
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "cuda library" in out


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["demo", "--group-size", "7", "--tokens", "8"]) == 2
    assert "group_size must be one of" in capsys.readouterr().err


def test_options_before_the_demo_word_are_kept(capsys):
    assert main(["--group-size", "64", "--sym", "demo", "--tokens", "8", "--decode-steps", "1"]) == 0
    assert "group 64, symmetric" in capsys.readouterr().out


def test_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "int4ops: error:" in capsys.readouterr().err
