"""The ``int4ops`` command.

    int4ops                       demo: quantize a built-in tiny Llama, report size, error, speed
    int4ops quantize SRC DST      quantize a Hugging Face model directory, save it to DST
    int4ops info                  what is available here: GPU, Triton, CUDA library, backends
    int4ops estimate CONFIG       will it fit: weight and KV-cache memory, fp16 vs int4
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from .format import Int4FormatError, check_group_size
from .models import CheckpointError

log = logging.getLogger("int4ops")


@torch.no_grad()  # inference, as users run it: no autograd graph recorded while timing
def _time_per_call(fn, device: torch.device, min_seconds: float = 0.5, max_iters: int = 50) -> float:
    """Median seconds per call of ``fn`` after one warm-up call."""
    fn()
    times = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _decode_tokens_per_s(model, ids, steps: int, device) -> float:
    """Greedy token-by-token decoding (M = 1 per layer) after a prompt, with the KV cache."""

    def run():
        out = model(ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

    prefill = _time_per_call(lambda: model(ids), device)
    total = _time_per_call(run, device, max_iters=5)
    return steps / max(total - prefill, 1e-9)


def _logits_and_speed(model, prompt, args, device) -> tuple[torch.Tensor, float, float]:
    """(fp32 logits of the prompt, prefill tokens/s, batch-1 decode tokens/s)."""
    with torch.no_grad():
        logits = model(prompt).logits.float()
    prefill = args.tokens / _time_per_call(lambda: model(prompt), device)
    decode = _decode_tokens_per_s(model, prompt[:, :16], args.decode_steps, device)
    return logits, prefill, decode


def cmd_demo(args) -> int:
    from .models import replace_linear, tiny_llama
    from .ops import select_backend

    check_group_size(args.group_size)  # before minutes of work, not after
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(
        "int4ops demo: a built-in tiny Llama (hidden 512, intermediate 1376, 4 layers, vocab 4096) with "
        f"RANDOM weights from seed {args.seed} (no download, not a trained model), {str(dtype)[6:]} on {device}"
    )
    model = tiny_llama(seed=args.seed, dtype=dtype).to(device)
    fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=gen).to(device)
    ref, fp_prefill, fp_decode = _logits_and_speed(model, prompt, args, device)

    summary = replace_linear(model, group_size=args.group_size, sym=args.sym, progress=False)
    q_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    out, q_prefill, q_decode = _logits_and_speed(model, prompt, args, device)

    err = (out - ref).abs().max().item()
    rel = ((out - ref).norm() / ref.norm()).item()
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    mlp = model.model.layers[0].mlp.down_proj  # the backend auto picks for one real layer and M
    backend = select_backend(prompt.new_empty(args.tokens, mlp.in_features, dtype=dtype), "auto", mlp.out_features)
    group = "per-channel" if args.group_size == -1 else f"group {args.group_size}"
    print(f"quantized with RTN, {group}, {'symmetric' if args.sym else 'asymmetric'}")
    print(f"  {summary}")
    print(f"  whole model: {fp_bytes / 2**20:.1f} MiB -> {q_bytes / 2**20:.1f} MiB (embeddings/lm_head stay {str(dtype)[6:]})")
    print(f"logits vs the unquantized model on {args.tokens} random tokens:")
    print(f"  max abs error {err:.4f}, relative Frobenius error {rel:.4f}, top-1 agreement {top1:.1%}")
    print(f"backend: {backend} for the {args.tokens}-token prefill (auto; INT4OPS_BACKEND overrides)")
    print(f"throughput on {device} (median wall clock):")
    print(f"  prefill {args.tokens} tokens: {fp_prefill:10.0f} tok/s {str(dtype)[6:]}  {q_prefill:10.0f} tok/s int4")
    print(f"  decode, batch 1:     {fp_decode:10.1f} tok/s {str(dtype)[6:]}  {q_decode:10.1f} tok/s int4")
    if backend == "reference":
        print("  (the reference backend dequantizes every call: it is the correctness path, not a fast one)")
    return 0


def cmd_quantize(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import replace_linear, save_quantized

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=dtype).to(args.device).eval()
    summary = replace_linear(model, group_size=args.group_size, sym=args.sym, skip=tuple(args.skip))
    print(summary)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.src)
    except Exception as e:  # noqa: BLE001 - a model dir without a tokenizer is still quantizable
        log.warning("no tokenizer saved: %s", e)
        tokenizer = None
    save_quantized(model, args.dst, tokenizer=tokenizer)
    print(f"saved to {args.dst}")
    return 0


def cmd_info(args) -> int:
    import platform

    from . import __version__
    from .kernels import cuda, triton_w4a16

    print(f"int4ops {__version__}, Python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    else:
        print("GPU: none (CUDA not available); the reference backend runs on the CPU")
    info = cuda.library_info()
    for k, v in info.items():
        print(f"cuda library {k}: {v}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"triton backend usable on {dev}: {triton_w4a16.available(dev)}")
    print(f"cuda backend usable: {cuda.available()}" + ("" if cuda.available() else f" ({cuda.why_unavailable()})"))
    if cuda.available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda backend above M = 16 on cuda:{i}: {cuda.large_m_kernel(torch.device('cuda', i))}")
    return 0


def cmd_estimate(args) -> int:
    from . import estimate

    return estimate.main(args.rest)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="int4ops", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="cmd")

    def add_quant_args(p, defaults=True):
        d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
        p.add_argument("--group-size", type=int, default=d(128), help="32, 64, 128, 256 or -1 (per channel)")
        p.add_argument("--sym", action="store_true", default=d(False), help="symmetric (no zero points)")

    def add_demo_args(p, defaults=True):
        # The demo's options work before or after the word "demo"; the sub-command's copies
        # default to SUPPRESS so they never overwrite what was given before it.
        d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
        add_quant_args(p, defaults)
        p.add_argument("--device", default=d(None), help="cpu or cuda (default: cuda if available)")
        p.add_argument("--seed", type=int, default=d(0))
        p.add_argument("--tokens", type=int, default=d(128), help="prompt length for error and prefill speed")
        p.add_argument("--decode-steps", type=int, default=d(16))

    add_demo_args(parser)
    add_demo_args(sub.add_parser("demo", help="the default: quantize a built-in tiny Llama and report"), defaults=False)

    q = sub.add_parser("quantize", help="quantize a Hugging Face model directory")
    q.add_argument("src")
    q.add_argument("dst")
    add_quant_args(q)
    q.add_argument("--skip", nargs="*", default=["lm_head"], help="module names/globs to keep in full precision")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])

    sub.add_parser("info", help="show GPU, Triton, CUDA library and backends")
    est = sub.add_parser("estimate", help="weight and KV-cache memory of a model config", add_help=False)
    est.add_argument("rest", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    if args.verbose:
        logging.getLogger("int4ops").setLevel(logging.INFO)
    handlers = {None: cmd_demo, "demo": cmd_demo, "quantize": cmd_quantize, "info": cmd_info, "estimate": cmd_estimate}
    try:
        return handlers[args.cmd](args)
    except ImportError as e:
        if getattr(e, "name", None) == "transformers" or "transformers" in str(e):
            print("int4ops: error: this command needs Hugging Face transformers: pip install 'int4ops[hf]'", file=sys.stderr)
            return 2
        raise
    except (Int4FormatError, CheckpointError, OSError, ValueError) as e:
        print(f"int4ops: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
