"""Whole models: swap ``nn.Linear`` for ``QuantLinear`` (``replace_linear``), save and load
quantized Hugging Face models, and the built-in tiny Llama the CLI demo runs on.

Checkpoint layout written by ``save_quantized`` (Hugging Face style, loadable without ever
materialising the fp16 weights)::

    config.json, generation_config.json   the model's own Hugging Face config
    model.safetensors                     every tensor: QuantLinear buffers + the rest
      (or model-0000i-of-0000n.safetensors + model.safetensors.index.json when sharded)
    int4ops_config.json                   format version, which modules are QuantLinear
                                          (shape, group size, sym, bias), tied tensors,
                                          and a sha256 per file (checked at load)
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .format import FORMAT_VERSION, Int4FormatError, check_group_size
from .nn import QuantLinear, is_linear_like, linear_weight
from .ops import check_backend

log = logging.getLogger("int4ops")

CONFIG_NAME = "int4ops_config.json"
DEFAULT_SKIP = ("lm_head",)


class CheckpointError(RuntimeError):
    """A quantized checkpoint is missing, corrupt, or does not match its model."""


# ----------------------------------------------------------------------------- replace_linear


@dataclass
class ReplaceSummary:
    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> reason
    bytes_before: int = 0  # the replaced layers' weight + bias bytes before
    bytes_after: int = 0  # the same layers as QuantLinear

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    def __str__(self) -> str:
        lines = [
            f"replaced {len(self.replaced)} linear layers: {self.bytes_before / 2**20:.2f} MiB -> "
            f"{self.bytes_after / 2**20:.2f} MiB ({self.ratio:.2f}x smaller)"
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatch(name, p) for p in patterns)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module that holds ``name``, the last component): "a.b.c" -> (model.a.b, "c")."""
    parent, _, leaf = name.rpartition(".")
    return model.get_submodule(parent), leaf


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@torch.no_grad()
def replace_linear(
    model: nn.Module,
    group_size: int = 128,
    sym: bool = False,
    skip=DEFAULT_SKIP,
    backend: str = "auto",
    scale_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> ReplaceSummary:
    """Quantize every eligible ``nn.Linear`` (and GPT-2 ``Conv1D``) of ``model`` in place.

    Layers are quantized one at a time on the device their weight lives on, and each fp
    weight is released as soon as its QuantLinear is in place, so peak memory stays near the
    model's own size (models split over GPUs by ``device_map`` stay where they are).
    ``skip`` holds module names (a full name, or its last components such as ``lm_head`` or
    ``mlp.down_proj``) or glob patterns matched against the full name (``*.self_attn.*``).
    A weight shared with another module (tied embeddings) or offloaded to the meta device is
    skipped, with the reason in the summary.
    """
    check_group_size(group_size)
    check_backend(backend)
    if isinstance(skip, str):  # a lone name, not an iterable of its characters
        skip = (skip,)
    summary = ReplaceSummary()
    # Count how many modules hold each weight tensor, to leave tied weights alone.
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    names = []
    for name, module in model.named_modules():
        if not is_linear_like(module):
            continue
        if _matches(name, skip):
            summary.skipped[name] = "in skip list"
        elif module.weight.device.type == "meta":
            summary.skipped[name] = "weight is on the meta device (offloaded); load it first"
        elif owners.get(id(module.weight), 0) > 1:
            summary.skipped[name] = "weight is shared with another module (tied)"
        else:
            names.append(name)

    for name in tqdm(names, desc="int4ops: quantizing", unit="layer", disable=not progress):
        parent, child = _owner(model, name)
        old = getattr(parent, child)
        summary.bytes_before += _nbytes(old.weight, old.bias)
        new = QuantLinear.from_linear(old, group_size, sym, scale_dtype, backend)
        hook = getattr(old, "_hf_hook", None)
        if hook is not None:  # accelerate's device-alignment hook must follow the layer
            from accelerate.hooks import add_hook_to_module

            add_hook_to_module(new, hook)
        setattr(parent, child, new)
        summary.bytes_after += new.nbytes
        summary.replaced.append(name)
        del old, new  # drop the last reference to the fp weight now, not at the end
    log.info("%s", summary)
    return summary


# ----------------------------------------------------------------------------- save / load


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def quantized_modules(model: nn.Module) -> dict[str, dict]:
    return {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "group_size": m.group_size,
            "sym": m.sym,
            "bias": m.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }


def save_quantized(model: nn.Module, save_dir, tokenizer=None, max_shard_bytes: int = 4 << 30) -> Path:
    """Write ``model`` (after ``replace_linear``) to ``save_dir`` in the layout above."""
    from safetensors.torch import save_file

    save_dir = Path(save_dir)
    modules = quantized_modules(model)
    if not modules:
        raise ValueError("model has no QuantLinear layers: run int4ops.replace_linear(model) first")
    # safetensors refuses tensors that share memory: keep the first name of each, record the rest.
    tensors, tied, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise ValueError(f"cannot save {name}: it is on the meta device")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)

    # Write every shard under a temporary name first: a save that fails part-way leaves an
    # earlier checkpoint in this folder intact. Then drop the weight files that earlier
    # checkpoint listed (only those: other files are the user's) and move the new ones in.
    save_dir.mkdir(parents=True, exist_ok=True)
    files, weight_map, written = {}, {}, []
    try:
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tmp = save_dir / f".{fname}.tmp"
            written.append(tmp)
            save_file(shard, tmp, metadata={"format": "pt", "int4ops_format": str(FORMAT_VERSION)})
            files[fname] = {"sha256": _sha256(tmp)}
            weight_map.update(dict.fromkeys(shard, fname))
    except BaseException:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        raise
    try:
        previous = json.loads((save_dir / CONFIG_NAME).read_text()).get("files", {})
    except (OSError, ValueError):
        previous = {}
    for old_name in [*previous, "model.safetensors.index.json"]:
        if "/" not in old_name and old_name not in files:
            (save_dir / old_name).unlink(missing_ok=True)
    for fname in files:
        (save_dir / f".{fname}.tmp").replace(save_dir / fname)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
        index["weight_map"] = weight_map
        (save_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(save_dir)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(save_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_dir)
    qconfig = {
        "int4ops_version": __version__,
        "format_version": FORMAT_VERSION,
        "bits": 4,
        "method": "rtn",
        "modules": modules,
        "tied": tied,
        "files": files,
    }
    (save_dir / CONFIG_NAME).write_text(json.dumps(qconfig, indent=2))
    log.info("int4ops: saved %d quantized layers to %s", len(modules), save_dir)
    return save_dir


def read_quantization_config(path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not an int4ops checkpoint: {CONFIG_NAME} is missing")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    for key in ("format_version", "modules", "files"):
        if key not in cfg:
            raise CheckpointError(f"{cfg_file} has no '{key}' entry")
    if cfg["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_file} uses format version {cfg['format_version']}; this int4ops reads version {FORMAT_VERSION}"
        )
    return cfg


def _named_tensors(model: nn.Module):
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module, leaf = _owner(model, name)
    if leaf in module._parameters:
        module._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
    else:
        module._buffers[leaf] = tensor


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device (no memory, no init work) while buffers such as
    rotary frequencies, which checkpoints do not hold, are still computed for real."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build_empty_model(config):
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)


def load_quantized(path, device="cpu", backend: str = "auto", verify: bool = True) -> nn.Module:
    """Rebuild a model saved by ``save_quantized`` on ``device``.

    The model skeleton is created with parameters on the meta device and QuantLinear shells in
    place of the quantized layers; the checkpoint's tensors are then loaded straight onto
    ``device`` (``assign=True``), so the fp16 weights never exist. ``verify`` checks each
    file's sha256 first, which catches corrupt or truncated files.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    check_backend(backend)
    qcfg = read_quantization_config(path)
    for fname, meta in qcfg["files"].items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"{f} is listed in {CONFIG_NAME} but missing")
        if verify and _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f} is corrupt: its sha256 does not match the one recorded at save time")

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise CheckpointError(f"cannot read the model config in {path}: {e}") from e
    with _parameters_on_meta():
        model = _build_empty_model(config)
    for name, spec in qcfg["modules"].items():
        try:
            parent, child = _owner(model, name)
            old = getattr(parent, child)
        except AttributeError:
            raise CheckpointError(f"{CONFIG_NAME} names module {name!r}, which the model does not have") from None
        if not is_linear_like(old):
            raise CheckpointError(f"{CONFIG_NAME} names {name!r} as quantized but it is a {type(old).__name__}")
        w = linear_weight(old)
        if (spec["out_features"], spec["in_features"]) != tuple(w.shape):
            raise CheckpointError(
                f"{name}: checkpoint has [{spec['out_features']}, {spec['in_features']}], "
                f"the model config gives {list(w.shape)}"
            )
        shell = QuantLinear(
            spec["in_features"], spec["out_features"], spec["bias"], spec["group_size"], spec["sym"],
            backend=backend, device="meta",
        )
        setattr(parent, child, shell)

    expected = set(model.state_dict().keys())
    loaded = set()
    for fname in qcfg["files"]:
        try:
            sd = load_file(path / fname, device=str(device))
        except SafetensorError as e:
            raise CheckpointError(f"{path / fname} is not a readable safetensors file: {e}") from None
        unexpected = set(sd) - expected
        if unexpected:
            raise CheckpointError(f"{path / fname} holds tensors the model does not have: {sorted(unexpected)[:5]}")
        try:
            model.load_state_dict(sd, strict=False, assign=True)
        except (RuntimeError, Int4FormatError) as e:
            raise CheckpointError(f"{path / fname} does not match the model: {e}") from None
        loaded |= set(sd)
        del sd
    tied = qcfg.get("tied", {})
    missing = expected - loaded - set(tied)
    if missing:
        raise CheckpointError(f"checkpoint in {path} lacks tensors the model needs: {sorted(missing)[:5]}")
    for name, source in tied.items():  # saved once: point every other name at the same tensor
        if source not in loaded:
            raise CheckpointError(f"{CONFIG_NAME} ties {name} to {source}, which the checkpoint lacks")
        _set_tensor(model, name, getattr(*_owner(model, source)))
    still_meta = [n for n, t in _named_tensors(model) if t.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"after loading {path}, these tensors have no values: {still_meta[:5]}")
    model.to(device)  # buffers not in the checkpoint (e.g. rotary) follow the weights
    model.eval()
    return model


# ----------------------------------------------------------------------------- demo model


def tiny_llama(
    seed: int = 0,
    hidden_size: int = 512,
    intermediate_size: int = 1376,
    num_hidden_layers: int = 4,
    vocab_size: int = 4096,
    dtype: torch.dtype = torch.float32,
):
    """A small Llama-style ``LlamaForCausalLM`` with random weights from a fixed seed (no download).

    intermediate_size 1376 is deliberately not a multiple of 128, so ``down_proj`` exercises the
    padded last group.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    return model
