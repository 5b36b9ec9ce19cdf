"""End-to-end Llama benchmarks: fp16 vs int4ops on Llama-3-8B and int4 on Llama-3-70B shapes.

    python -m bench.e2e --model 8b                # fp16, then int4ops.replace_linear in place; ~1-2 min
    python -m bench.e2e --model 70b               # int4 weights created directly (never fp16), one 80 GB GPU
    python -m bench.e2e --model tiny --device cpu # dry run of the same code paths on CPU

Models are Hugging Face ``LlamaForCausalLM`` built from a config with random weights (no
download), so the numbers are speed and memory, not quality. Full depth, always: ``--layers``
exists only for debugging and marks the run as not a headline number.

Measured per model and weights:
  weights GiB   torch.cuda.memory_allocated() after the model is built (and quantized)
  peak GiB      torch.cuda.max_memory_allocated() while prefilling and decoding
  prefill       tokens/s of one forward over ``--prefill-len`` tokens (batch 1, CUDA events, median of 3)
  decode        tokens/s at each batch size: a manual greedy decode loop over a Hugging Face
                StaticCache; one decode step (forward, argmax, feed back) is captured in a CUDA
                graph and replayed ``--decode-steps`` times between two CUDA events. If capture
                fails, eager steps are timed instead and the run says so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import common

log = logging.getLogger("bench")

LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
CONFIGS = {
    "8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
    "tiny": dict(vocab_size=1024, max_position_embeddings=2048, hidden_size=256, intermediate_size=688,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
# 8b: fp16 then int4 via replace_linear; 70b: int4 only, built directly in int4.
DEFAULT_WEIGHTS = {"8b": "fp16,int4", "70b": "int4", "tiny": "fp16,int4"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="8b", choices=sorted(CONFIGS))
    p.add_argument("--weights", default=None, help="comma list of fp16 (dense, in --dtype) and int4 "
                   "(default: 8b fp16,int4; 70b int4)")
    p.add_argument("--device", default=None)
    p.add_argument("--batches", default="1,16", help="decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens before decoding")
    p.add_argument("--decode-steps", type=int, default=128, help="timed decode steps per batch size")
    p.add_argument("--prefill-len", type=int, default=2048, help="tokens in the prefill measurement (0 = skip)")
    p.add_argument("--cache-len", type=int, default=None, help="static KV-cache slots (default prompt + steps + 8, "
                   "rounded up to 64)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="model/activation dtype")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--backend", default="auto", help="int4ops backend for QuantLinear (auto/triton/cuda/reference)")
    p.add_argument("--no-graph", action="store_true", help="time eager decode steps instead of a CUDA graph")
    p.add_argument("--layers", type=int, default=None, help="DEBUG ONLY: fewer layers (the run is flagged, not a headline)")
    p.add_argument("--out", default=None, help="JSON path; an existing e2e JSON there gets this run appended")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.weights = [w.strip() for w in (args.weights or DEFAULT_WEIGHTS[args.model]).split(",") if w.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    for w in args.weights:
        if w not in ("fp16", "int4"):
            p.error(f"--weights takes fp16 and/or int4, got {w!r}")
    if args.cache_len is None:
        args.cache_len = -(-(args.prompt_len + args.decode_steps + 8) // 64) * 64
    return args


def llama_config(name: str, layers: int | None = None):
    from transformers import LlamaConfig

    kw = dict(CONFIGS[name])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_dense(cfg, device, dtype):
    """The fp16 model, created directly on the device (random init, no download)."""
    from transformers import LlamaForCausalLM

    with default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.eval()


def build_int4_direct(cfg, device, dtype, group_size, sym, backend):
    """An int4 model whose linear weights never exist in 16 bits: build on the meta device, swap
    every nn.Linear but lm_head for an (empty, meta) QuantLinear, materialise everything on the
    device once, then fill with random codes/scales/zeros. lm_head and embeddings stay 16-bit,
    as replace_linear leaves them."""
    from transformers import LlamaForCausalLM

    from int4ops.nn import QuantLinear

    with default_dtype(dtype), torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.split(".")[-1] != "lm_head":
            q = QuantLinear(mod.in_features, mod.out_features, bias=mod.bias is not None, group_size=group_size,
                            sym=sym, scale_dtype=dtype, backend=backend, device="meta")
            model.set_submodule(name, q)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype == torch.int32:
                t.random_(-(2**31), 2**31 - 1, generator=gen)
            elif t.dtype == torch.uint8:
                t.random_(0, 16, generator=gen)
            elif name.endswith("scales"):
                t.uniform_(0.5e-3, 2e-3, generator=gen)
            elif "norm" in name:
                t.fill_(1.0)
            elif "rotary_emb" not in name:
                t.normal_(0.0, 0.02, generator=gen)
    rot = model.model.rotary_emb  # its inv_freq buffers were on meta: rebuild them on the device
    with torch.device(device):
        model.model.rotary_emb = type(rot)(config=cfg)
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(device):
    """(start(), stop() -> ms) using CUDA events on CUDA, the wall clock elsewhere."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        return a.record, lambda: (b.record(), b.synchronize(), a.elapsed_time(b))[-1]
    t = {}
    return lambda: t.__setitem__(0, time.perf_counter()), lambda: (time.perf_counter() - t[0]) * 1e3


