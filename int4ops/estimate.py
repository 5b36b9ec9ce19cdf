"""Will it fit? Weight and KV-cache memory of a model from its config alone (no weights loaded).

    int4ops estimate meta-llama/Meta-Llama-3-8B/config.json
    int4ops estimate path/to/model_dir --json

For fp16/bf16 and for int4 at each group size (sym and asym) it counts the bytes of the
packed format exactly (``int4ops.format``: int32 qweight with K padded to whole groups,
scales in the model's 16-bit dtype, uint8 zeros when asymmetric), with what
``replace_linear`` leaves in 16 bits by default: embeddings, norms, biases, and ``lm_head``
(``skip=("lm_head",)``). It also gives the KV cache per 1k tokens (batch 1, 16-bit).

Handles Llama / Mistral / Qwen2 / Qwen3 / Gemma-style configs (num_key_value_heads, head_dim,
tie_word_embeddings, attention/mlp biases, Mixtral experts) and GPT-2 (n_embd, n_layer, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .format import packed_nbytes

DEFAULT_GROUP_SIZES = (32, 64, 128, -1)
GIB = 2**30

# Model types whose Hugging Face config defaults tie_word_embeddings to False.
UNTIED_BY_DEFAULT = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "phi3", "starcoder2"}


class ConfigError(ValueError):
    """The config is missing, unreadable, or lacks a field the estimate needs."""


def load_config(config) -> dict:
    """A config dict, a path to config.json, or a model directory holding one."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no model config at {path} (give a config.json or a model directory containing one)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} holds a JSON {type(cfg).__name__}, expected an object (a model config)")
    return cfg


def _get(cfg: dict, *keys, default=None, required=True):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if required and default is None:
        raise ConfigError(f"config has no {' / '.join(keys)} (model_type={cfg.get('model_type')!r})")
    return default


