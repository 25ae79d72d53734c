"""Hugging Face checkpoint folders in and out: GPT-NeoX (Pythia) and Qwen3.

A folder holds ``config.json`` and the weights as ``model.safetensors`` or as shards listed by
``model.safetensors.index.json``. Reading needs no network: the folder must already be on disk.
The two families store the same matrices under other names and, for two of them, another layout:

- GPT-NeoX keeps q, k and v in one matrix whose rows go head by head (``q_h, k_h, v_h`` for each
  head ``h``); lmcore stacks all of q, then k, then v.
- Qwen3 keeps q, k, v and the SwiGLU gate and up matrices separately; lmcore stacks them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lmcore.nn.config import ModelConfig

ARCHITECTURES = ("GPTNeoXForCausalLM", "Qwen3ForCausalLM")
#: Buffers old GPT-NeoX checkpoints carry that are functions of the config, not weights.
_IGNORED = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
_GELUS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def _rope(hf: dict) -> tuple[float, float]:
    """(rope base, rotated fraction) from a config in either the current or the older key style."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"config.json asks for rope_type={kind!r}; lmcore implements plain RoPE ('default')")
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    fraction = params.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 1.0)))
    return float(theta), float(fraction)


def config_from_hf(hf: dict, **overrides) -> tuple[ModelConfig, str]:
    """A ``ModelConfig`` and the architecture name from the contents of a ``config.json``."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"config.json names architecture {arch!r}; lmcore reads {', '.join(ARCHITECTURES)}")
    theta, fraction = _rope(hf)
    common = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                  n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
                  context_length=hf["max_position_embeddings"], rope_theta=theta, rotary_fraction=fraction)
    if arch == "GPTNeoXForCausalLM":
        act = hf.get("hidden_act", "gelu")
        if act not in _GELUS:
            raise ValueError(f"config.json hidden_act={act!r}; lmcore reads GPT-NeoX with {sorted(_GELUS)}")
        fields = dict(common, norm="layernorm", norm_bias=True, norm_eps=hf.get("layer_norm_eps", 1e-5),
                      mlp="plain", activation=_GELUS[act], mlp_bias=True,
                      attention_bias=hf.get("attention_bias", True),
                      parallel_residual=hf.get("use_parallel_residual", True),
                      tie_weights=hf.get("tie_word_embeddings", False))
    else:
        if hf.get("use_sliding_window"):
            raise ValueError("config.json sets use_sliding_window=true; lmcore's Qwen3 attends to every position")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}; Qwen3 in lmcore uses 'silu'")
        fields = dict(common, n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                      d_head=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                      norm_eps=hf.get("rms_norm_eps", 1e-6), qk_norm=True,
                      attention_bias=hf.get("attention_bias", False),
                      tie_weights=hf.get("tie_word_embeddings", False))
    return ModelConfig(**{**fields, **overrides}), arch


def architecture_of(c: ModelConfig) -> str:
    """Which Hugging Face architecture can hold a model of this config (``ValueError`` says why none)."""
    if c.norm == "layernorm":
        arch, rules = "GPTNeoXForCausalLM", {
            "norm_bias": c.norm_bias, "mlp='plain'": c.mlp == "plain", "mlp_bias": c.mlp_bias,
            "activation gelu or gelu_tanh": c.activation in ("gelu", "gelu_tanh"), "no qk_norm": not c.qk_norm,
            "n_kv_heads = n_heads": c.kv_heads == c.n_heads, "head_dim = d_model / n_heads":
            c.head_dim * c.n_heads == c.d_model, "rope_style='half'": c.rope_style == "half"}
    else:
        arch, rules = "Qwen3ForCausalLM", {
            "mlp='gated'": c.mlp == "gated", "activation='silu'": c.activation == "silu",
            "no mlp_bias": not c.mlp_bias, "qk_norm": c.qk_norm, "rotary_fraction=1": c.rotary_fraction == 1,
            "rope_style='half'": c.rope_style == "half", "no parallel_residual": not c.parallel_residual}
    broken = [rule for rule, ok in rules.items() if not ok]
    if broken:
        raise ValueError(f"a {arch} (the family of norm={c.norm!r}) needs {', '.join(broken)}; this config differs")
    return arch


def config_to_hf(c: ModelConfig, architecture: str) -> dict:
    """The ``config.json`` contents for a model of config ``c``."""
    common = dict(architectures=[architecture], vocab_size=c.vocab_size, hidden_size=c.d_model,
                  num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, intermediate_size=c.d_ff,
                  max_position_embeddings=c.context_length, tie_word_embeddings=c.tie_weights,
                  attention_bias=c.attention_bias, torch_dtype="float32", use_cache=True)
    if architecture == "GPTNeoXForCausalLM":
        act = "gelu" if c.activation == "gelu" else "gelu_pytorch_tanh"
        return dict(common, model_type="gpt_neox", hidden_act=act, layer_norm_eps=c.norm_eps,
                    use_parallel_residual=c.parallel_residual, rotary_pct=c.rotary_fraction,
                    rotary_emb_base=c.rope_theta,
                    rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta,
                                         partial_rotary_factor=c.rotary_fraction))
    return dict(common, model_type="qwen3", hidden_act="silu", num_key_value_heads=c.kv_heads, head_dim=c.head_dim,
                rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, rope_scaling=None, use_sliding_window=False,
                rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta))


def _neox_layout(c: ModelConfig, qkv: torch.Tensor, to_hf: bool) -> torch.Tensor:
    """Rows of the fused q|k|v matrix (or bias): lmcore's (3, H, hd) order <-> GPT-NeoX's (H, 3, hd)."""
    rest = qkv.shape[1:]
    if to_hf:
        return qkv.reshape(3, c.n_heads, c.head_dim, *rest).transpose(0, 1).reshape(qkv.shape)
    return qkv.reshape(c.n_heads, 3, c.head_dim, *rest).transpose(0, 1).reshape(qkv.shape)


def to_hf_state(state: dict, c: ModelConfig, architecture: str) -> dict:
    """lmcore ``state_dict`` -> Hugging Face tensor names and layouts (a tied head written once)."""
    out = {}
    neox = architecture == "GPTNeoXForCausalLM"
    top = {"embedding.weight": "gpt_neox.embed_in.weight" if neox else "model.embed_tokens.weight",
           "lm_head.weight": "embed_out.weight" if neox else "lm_head.weight"}
    for name, t in state.items():
        if name in top:
            if name == "lm_head.weight" and c.tie_weights:
                continue
            out[top[name]] = t
            continue
        if name.startswith("final_norm."):
            out[("gpt_neox.final_layer_norm." if neox else "model.norm.") + name.split(".")[-1]] = t
            continue
        _, i, rest = name.split(".", 2)
        prefix = f"gpt_neox.layers.{i}." if neox else f"model.layers.{i}."
        kind = rest.split(".")[-1]  # weight or bias
        if rest.startswith("attn_norm."):
            out[prefix + "input_layernorm." + kind] = t
        elif rest.startswith("ffn_norm."):
            out[prefix + "post_attention_layernorm." + kind] = t
        elif rest.startswith("attn.qkv_proj.") and neox:
            out[prefix + "attention.query_key_value." + kind] = _neox_layout(c, t, to_hf=True)
        elif rest.startswith("attn.qkv_proj."):
            sizes = [c.n_heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), t.split(sizes)):
                out[prefix + f"self_attn.{part}.{kind}"] = piece
        elif rest.startswith("attn.o_proj."):
            out[prefix + ("attention.dense." if neox else "self_attn.o_proj.") + kind] = t
        elif rest.startswith(("attn.q_norm.", "attn.k_norm.")):
            out[prefix + "self_attn." + rest.split(".", 1)[1]] = t
        elif rest.startswith("ffn.w1."):
            out[prefix + "mlp.dense_h_to_4h." + kind] = t
        elif rest.startswith("ffn.w2."):
            out[prefix + ("mlp.dense_4h_to_h." if neox else "mlp.down_proj.") + kind] = t
        elif rest.startswith("ffn.w13."):
            gate, up = t.split(c.d_ff)
            out[prefix + "mlp.gate_proj." + kind], out[prefix + "mlp.up_proj." + kind] = gate, up
        else:
            raise ValueError(f"no {architecture} tensor corresponds to lmcore's {name!r}")
    return out


def from_hf_state(hf_state: dict, c: ModelConfig, architecture: str, reference: dict) -> dict:
    """Hugging Face tensors -> lmcore ``state_dict``, for the names and shapes of ``reference``.

    Raises ``ValueError`` naming a missing, unexpected or wrongly shaped tensor before converting.
    """
    expected = {k: tuple(v.shape) for k, v in to_hf_state(reference, c, architecture).items()}
    missing = sorted(set(expected) - set(hf_state))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) that config.json implies, e.g. "
                         f"{missing[:3]}")
    extra = sorted(k for k in set(hf_state) - set(expected) if not k.endswith(_IGNORED)
                   and not (c.tie_weights and k in ("lm_head.weight", "embed_out.weight")))
    if extra:
        raise ValueError(f"the checkpoint holds {len(extra)} tensor(s) lmcore has no place for, e.g. {extra[:3]}")
    for k, shape in expected.items():
        if tuple(hf_state[k].shape) != shape:
            raise ValueError(f"tensor {k!r} has shape {tuple(hf_state[k].shape)}; config.json implies {shape}")
    out = {}
    for name in reference:
        if name == "lm_head.weight" and c.tie_weights:
            continue
        probe = to_hf_state({name: reference[name]}, c.replace(tie_weights=False), architecture)
        pieces = [hf_state[k] for k in probe]  # the one or more HF tensors this lmcore tensor is made of
        t = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if ".attn.qkv_proj." in name and architecture == "GPTNeoXForCausalLM":
            t = _neox_layout(c, t, to_hf=False)
        out[name] = t
    return out


def read_safetensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a folder: ``model.safetensors``, or the shards its index lists."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights (nor model.safetensors.index.json)")
    state = {}
    for shard in shards:
        if not (folder / shard).exists():
            raise FileNotFoundError(f"{folder / shard} is listed in {index.name} but missing")
        state.update(load_file(folder / shard))
    return state


def load_pretrained(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", **overrides):
    """``TransformerLM`` from a checkpoint folder on disk (``overrides``: ModelConfig fields such
    as ``attention_backend`` or a shorter ``context_length``)."""
    from lmcore.nn.model import TransformerLM
    from lmcore.nn.rope import RotaryEmbedding

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist (lmcore reads folders already on disk)")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json")
    config, arch = config_from_hf(json.loads((folder / "config.json").read_text()), **overrides)
    with torch.device("meta"):
        model = TransformerLM(config, dtype=dtype)
    state = from_hf_state(read_safetensors(folder), config, arch, model.state_dict())
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=not
                          config.tie_weights, assign=True)
    if config.tie_weights:
        model.lm_head.weight = model.embedding.weight
    model.rope = RotaryEmbedding(config.rotary_dim, config.context_length, config.rope_theta, config.rope_style,
                                 device=device)
    return model.eval()


def save_pretrained(model, folder: str | os.PathLike, architecture: str | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` (all at once, via a temporary folder)."""
    from safetensors.torch import save_file

    c = model.config
    arch = architecture_of(c)
    if architecture is not None and architecture != arch:
        raise ValueError(f"architecture={architecture!r} cannot hold this model's config; it maps to {arch}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True to replace it")
    state = {k: v.detach().float().contiguous().cpu()
             for k, v in to_hf_state(model.state_dict(), c, arch).items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(c, arch), indent=2) + "\n")
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder
