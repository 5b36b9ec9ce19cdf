"""Model-level GPU tests: QuantLinear inside models under torch.compile(fullgraph=True) and
CUDA graphs, replace_linear peak GPU memory, loading straight onto the GPU, several GPUs."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import int4ops
from int4ops import QuantLinear, load_quantized, replace_linear, save_quantized

from conftest import rel_err

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")


class Block(nn.Module):
    """A Llama-style decoder block in plain PyTorch (attention + SwiGLU MLP), gpt-fast style."""

    def __init__(self, dim=1024, hidden=2816, heads=8):
        super().__init__()
        self.heads = heads
        self.wqkv, self.wo = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.n1, self.n2 = nn.RMSNorm(dim), nn.RMSNorm(dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.wqkv(self.n1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, d))
        h = self.n2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def blocks(dtype, n=2):
    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(n)]).to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_compile_fullgraph_matches_eager(dtype, tokens):
    model = blocks(dtype)
    replace_linear(model, group_size=128, progress=False)
    x = torch.randn(2, tokens, 1024, device="cuda", dtype=dtype)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert rel_err(compiled, eager) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_capture_and_replay(dtype):
    model = blocks(dtype)
    replace_linear(model, group_size=128, progress=False)
    static_x = torch.randn(1, 1, 1024, device="cuda", dtype=dtype)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm up (JIT compile) outside the capture
                model(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        for _ in range(3):  # fresh inputs each replay
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            torch.cuda.synchronize()
            assert rel_err(static_y, model(static_x)) < 1e-3


def hf_llama(dtype=torch.float16, device="cuda"):
    cfg = transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def test_hf_llama_on_gpu_matches_reference_backend_and_compiles():
    model = hf_llama()
    ids = torch.randint(0, 4096, (2, 33), device="cuda")
    replace_linear(model, group_size=128, progress=False)
    with torch.no_grad():
        fast = model(ids, use_cache=False).logits
        ref_model = copy.deepcopy(model)
        for m in ref_model.modules():
            if isinstance(m, QuantLinear):
                m.backend = "reference"
        ref = ref_model(ids, use_cache=False).logits
        assert rel_err(fast, ref) < 2e-3
        compiled = torch.compile(model, fullgraph=True)(ids, use_cache=False).logits
        assert rel_err(compiled, fast) < 2e-3


def test_replace_linear_peak_gpu_memory_below_1_25x_model():
    model = hf_llama()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    replace_linear(model, group_size=128, progress=False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    assert model_bytes + extra < 1.25 * model_bytes, (model_bytes, extra)


def test_load_quantized_straight_to_gpu(tmp_path):
    model = hf_llama(dtype=torch.float16, device="cpu")
    replace_linear(model, group_size=128, progress=False)
    save_quantized(model, tmp_path)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()  # what earlier tests in this process still hold
    loaded = load_quantized(tmp_path, device="cuda")
    int4_bytes = sum(t.numel() * t.element_size() for t in list(loaded.parameters()) + list(loaded.buffers()))
    fp16_bytes = sum(p.numel() * 2 for p in model.parameters()) + sum(m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, QuantLinear))
    peak = torch.cuda.max_memory_allocated() - start
    assert peak < 1.1 * int4_bytes + (8 << 20) < fp16_bytes, (peak, int4_bytes, fp16_bytes)  # never the fp16 weights
    assert all(t.is_cuda for t in loaded.state_dict().values())
    ids = torch.randint(0, 4096, (1, 17))
    with torch.no_grad():
        cpu = model(ids).logits  # reference backend on the CPU
        gpu = loaded(ids.cuda()).logits.cpu()
    assert rel_err(gpu.float(), cpu.float()) < 2e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_model_split_over_two_gpus():
    model = blocks(torch.float16, n=2)
    model[1].to("cuda:1")
    replace_linear(model, group_size=128, progress=False)
    assert model[1].w1.qweight.device == torch.device("cuda:1")
    x = torch.randn(1, 4, 1024, device="cuda:0", dtype=torch.float16)
    with torch.no_grad():
        y = model[1](model[0](x).to("cuda:1"))
    assert y.device == torch.device("cuda:1") and torch.isfinite(y).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_hf_device_map_over_two_gpus(tmp_path):
    pytest.importorskip("accelerate")
    src = hf_llama(dtype=torch.float16, device="cpu")
    src.save_pretrained(tmp_path / "fp16")
    split = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
             "model.layers.3": 1, "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp16", dtype=torch.float16, device_map=split
    ).eval()
    devices = {p.device for p in model.parameters()}
    assert devices == {torch.device("cuda:0"), torch.device("cuda:1")}, devices
    summary = replace_linear(model, group_size=128, progress=False)
    assert len(summary.replaced) == 4 * 7
    # each layer was quantized where its weight lives, and runs there
    assert {m.qweight.device for m in model.modules() if isinstance(m, QuantLinear)} == devices
    ids = torch.randint(0, 4096, (1, 9), device="cuda:0")
    with torch.no_grad():
        out = model(ids).logits.float().cpu()
        ref_model = copy.deepcopy(model)
        for m in ref_model.modules():
            if isinstance(m, QuantLinear):
                m.backend = "reference"
        ref = ref_model(ids).logits.float().cpu()
    assert rel_err(out, ref) < 2e-3