def model_dims(cfg: dict) -> dict:
    """Normalise a Llama-family or GPT-2 config into the few numbers the estimate needs."""
    if "text_config" in cfg and "hidden_size" not in cfg and "n_embd" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    mt = str(cfg.get("model_type", "")).lower()
    if mt == "gpt2" or ("n_embd" in cfg and "hidden_size" not in cfg):
        h = int(_get(cfg, "n_embd"))
        heads = int(_get(cfg, "n_head"))
        return {
            "family": "gpt2", "model_type": mt or "gpt2", "hidden": h, "layers": int(_get(cfg, "n_layer")),
            "heads": heads, "kv_heads": heads, "head_dim": h // heads,
            "intermediate": int(_get(cfg, "n_inner", default=4 * h)), "vocab": int(_get(cfg, "vocab_size")),
            "positions": int(_get(cfg, "n_positions", "n_ctx", default=1024)),
            "tie": bool(cfg.get("tie_word_embeddings", True)), "experts": 1,
        }
    h = int(_get(cfg, "hidden_size"))
    heads = int(_get(cfg, "num_attention_heads"))
    return {
        "family": "llama", "model_type": mt or "llama", "hidden": h, "layers": int(_get(cfg, "num_hidden_layers")),
        "heads": heads, "kv_heads": int(_get(cfg, "num_key_value_heads", default=heads)),
        "head_dim": int(_get(cfg, "head_dim", default=h // heads)),
        "intermediate": int(_get(cfg, "intermediate_size")), "vocab": int(_get(cfg, "vocab_size")),
        "tie": bool(cfg.get("tie_word_embeddings", mt not in UNTIED_BY_DEFAULT)),
        "attn_bias": bool(cfg.get("attention_bias", False)) or mt == "qwen2",
        "qkv_bias_only": mt == "qwen2" and not cfg.get("attention_bias", False),
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        "experts": int(cfg.get("num_local_experts") or 1),
    }


def linears(d: dict) -> list[tuple[str, int, int, int, bool]]:
    """(name, N = out, K = in, how many in the model, has bias) for every linear layer."""
    L, h, inter = d["layers"], d["hidden"], d["intermediate"]
    if d["family"] == "gpt2":  # Conv1D layers, all with bias
        out = [("attn.c_attn", 3 * h, h, L, True), ("attn.c_proj", h, h, L, True),
               ("mlp.c_fc", inter, h, L, True), ("mlp.c_proj", h, inter, L, True)]
    else:
        q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
        qkv_b, o_b = d["attn_bias"], d["attn_bias"] and not d["qkv_bias_only"]
        e = d["experts"]
        out = [("self_attn.q_proj", q, h, L, qkv_b), ("self_attn.k_proj", kv, h, L, qkv_b),
               ("self_attn.v_proj", kv, h, L, qkv_b), ("self_attn.o_proj", h, q, L, o_b),
               ("mlp.gate_proj", inter, h, L * e, d["mlp_bias"]), ("mlp.up_proj", inter, h, L * e, d["mlp_bias"]),
               ("mlp.down_proj", h, inter, L * e, d["mlp_bias"])]
        if e > 1:
            out.append(("block_sparse_moe.gate", e, h, L, False))
    if not d["tie"]:
        out.append(("lm_head", d["vocab"], h, 1, False))
    return out


def other_params(d: dict) -> int:
    """Parameters outside the linear layers: embeddings and norms (kept in 16 bits)."""
    h, L = d["hidden"], d["layers"]
    if d["family"] == "gpt2":
        return d["vocab"] * h + d["positions"] * h + (2 * L + 1) * 2 * h  # wte, wpe, LayerNorm weight+bias
    return d["vocab"] * h + (2 * L + 1) * h  # embed_tokens, RMSNorm weights


def estimate(config, group_sizes=DEFAULT_GROUP_SIZES, skip=("lm_head",), kv_tokens: int = 1024, dtype_bytes: int = 2) -> dict:
    """Weight memory in 16 bits and in int4 (every group size, sym and asym) and KV cache per ``kv_tokens``."""
    cfg = load_config(config)
    try:
        d = model_dims(cfg)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config has a malformed field: {e}") from None
    lins = linears(d)
    lin_params = sum(n * k * c for _, n, k, c, _ in lins)
    bias_params = sum(n * c for _, n, _, c, b in lins if b)
    rest = other_params(d)
    total = lin_params + bias_params + rest
    dense = total * dtype_bytes
    out = {
        "model_type": d["model_type"], "dims": d, "params": total, "linear_params": lin_params,
        "fp16_bytes": dense, "bf16_bytes": dense, "int4": [],
        "kv_cache_bytes": 2 * d["layers"] * d["kv_heads"] * d["head_dim"] * dtype_bytes * kv_tokens,
        "kv_tokens": kv_tokens,
        "notes": [],
    }
    if d["tie"]:
        out["notes"].append("lm_head is tied to the input embedding: one 16-bit matrix, not quantized")
    if d["family"] == "gpt2":
        out["notes"].append("GPT-2's Conv1D layers count as linear layers (replace_linear quantizes them)")
    kept = [(name, n, k, c) for name, n, k, c, _ in lins if any(s == name or name.endswith("." + s) for s in skip)]
    quant = [(name, n, k, c) for name, n, k, c, _ in lins if (name, n, k, c) not in kept]
    kept_bytes = sum(n * k * c for _, n, k, c in kept) * dtype_bytes
    fixed = (rest + bias_params) * dtype_bytes + kept_bytes  # everything left in 16 bits
    for gs in group_sizes:
        for sym in (False, True):
            qb = sum(packed_nbytes(n, k, gs, sym, dtype_bytes) * c for _, n, k, c in quant)
            out["int4"].append({"group_size": gs, "sym": sym, "bytes": qb + fixed, "quantized_bytes": qb,
                                "fp16_bytes": fixed, "vs_fp16": (qb + fixed) / dense})
    out["kept_fp16"] = [name for name, *_ in kept] + ["embeddings", "norms"] + (["biases"] if bias_params else [])
    return out


def _size(b: float) -> str:
    for unit, div in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def render(est: dict) -> str:
    d = est["dims"]
    lines = [
        f"{est['model_type']}: {_count(est['params'])} parameters ({_count(est['linear_params'])} in linear layers), "
        f"hidden {d['hidden']}, {d['layers']} layers, {d['heads']} heads / {d['kv_heads']} KV heads x {d['head_dim']}, "
        f"vocab {d['vocab']}" + (", tied embeddings" if d["tie"] else ""),
        "",
        f"{'weights':<22}{'memory':>14}{'vs fp16':>10}",
        f"{'fp16 / bf16':<22}{_size(est['fp16_bytes']):>14}{'1.00x':>10}",
    ]
    for r in est["int4"]:
        g = "per-channel" if r["group_size"] == -1 else f"g{r['group_size']}"
        name = f"int4 {g} {'sym' if r['sym'] else 'asym'}"
        lines.append(f"{name:<22}{_size(r['bytes']):>14}{r['vs_fp16']:>9.2f}x")
    lines += [
        "",
        f"int4 rows keep {', '.join(est['kept_fp16'])} in 16 bits "
        f"(qweight int32 with K padded to whole groups, 16-bit scales, uint8 zeros when asym).",
        f"KV cache (16-bit, batch 1): {_size(est['kv_cache_bytes'])} per {est['kv_tokens']} tokens "
        f"({est['kv_cache_bytes'] / est['kv_tokens'] / 2**10:.1f} KiB per token).",
    ]
    lines += [f"note: {n}" for n in est["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="int4ops estimate", description="weight and KV-cache memory of a model config "
                                "(fp16 vs int4), computed from config.json alone")
    p.add_argument("config", help="a config.json or a model directory holding one")
    p.add_argument("--group-sizes", default="32,64,128,-1", help="comma list (default 32,64,128,-1)")
    p.add_argument("--quantize-lm-head", action="store_true", help="count lm_head as int4 too (default: kept 16-bit)")
    p.add_argument("--tokens", type=int, default=1024, help="KV-cache tokens to report (default 1024)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        gss = tuple(int(g) for g in args.group_sizes.split(","))
        est = estimate(args.config, group_sizes=gss, skip=() if args.quantize_lm_head else ("lm_head",),
                       kv_tokens=args.tokens)
    except (ConfigError, ValueError) as e:
        print(f"int4ops estimate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est, indent=1) if args.json else render(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
