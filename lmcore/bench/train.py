"""``python -m lmcore.bench train``: training throughput, MFU, memory estimate and KV-cache decoding.

Compares lmcore's stack (``lmcore.nn.TransformerLM``, ``lmcore.train`` loss, AdamW and clipping)
with the same architecture written the way a PyTorch user would (``torch.nn`` modules,
``F.scaled_dot_product_attention``, ``F.cross_entropy``, fused ``torch.optim.AdamW``), in the
same process, both in bf16 autocast and (on CUDA) ``torch.compile``d.
Options: ``--quick`` (tiny preset on CPU), ``--presets a,b``, ``--steps N``, ``--no-compile``,
``--out-dir DIR``: write ``train-<gpu>.json`` (the whole result, provenance at the top level),
``train-<gpu>.csv`` (tokens/s and MFU per preset and stack) and ``train-<gpu>-memory.csv``
(measured peak memory against the estimate) there, as the book's recorded results.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from lmcore.accounting import flops_per_token, memory_estimate, mfu
from lmcore.nn import ModelConfig, TransformerLM
from lmcore.train import AdamW, clip_grad_norm, cross_entropy

BATCH = {"tiny": 8, "tinystories-17m": 64, "pythia-70m-shape": 8, "gpt2-small-shape": 16}
MEMORY_CASES = [("tinystories-17m", 32), ("gpt2-small-shape", 8)]


class _Block(nn.Module):
    """A pre-norm block in plain torch.nn (the baseline)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        d, kv = c.d_model, c.kv_heads * c.head_dim
        self.c = c
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=c.norm_eps), nn.RMSNorm(d, eps=c.norm_eps)
        self.qkv = nn.Linear(d, d + 2 * kv, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.w13 = nn.Linear(d, 2 * c.d_ff, bias=False)
        self.w2 = nn.Linear(c.d_ff, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, d = x.shape
        c = self.c
        q, k, v = self.qkv(self.norm1(x)).split([d, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim], -1)
        q = q.view(B, T, c.n_heads, c.head_dim).transpose(1, 2)
        k = k.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.kv_heads != c.n_heads)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, d))
        a, b = self.w13(self.norm2(x)).chunk(2, -1)
        return x + self.w2(F.silu(a) * b)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), -1)


class BaselineLM(nn.Module):
    """The same architecture as ``TransformerLM`` (half-split RoPE, SwiGLU, RMSNorm) in torch.nn."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        if c.tie_weights:  # the same initial scale as lmcore's tied table
            nn.init.normal_(self.embed.weight, std=c.d_model ** -0.5)
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c.n_layers))
        self.norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_weights:
            self.head.weight = self.embed.weight
        inv = c.rope_theta ** (-torch.arange(0, c.head_dim, 2).float() / c.head_dim)
        ang = torch.outer(torch.arange(c.context_length).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, self.cos[:T], self.sin[:T])
        return self.head(self.norm(x))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _throughput(kind: str, config: ModelConfig, batch: int, steps: int, device, compile_: bool) -> dict:
    torch.manual_seed(0)
    if kind == "lmcore":
        model = TransformerLM(config).to(device)
        opt = AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        loss_fn, clip = cross_entropy, lambda: clip_grad_norm(model.parameters(), 1.0)
    else:
        model = BaselineLM(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=device.type == "cuda")
        loss_fn = lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())  # noqa: E731
        clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # noqa: E731
    def loss_of(x, y):
        return loss_fn(model(x), y)

    loss_of_batch = torch.compile(loss_of) if compile_ else loss_of  # model and loss compiled together
    use_bf16 = device.type == "cuda"
    x = torch.randint(0, config.vocab_size, (batch, config.context_length + 1), device=device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_of_batch(inp, tgt)
        loss.backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    _sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    dt = time.perf_counter() - t0
    tokens_per_s = steps * batch * config.context_length / dt
    out = {"tokens_per_s": tokens_per_s, "step_ms": 1000 * dt / steps, "warmup_s": warm, "loss": loss.item()}
    out.update(_optimizer_time(opt, lambda: loss_of_batch(inp, tgt), clip, use_bf16, device))
    if device.type == "cuda":
        out["mfu"] = mfu(tokens_per_s, config, torch.cuda.get_device_name(device))
    del model, opt, loss_of_batch
    return out


def _optimizer_time(opt, forward, clip, use_bf16: bool, device, repeats: int = 5) -> dict:
    """Milliseconds of one ``opt.step()`` alone (repeated on one set of gradients). For lmcore's
    AdamW also the multi-tensor (``foreach``) path, to show what the fused kernel saves."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        loss = forward()
    loss.backward()
    clip()

    def timed():
        opt.step()  # warm-up (compiles a kernel the first time)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            opt.step()
        _sync(device)
        return 1000 * (time.perf_counter() - t0) / repeats

    out = {"optimizer_ms": timed()}
    if isinstance(opt, AdamW):
        fused, opt.fused = opt.fused, False
        out["optimizer_foreach_ms"] = timed()
        opt.fused = fused
        out["optimizer_fused"] = opt._fuse([p for g in opt.param_groups for p in g["params"]])
    opt.zero_grad(set_to_none=True)
    return out


