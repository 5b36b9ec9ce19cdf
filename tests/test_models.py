"""Whole models: replace_linear on Hugging Face models, save/load, peak memory, a real model."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import int4ops
from int4ops import CheckpointError, QuantLinear, dequantize, load_quantized, replace_linear, save_quantized

from conftest import REPO, shared_path

transformers = pytest.importorskip("transformers")


def tiny_llama(tie=False, dtype=torch.float32):
    cfg = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def test_replace_linear_swaps_everything_but_lm_head():
    model = tiny_llama(dtype=torch.float16)
    summary = replace_linear(model, group_size=128, progress=False)
    assert len(summary.replaced) == 2 * 7
    assert summary.skipped == {"lm_head": "in skip list"}
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)  # K = 344: padded last group
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    # fp16 -> int4 at group 128: 16 bits -> 4 + (16 + 8) / 128 bits per weight.
    assert summary.ratio >= 3.5
    assert "replaced 14 linear layers" in str(summary)


def test_quantized_logits_equal_fake_quant_and_stay_near_original():
    model = tiny_llama()
    ref = logits(model, IDS)
    fake = copy.deepcopy(model)  # the same model with each weight replaced by its dequantized self
    replace_linear(model, group_size=128, progress=False)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            fake.get_submodule(name).weight.data = dequantize(m.weight_int4)
    out = logits(model, IDS)
    assert ((out - logits(fake, IDS)).norm() / out.norm()) < 1e-5  # the machinery adds nothing
    # Stated bound for RTN g128 on this random-weight model (measured ~0.1).
    assert ((out - ref).norm() / ref.norm()) < 0.25


def test_skip_patterns_and_tied_weights():
    model = tiny_llama(tie=True)
    summary = replace_linear(model, group_size=64, skip=("*.self_attn.o_proj",), progress=False)
    assert summary.skipped["lm_head"] == "weight is shared with another module (tied)"
    assert set(n for n in summary.skipped if n.endswith("o_proj")) == {f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    assert len(summary.replaced) == 2 * 6


@pytest.mark.parametrize("tie,gs,sym", [(False, 128, False), (True, 32, True), (False, -1, False)])
def test_save_load_round_trip_is_bit_identical(tmp_path, tie, gs, sym):
    model = tiny_llama(tie=tie)
    replace_linear(model, group_size=gs, sym=sym, progress=False)
    save_quantized(model, tmp_path)
    assert {"config.json", "model.safetensors", "int4ops_config.json"} <= set(os.listdir(tmp_path))
    loaded = load_quantized(tmp_path)
    assert torch.equal(logits(model, IDS), logits(loaded, IDS))
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_sharded_save(tmp_path):
    model = tiny_llama()
    replace_linear(model, progress=False)
    save_quantized(model, tmp_path, max_shard_bytes=100_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    assert torch.equal(logits(model, IDS), logits(load_quantized(tmp_path), IDS))


def test_load_never_materialises_full_precision_weights(tmp_path, monkeypatch):
    model = tiny_llama()
    replace_linear(model, progress=False)
    save_quantized(model, tmp_path)
    sizes = []
    real_linear_init = torch.nn.Linear.__init__

    def spy(self, *a, **k):
        real_linear_init(self, *a, **k)
        sizes.append(self.weight.device.type)

    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    load_quantized(tmp_path)
    assert sizes and set(sizes) == {"meta"}


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    model = tiny_llama()
    replace_linear(model, group_size=64, progress=False)
    save_quantized(model, tmp_path)
    st = tmp_path / "model.safetensors"
    good = st.read_bytes()

    st.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
    with pytest.raises(CheckpointError, match="corrupt"):
        load_quantized(tmp_path)
    st.write_bytes(b"\x00" * 64)  # garbage header, checksum skipped
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_quantized(tmp_path, verify=False)
    st.write_bytes(good)

    cfg_path = tmp_path / "int4ops_config.json"
    cfg = json.loads(cfg_path.read_text())
    bad = copy.deepcopy(cfg)
    bad["modules"]["model.layers.0.mlp.up_proj"]["group_size"] = 32  # the tensors say 64
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_quantized(tmp_path)
    bad = copy.deepcopy(cfg)
    bad["modules"]["model.layers.9.mlp.up_proj"] = bad["modules"]["model.layers.0.mlp.up_proj"]
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="does not have"):
        load_quantized(tmp_path)
    bad = copy.deepcopy(cfg)
    bad["format_version"] = 99
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_quantized(tmp_path)
    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(tmp_path)
    cfg_path.unlink()
    with pytest.raises(CheckpointError, match="int4ops_config.json is missing"):
        load_quantized(tmp_path)


def test_save_refuses_unquantized_model(tmp_path):
    with pytest.raises(ValueError, match="replace_linear"):
        save_quantized(tiny_llama(), tmp_path)


def test_gpt2_conv1d_model(tmp_path):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = IDS % 128
    ref = logits(model, ids)
    summary = replace_linear(model, group_size=32, progress=False)
    assert len(summary.replaced) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    out = logits(model, ids)
    assert ((out - ref).norm() / ref.norm()) < 0.25
    save_quantized(model, tmp_path)
    assert torch.equal(out, logits(load_quantized(tmp_path), ids))


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, torch, transformers, int4ops
    torch.set_num_threads(1)
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, vocab_size=1024)
    torch.set_default_dtype(torch.float16)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    start = status("VmRSS:")  # the model, plus whatever Python and the imports hold
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    int4ops.replace_linear(model, group_size=128, progress=False)
    print(json.dumps({"model_bytes": model_bytes, "peak_extra": status("VmHWM:") - start}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read peak RSS")
def test_replace_linear_peak_memory_below_1_25x_model():
    # A fresh process with a fixed mmap threshold, so freed weights go back to the OS at once
    # and the peak RSS is what replace_linear really holds at its worst moment.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    # Peak = the model + what replace_linear adds on top at its worst moment (measured ~0.15x).
    assert r["model_bytes"] + r["peak_extra"] < 1.25 * r["model_bytes"], r


def stories(dtype=torch.float32):
    path = shared_path("models", "stories260K")
    return path, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def perplexity(model, ids, windows=8, length=512):
    nll = 0.0
    for i in range(windows):
        w = ids[i * length : (i + 1) * length][None]
        with torch.no_grad():
            nll += model(w, labels=w).loss.item()
    return float(torch.exp(torch.tensor(nll / windows)))


def test_real_model_stories260k_quality_and_round_trip(tmp_path):
    path, model = stories()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = shared_path("data", "wikitext-2-raw", "wiki.test.raw").read_text()
    ids = tok(text[:200_000], return_tensors="pt").input_ids[0]
    ppl_fp = perplexity(model, ids)
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False)

    summary = replace_linear(model, group_size=32, progress=False)
    assert "model.layers.0.mlp.down_proj" in summary.replaced  # K = 172: no group size divides it
    ppl_q = perplexity(model, ids)
    assert ppl_q < 1.2 * ppl_fp, (ppl_fp, ppl_q)  # measured: 123.4 -> 137.7 over 40 windows
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), greedy)

    save_quantized(model, tmp_path, tokenizer=tok)
    loaded = load_quantized(tmp_path)
    assert torch.equal(logits(model, ids[None, :64]), logits(loaded, ids[None, :64]))


def test_skip_accepts_a_single_name():
    model = tiny_llama()
    summary = replace_linear(model, skip="lm_head", progress=False)
    assert "lm_head" in summary.skipped and "lm_head" not in summary.replaced


def test_ties_not_declared_by_the_config_survive_save_load(tmp_path):
    model = tiny_llama(tie=False)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied by hand
    replace_linear(model, progress=False)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(model, IDS), logits(loaded, IDS))


def test_resave_removes_stale_shards(tmp_path):
    model = tiny_llama()
    replace_linear(model, progress=False)
    save_quantized(model, tmp_path, max_shard_bytes=100_000)
    save_quantized(model, tmp_path)
    assert [p.name for p in tmp_path.glob("model*.safetensors*")] == ["model.safetensors"]
    assert torch.equal(logits(model, IDS), logits(load_quantized(tmp_path), IDS))


def test_failed_save_keeps_the_previous_checkpoint_and_user_files(tmp_path):
    model = tiny_llama()
    replace_linear(model, progress=False)
    save_quantized(model, tmp_path)
    (tmp_path / "model_fp16_backup.safetensors").write_bytes(b"mine")
    broken = copy.deepcopy(model)
    broken.model.norm.weight = torch.nn.Parameter(torch.empty(128, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        save_quantized(broken, tmp_path)
    assert torch.equal(logits(model, IDS), logits(load_quantized(tmp_path), IDS))
    save_quantized(model, tmp_path, max_shard_bytes=100_000)  # a new layout replaces the old one
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "model_fp16_backup.safetensors").read_bytes() == b"mine"
    assert not list(tmp_path.glob(".*.tmp"))
