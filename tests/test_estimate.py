"""int4ops.estimate: weight and KV-cache memory from a config, checked against hand-computed numbers."""

import json

import pytest

from conftest import shared_path
from int4ops import estimate as est_mod
from int4ops.estimate import ConfigError, estimate, main

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "rope_theta": 500000.0,
}


def row(est, group_size, sym):
    return next(r for r in est["int4"] if r["group_size"] == group_size and r["sym"] == sym)


def test_llama3_8b_against_hand_computed():
    e = estimate(LLAMA3_8B)
    # per layer: q, o 4096x4096; k, v 1024x4096; gate, up 14336x4096; down 4096x14336
    lin = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    embed = 128256 * 4096  # embed_tokens, and lm_head (untied) again
    norms = (2 * 32 + 1) * 4096
    assert e["params"] == lin + 2 * embed + norms == 8_030_261_248
    assert e["fp16_bytes"] == e["bf16_bytes"] == 2 * e["params"]
    # g128 asym: int32 qweight (K/2 bytes per row), fp16 scales (2 B per 128), uint8 zeros (1 B per 128)
    fp16_rest = 2 * (2 * embed + norms)  # embeddings, lm_head (skipped by default), norms
    assert row(e, 128, False)["bytes"] == lin // 2 + lin // 128 * 2 + lin // 128 + fp16_rest
    assert row(e, 128, True)["bytes"] == lin // 2 + lin // 128 * 2 + fp16_rest
    assert row(e, 32, False)["bytes"] == lin // 2 + lin // 32 * 3 + fp16_rest
    # per channel: one group per output row
    rows = 32 * (2 * 4096 + 2 * 1024 + 2 * 14336 + 4096)
    assert row(e, -1, False)["bytes"] == lin // 2 + rows * 3 + fp16_rest
    assert 5.3 < row(e, 128, False)["bytes"] / 2**30 < 5.4
    # KV cache: 2 (K and V) x 32 layers x 8 heads x 128 x 2 bytes x 1024 tokens = 128 MiB
    assert e["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 2 * 1024 == 128 * 2**20


def test_quantize_lm_head_option():
    keep = row(estimate(LLAMA3_8B), 128, False)["bytes"]
    quant = row(estimate(LLAMA3_8B, skip=()), 128, False)["bytes"]
    embed = 128256 * 4096
    assert keep - quant == 2 * embed - (embed // 2 + embed // 128 * 3)


def test_stories260k_counts_k_padding_and_tied_embeddings():
    e = estimate(shared_path("models", "stories260K"))  # a model directory
    d = e["dims"]
    assert (d["hidden"], d["intermediate"], d["kv_heads"], d["head_dim"], d["tie"]) == (64, 172, 4, 8, True)
    assert e["params"] == 512 * 64 + 11 * 64 + 5 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64)
    # g128 asym, per layer (N x K -> K_pad): q,o 64x64 -> 128; k,v 32x64 -> 128; gate,up 172x64 -> 128;
    # down 64x172 -> 256 (2 groups). bytes = K_pad/8*4*N + G*N*2 + G*N
    per_layer = 2 * (64 * 64 + 3 * 64) + 2 * (64 * 32 + 3 * 32) + 2 * (64 * 172 + 3 * 172) + (128 * 64 + 2 * 3 * 64)
    r = row(e, 128, False)
    assert r["quantized_bytes"] == 5 * per_layer
    assert r["fp16_bytes"] == 2 * (512 * 64 + 11 * 64)  # one tied embedding + norms; no separate lm_head
    assert "lm_head" not in e["kept_fp16"]
    assert e["kv_cache_bytes"] == 2 * 5 * 4 * 8 * 2 * 1024


def test_gpt2_config():
    cfg = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024,
           "n_inner": None}
    e = estimate(cfg)
    assert e["params"] == 124_439_808  # GPT-2 small
    assert e["dims"]["tie"] and e["dims"]["intermediate"] == 3072
    assert e["kv_cache_bytes"] == 2 * 12 * 768 * 2 * 1024


def test_qwen2_qkv_bias_and_mistral_defaults():
    base = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                num_hidden_layers=2, vocab_size=1000)
    q = estimate({**base, "model_type": "qwen2"})
    m = estimate({**base, "model_type": "mistral"})
    assert q["params"] - m["params"] == 2 * (512 + 128 + 128)  # q, k, v biases per layer
    assert not m["dims"]["tie"]  # mistral/llama/qwen2 default to untied embeddings
    hd = estimate({**base, "model_type": "qwen3", "head_dim": 128})  # head_dim != hidden / heads
    assert hd["dims"]["head_dim"] == 128
    assert hd["kv_cache_bytes"] == 2 * 2 * 2 * 128 * 2 * 1024


def test_errors_are_clear(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no model config"):
        estimate(tmp_path / "missing")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        estimate(tmp_path)
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        estimate(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected an object"):
        estimate(bad)
    assert main([str(tmp_path / "missing")]) == 2
    assert "no model config" in capsys.readouterr().err


def test_main_prints_table_and_json(tmp_path, capsys):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(LLAMA3_8B))
    assert main([str(p)]) == 0
    out = capsys.readouterr().out
    assert "int4 g128 asym" in out and "fp16 / bf16" in out and "KV cache" in out
    assert main([str(tmp_path), "--json", "--group-sizes", "128"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["group_size"] for r in data["int4"]] == [128, 128]
    assert main([str(p), "--group-sizes", "100"]) == 2


def test_cli_subcommand(tmp_path, capsys):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(LLAMA3_8B))
    cli = pytest.importorskip("int4ops.cli")
    assert cli.main(["estimate", str(p)]) == 0
    assert "int4 g128 asym" in capsys.readouterr().out
    assert est_mod.DEFAULT_GROUP_SIZES == (32, 64, 128, -1)