def measure_training_memory(config: ModelConfig, batch: int, device) -> dict:
    """Peak memory of eager lmcore training steps against ``memory_estimate``."""
    torch.manual_seed(0)
    model = TransformerLM(config).to(device)
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x = torch.randint(0, config.vocab_size, (batch, config.context_length + 1), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    step()
    _sync(device)
    measured = torch.cuda.max_memory_allocated(device)
    est = memory_estimate(config, batch, config.context_length, "bfloat16", "adamw")
    del model, opt
    torch.cuda.empty_cache()
    return {"batch": batch, "seq": config.context_length, "measured_bytes": measured,
            "estimate_bytes": est["total"], "estimate_parts": est, "ratio": est["total"] / measured}


def _decode(config: ModelConfig, device, new_tokens: int) -> dict:
    """Greedy decoding with and without the KV cache: same tokens, different speed."""
    from lmcore.generate import generate

    torch.manual_seed(0)
    model = TransformerLM(config).to(device).eval()
    prompts = [[1 + i for i in range(16)]] * (4 if device.type == "cpu" else 32)
    out = {}
    for use_cache in (True, False):
        generate(model, prompts, 4, temperature=0, use_cache=use_cache)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        tokens = generate(model, prompts, new_tokens, temperature=0, use_cache=use_cache)
        _sync(device)
        seconds = time.perf_counter() - t0
        out["cache" if use_cache else "recompute"] = {"tokens_per_s": len(prompts) * new_tokens / seconds}
        out.setdefault("tokens", []).append(tokens)
    same = out.pop("tokens")
    out["identical_tokens"] = same[0] == same[1]
    out["speedup"] = out["cache"]["tokens_per_s"] / out["recompute"]["tokens_per_s"]
    return out


def _commit() -> str | None:
    """The git commit of the lmcore checkout being measured, when there is one."""
    import os
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


DESCRIPTION = ("Training throughput (tokens/s), model FLOP utilisation and peak memory of lmcore's stack against "
               "a torch.nn + F.scaled_dot_product_attention baseline of the same architecture, bf16 autocast, "
               "same process.")


def write_results(result: dict, out_dir: str) -> dict:
    """Write ``result`` as ``train-<gpu>.json``, ``.csv`` and ``-memory.csv`` in ``out_dir``; their paths."""
    import csv
    import json
    import os

    from lmcore.bench import gpu_slug
    from lmcore.utils import atomic_write

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"train-{gpu_slug(result['provenance'].get('gpu'))}")
    mode = "compiled" if result["compile"] else "eager"
    rows = [{"preset": name, "mode": mode, "stack": stack, "batch": m["batch"], "context": m["context"],
             "tokens_per_s": round(m[stack]["tokens_per_s"], 1), "step_ms": round(m[stack]["step_ms"], 3),
             "mfu": round(m[stack]["mfu"], 4) if "mfu" in m[stack] else "",
             "speed_ratio_vs_baseline": round(m[stack]["tokens_per_s"] / m["baseline"]["tokens_per_s"], 3)}
            for name, m in sorted(result["metrics"].items()) for stack in ("baseline", "lmcore")]
    memory = [{"preset": name, "batch": m["batch"], "seq": m["seq"], "measured_bytes": m["measured_bytes"],
               "estimate_bytes": m["estimate_bytes"], "ratio": round(m["ratio"], 4)}
              for name, m in sorted(result["memory"].items())]
    paths = {"json": stem + ".json"}
    for key, table in (("csv", rows), ("memory", memory)):
        if not table:
            continue
        paths[key] = stem + ("-memory.csv" if key == "memory" else ".csv")
        with atomic_write(paths[key]) as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    with atomic_write(paths["json"]) as f:
        json.dump({**result, "description": DESCRIPTION}, f, indent=1, sort_keys=True, default=str)
    return paths


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lmcore.bench train")
    parser.add_argument("--quick", action="store_true", help="tiny preset on CPU, a few steps")
    parser.add_argument("--presets", default="tinystories-17m,gpt2-small-shape")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out-dir", default=None, help="write train-<gpu>.json, .csv and -memory.csv here")
    args = parser.parse_args(argv)
    from lmcore.bench import provenance

    device = torch.device("cpu") if args.quick or not torch.cuda.is_available() else torch.device("cuda")
    presets = ["tiny"] if args.quick else args.presets.split(",")
    steps = 3 if args.quick else args.steps
    compile_ = device.type == "cuda" and not args.no_compile
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    result = {"provenance": {**provenance(), "lmcore_commit": _commit()}, "device": str(device), "compile": compile_, "dtype":
              "bfloat16 autocast" if device.type == "cuda" else "float32", "metrics": {}, "memory": {}}
    for name in presets:
        config = ModelConfig.preset(name, attention_backend="sdpa")
        batch = BATCH.get(name, 8)
        row = {"batch": batch, "context": config.context_length, "flops_per_token": flops_per_token(config)}
        for kind in ("baseline", "lmcore"):
            row[kind] = _throughput(kind, config, batch, steps, device, compile_)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["speed_ratio"] = row["lmcore"]["tokens_per_s"] / row["baseline"]["tokens_per_s"]
        result["metrics"][name] = row
    decode_cfg = ModelConfig.preset("tiny" if args.quick else "tinystories-17m")
    result["decode"] = _decode(decode_cfg, device, 40 if args.quick else 200)
    if device.type == "cuda" and not args.skip_memory:
        for name, batch in MEMORY_CASES:
            result["memory"][name] = measure_training_memory(ModelConfig.preset(name), batch, device)
    if args.out_dir:
        result["files"] = write_results(result, args.out_dir)
    return result