def forward_kwargs(model) -> set:
    return set(inspect.signature(model.model.forward).parameters)


def logits_kw(model) -> dict:
    params = set(inspect.signature(model.forward).parameters)
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.no_grad()
def prefill_tok_s(model, n_tokens, device) -> dict:
    """Prefill throughput; also returns the last-token logits (fixed-seed prompt) for comparing models."""
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(1)).to(device)
    kw = logits_kw(model)
    out = model(input_ids=ids, use_cache=False, **kw)  # warm-up (kernel autotuning, cuBLAS handles)
    last = out.logits[0, -1].float().cpu()
    finite = bool(torch.isfinite(last).all())
    times = []
    for _ in range(3):
        start, stop = timer(device)
        start()
        model(input_ids=ids, use_cache=False, **kw)
        times.append(stop())
    ms = statistics.median(times)
    return {"prefill_ms": ms, "prefill_tok_s": n_tokens / (ms * 1e-3), "prefill_logits_finite": finite, "_logits": last}


def make_static_cache(model, batch, max_len, device, dtype):
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # transformers < 4.56
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=device, dtype=dtype)


@torch.no_grad()
def decode_tok_s(model, batch, prompt_len, steps, cache_len, device, dtype, use_graph=True, prompt=None,
                 trace=None) -> dict:
    """Greedy decode over a StaticCache; returns tokens/s (batch * steps / time) and how it was timed.

    ``prompt`` [batch, prompt_len] defaults to random ids; with a list as ``trace``, every token
    produced (prefill's, warm-ups', timed steps') is appended to it, for checking the loop
    against ``model.generate`` (tests do, on CPU)."""
    assert prompt_len + steps + 4 <= cache_len, "static cache too short"
    cache = make_static_cache(model, batch, cache_len, device, dtype)
    takes_cpos = "cache_position" in forward_kwargs(model)
    kw = logits_kw(model)
    ids = prompt if prompt is not None else torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    pos = torch.arange(prompt_len, device=device)
    extra = {"cache_position": pos} if takes_cpos else {}
    out = model(input_ids=ids, position_ids=pos.unsqueeze(0).expand(batch, -1), past_key_values=cache,
                use_cache=True, **extra, **kw)
    # Static buffers the step reads and updates in place, so a captured graph can be replayed as is.
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    cpos = torch.full((1,), prompt_len, dtype=torch.long, device=device)
    position_ids = cpos.view(1, 1).expand(batch, 1)
    extra = {"cache_position": cpos} if takes_cpos else {}

    def step():
        o = model(input_ids=tok, position_ids=position_ids, past_key_values=cache, use_cache=True, **extra, **kw)
        tok.copy_(o.logits[:, -1].argmax(-1, keepdim=True))
        cpos.add_(1)

    def traced(fn):
        def run():
            fn()
            trace.append(tok.clone())
        return run if trace is not None else fn

    if trace is not None:
        trace.append(tok.clone())
    method, run = "eager", traced(step)
    if device.type == "cuda":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(s)
        sync(device)
        if use_graph:
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    step()
                run, method = traced(g.replay), "cuda-graph"
            except Exception as e:  # noqa: BLE001
                log.warning("decode graph capture failed (%s: %s); timing eager steps", type(e).__name__, str(e)[:300])
                method = f"eager (graph capture failed: {type(e).__name__})"
                sync(device)
    else:
        for _ in range(2):
            run()
    # Positions advance inside the step: warm-up steps (and nothing during capture) consumed slots.
    for _ in range(2):
        run()
    sync(device)
    start, stop = timer(device)
    start()
    for _ in range(steps):
        run()
    ms = stop()
    finite = bool(torch.isfinite(tok.float()).all())
    del cache
    return {"tok_s": batch * steps / (ms * 1e-3), "ms_per_step": ms / steps, "method": method, "finite": finite}


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def mem_allocated(device) -> float | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def measure(model, label, args, device, dtype, run: dict, ref_logits=None) -> dict:
    """Prefill and decode measurements for one model state; fills ``run``."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        run["weight_gib"] = gib(mem_allocated(device))
    for p in model.parameters():
        p.requires_grad_(False)
    run["param_gib"] = gib(sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())))
    if args.prefill_len:
        try:
            r = prefill_tok_s(model, args.prefill_len, device)
            logits = r.pop("_logits")
            run.update(r)
            if ref_logits is not None:  # int4 after fp16 on the same model: how far did quantization move it?
                run["logits_rel_err_vs_dense"] = ((logits - ref_logits).norm() / ref_logits.norm()).item()
                run["top1_same_as_dense"] = bool(logits.argmax() == ref_logits.argmax())
            run["_logits"] = logits
            log.info("%s %s prefill %d tokens: %.0f tok/s", args.model, label, args.prefill_len, run["prefill_tok_s"])
        except Exception as e:  # noqa: BLE001
            run.setdefault("notes", []).append(f"prefill failed: {type(e).__name__}: {str(e)[:200]}")
            log.exception("prefill failed")
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    for bs in args.batches:
        try:
            r = decode_tok_s(model, bs, args.prompt_len, args.decode_steps, args.cache_len, device, dtype,
                             use_graph=not args.no_graph)
            run[f"decode_bs{bs}_tok_s"] = r["tok_s"]
            run[f"decode_bs{bs}_ms_per_step"] = r["ms_per_step"]
            run["decode_method"] = r["method"]
            if not r["finite"]:
                run.setdefault("notes", []).append(f"bs{bs}: non-finite logits (random weights)")
            log.info("%s %s decode bs%d: %.1f tok/s (%.2f ms/step, %s)", args.model, label, bs, r["tok_s"],
                     r["ms_per_step"], r["method"])
        except Exception as e:  # noqa: BLE001
            run.setdefault("notes", []).append(f"decode bs{bs} failed: {type(e).__name__}: {str(e)[:200]}")
            log.exception("decode bs%d failed", bs)
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    if device.type == "cuda":
        run["peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
    return run


def int4_backends_used(model, device, dtype, requested, ms) -> str:
    """Which backend each quantized layer runs at each M of the run, e.g.
    "M=1: triton 160, cuda 64; M=2048: triton 224" (auto decides per layer shape and M)."""
    import collections

    from int4ops import QuantLinear
    from int4ops.ops import select_backend

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    parts = []
    for m in ms:
        try:
            counts = collections.Counter(
                select_backend(torch.empty(m, q.in_features, device=device, dtype=dtype), requested, q.out_features)
                for q in layers
            )
            parts.append(f"M={m}: " + ", ".join(f"{b} {c}" for b, c in counts.most_common()))
        except Exception as e:  # noqa: BLE001
            parts.append(f"M={m}: ? ({type(e).__name__}: {e})")
    return "; ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = common.DTYPES[args.dtype]
    info = common.env_info(device)
    import int4ops

    cfg = llama_config(args.model, args.layers)
    out = Path(args.out or common.default_out("e2e", info))
    out.parent.mkdir(parents=True, exist_ok=True)
    earlier = []
    if out.exists():  # several invocations (8b, then 70b) append to one file
        try:
            old = json.loads(out.read_text())
            earlier = old["runs"] if old.get("kind") == "e2e" else []
        except Exception:  # noqa: BLE001
            earlier = []
    runs = []
    doc = {"kind": "e2e", "env": info, "method": method_text(args, device),
           "args": {k: v for k, v in vars(args).items() if k not in ("out", "verbose")}, "runs": earlier}

    def save():
        doc["runs"] = earlier + runs
        common.write_json(out, doc)

    model = ref_logits = None
    for weights in args.weights:
        run = {"model": f"Llama-3-{args.model.upper()}-shaped" if args.model != "tiny" else "tiny Llama (dry run)",
               "weights": args.dtype if weights == "fp16" else weights, "layers": cfg.num_hidden_layers, "notes": [],
               "setup": f"{args.dtype} activations, prompt {args.prompt_len}, {args.decode_steps} decode steps, static cache {args.cache_len}, "
                        f"prefill {args.prefill_len}"}
        if args.layers:
            run["notes"].append(f"DEBUG: only {args.layers} layers, not a headline number")
        runs.append(run)
        t0 = time.perf_counter()
        try:
            if weights == "fp16":
                model = build_dense(cfg, device, dtype)
            elif model is not None:  # the fp16 model just measured: quantize it in place, as users do
                summary = int4ops.replace_linear(model, group_size=args.group_size, sym=args.sym, backend=args.backend,
                                                 progress=False)
                run["replaced"] = len(summary.replaced)
                run["notes"].append(f"int4ops.replace_linear(group_size={args.group_size}, sym={args.sym}) of the fp16 "
                                    f"model: {len(summary.replaced)} layers quantized (RTN, on {device.type})")
            else:
                model = build_int4_direct(cfg, device, dtype, args.group_size, args.sym, args.backend)
                run["notes"].append("int4 weights created directly (meta-device model, random packed QuantLinear "
                                    "buffers; never fp16); embeddings and lm_head fp16")
            sync(device)
        except Exception as e:  # noqa: BLE001
            log.exception("building %s %s failed", args.model, weights)
            run["notes"].append(f"build failed: {type(e).__name__}: {str(e)[:300]}")
            save()
            break
        run["build_s"] = time.perf_counter() - t0
        if weights == "int4":
            ms = sorted({*args.batches, *([args.prefill_len] if args.prefill_len else [])})
            run["int4_backend"] = int4_backends_used(model, device, dtype, args.backend, ms)
            run["weights"] = f"int4 g{args.group_size} {'sym' if args.sym else 'asym'} ({args.backend})"
            run.setdefault("notes", []).append(f"backends per layer: {run['int4_backend']}")
        log.info("%s %s built in %.1fs", args.model, weights, run["build_s"])
        save()
        measure(model, weights, args, device, dtype, run, ref_logits if weights == "int4" else None)
        logits = run.pop("_logits", None)
        if weights == "fp16":
            ref_logits = logits
        save()
    del model
    gc.collect()
    log.info("wrote %s", out)
    from . import report

    print(report.e2e_markdown(doc))
    ok = all(r.get(f"decode_bs{args.batches[0]}_tok_s") for r in runs) if args.batches else True
    return 0 if ok and len(runs) == len(args.weights) else 1


def method_text(args, device) -> str:
    if device.type != "cuda":
        return "CPU dry run: eager steps, wall clock (numbers are meaningless; checks the code paths)"
    how = "eager steps" if args.no_graph else "one decode step (forward + argmax + feed back) captured in a CUDA graph"
    return (f"Hugging Face LlamaForCausalLM (sdpa), random weights, {args.dtype} activations; decode: greedy, StaticCache of "
            f"{args.cache_len} slots, prompt {args.prompt_len} tokens, {how}, {args.decode_steps} steps timed with "
            f"CUDA events; prefill: one forward of {args.prefill_len} tokens at batch 1, median of 3")


if __name__ == "__main__":
    sys.exit(main())
