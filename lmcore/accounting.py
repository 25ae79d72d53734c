"""Counting a TransformerLM: parameters, FLOPs per token and training memory.

The memory estimate follows what autograd keeps for *this* implementation (``lmcore.nn`` with a
fused attention backend such as ``sdpa``): every tensor a layer saves for its backward pass is
listed in :func:`activation_bytes_per_layer`, so the chapter can show where each byte goes.
"""

from __future__ import annotations

from lmcore.nn import ModelConfig
from lmcore.nn.registry import attention_capabilities

#: Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets), for model FLOP utilisation.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "GH200": 989.4, "A100": 312.0,
                    "A10G": 70.0, "L4": 121.0, "L40S": 362.0, "4090": 165.2, "B200": 2250.0}

_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def _check(config) -> ModelConfig:
    if not isinstance(config, ModelConfig):
        raise TypeError(f"expected a ModelConfig, got {type(config).__name__}")
    return config


def count_params(config: ModelConfig, embedding: bool = True) -> int:
    """Trainable parameters of ``TransformerLM(config)`` (a tied head counted once).

    ``embedding=False`` leaves out the input embedding table (the convention of scaling laws).
    """
    c = _check(config)
    d, kv = c.d_model, c.kv_heads * c.head_dim
    attn = d * d + 2 * d * kv + d * d  # q, k, v, o projections
    layer = attn + 3 * d * c.d_ff + 2 * d  # + SwiGLU + two RMSNorm gains
    total = c.n_layers * layer + d  # + final norm
    total += c.vocab_size * d if (embedding or c.tie_weights) else 0  # input table (it *is* the head when tied)
    total += 0 if c.tie_weights else c.vocab_size * d  # output head
    return total


def flops_breakdown(config: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Forward FLOPs per token by component (a multiply-add counts 2).

    Attention scores count the full ``seq_len x seq_len`` matrix (the usual convention, as in
    the PaLM paper's MFU), although a causal kernel only computes half of it.
    """
    c = _check(config)
    T = c.context_length if seq_len is None else seq_len
    d, kv, L = c.d_model, c.kv_heads * c.head_dim, c.n_layers
    return {
        "attention projections": 2 * L * (2 * d * d + 2 * d * kv),
        "attention scores": 2 * L * 2 * T * d,  # q k^T and (probabilities) v
        "feed-forward": 2 * L * 3 * d * c.d_ff,
        "output head": 2 * d * c.vocab_size,
    }


def flops_per_token(config: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """FLOPs per token: the forward pass, or forward + backward (3x) when ``training``."""
    forward = sum(flops_breakdown(config, seq_len).values())
    return 3 * forward if training else forward


def attention_flops(batch: int, heads: int, t_q: int, t_k: int, head_dim: int, causal: bool,
                    backward: bool = False) -> float:
    """Matrix-multiply FLOPs of attention: ``4 B H Tq Tk D`` forward, 2.5x that for the backward.

    Causal attention does about half the work (the exact count of visible pairs is used, the
    queries being the last ``Tq`` of ``Tk`` positions).
    """
    pairs = t_q * t_k
    if causal:  # query i sees i + 1 + (t_k - t_q) keys
        pairs = t_q * (t_k - t_q) + t_q * (t_q + 1) // 2
    fwd = 4.0 * batch * heads * pairs * head_dim
    return fwd * (1.0 + 2.5) if backward else fwd


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU from its name, or None when unknown."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def mfu(tokens_per_s: float, config: ModelConfig, device_name: str, seq_len: int | None = None) -> float | None:
    """Model FLOP utilisation: achieved training FLOP/s over the device's bf16 peak."""
    peak = peak_tflops(device_name)
    return None if peak is None else tokens_per_s * flops_per_token(config, seq_len) / (peak * 1e12)


def activation_bytes_per_layer(config: ModelConfig, batch: int, seq: int, dtype: str = "bfloat16") -> dict[str, int]:
    """Bytes one Transformer block saves for backward, by tensor.

    ``dtype="bfloat16"`` means float32 weights and residual stream with bf16 autocast (matmul
    inputs and outputs in bf16); ``"float32"`` means no autocast.
    """
    c = _check(config)
    a = _bytes(dtype)
    n, d, f, H = batch * seq, c.d_model, c.d_ff, c.n_heads
    kv = c.kv_heads * c.head_dim
    # keys and values: with grouped-query heads the repeated copies are saved; otherwise v is a
    # view into the stacked q|k|v projection output, which keeps all of it alive
    keys_values = 2 * a * n * d if kv != d else a * n * (d + 2 * kv)
    parts = {
        "residual stream (2 per block, float32)": 2 * 4 * n * d,
        "RMSNorm x/rms (2, float32)": 2 * 4 * n * d + 2 * 4 * n,
        "matmul inputs (normed x twice, merged heads)": 3 * a * n * d,
        "rotated q, k; v; attention output": 2 * a * n * d + keys_values + 4 * n * H,  # + log-sum-exp per row
        "SwiGLU hidden (W1x|W3x, silu, product)": 4 * a * n * f,
    }
    if attention_capabilities(c.attention_backend).stores_scores:  # written out: scores and probabilities kept
        parts["attention matrix (T x T)"] = batch * H * seq * seq * (3 * a if a == 2 else 2 * a) + seq * seq
    return parts


def _bytes(dtype: str) -> int:
    if dtype not in _BYTES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_BYTES)}")
    return _BYTES[dtype]


def memory_estimate(config: ModelConfig, batch: int, seq: int | None = None, dtype: str = "bfloat16",
                    optimizer: str = "adamw", checkpointing: bool = False,
                    optimizer_options: dict | None = None) -> dict[str, int]:
    """Peak bytes of one training step: weights, gradients, optimizer state, activations.

    Weights are float32 (``dtype`` is the autocast compute type). The peak comes either while
    backward starts (every activation saved, the logits' gradient being formed, no weight
    gradients yet) or at the optimizer step (gradients complete, activations freed); the larger
    is ``total``. With ``checkpointing`` each block keeps only its input and one block's
    activations are recomputed at a time.

    ``optimizer`` may also name any optimizer of :mod:`lmcore.optim` (``adamw8bit``, ``shampoo``,
    ``soap``, ``soap-lowbit``, ``muon``), whose state is counted by ``lmcore.optim.state_bytes_formula``
    (with ``optimizer_options`` such as ``bits`` or ``max_precond_dim``).
    """
    c = _check(config)
    seq = c.context_length if seq is None else seq
    if seq > c.context_length:
        raise ValueError(f"seq={seq} exceeds context_length={c.context_length}")
    states = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}
    if optimizer not in states and optimizer not in OPTIMIZER_STEP_TEMPORARIES:
        raise ValueError(f"optimizer={optimizer!r} is not one of {sorted(states) + sorted(OPTIMIZER_STEP_TEMPORARIES)}")
    a = _bytes(dtype)
    n, d, V = batch * seq, c.d_model, c.vocab_size
    N = count_params(c)
    matmul_params = N - c.n_layers * 2 * d - d - (0 if c.tie_weights else V * d)  # without norms, input table
    weights, grads = 4 * N, 4 * N
    opt = 4 * N * states[optimizer] if optimizer in states else _state_bytes(c, optimizer, optimizer_options or {})
    layer = sum(activation_bytes_per_layer(c, batch, seq, dtype).values())
    head = 4 * n * d + 4 * n * d + (a * n * d if a == 2 else 0) + 8 * n  # last residual, final norm, head input
    logits = 4 * n * V + 3 * 4 * n * V  # float32 logits saved by the loss + three temporaries of its gradient
    head_cast = 2 * V * d if a == 2 else 0
    casts = 2 * matmul_params if a == 2 else 0  # bf16 copies of the weights, held until backward uses them
    if checkpointing:  # blocks keep their inputs; one block is recomputed at a time during backward
        activations = c.n_layers * 4 * n * d + head + head_cast
        # while a block is recomputed and differentiated, on average half the gradients exist and its
        # backward needs about a third more than its saved activations in temporaries (measured)
        recompute = weights + opt + grads // 2 + c.n_layers * 4 * n * d + (4 * layer) // 3
        backward_start = max(weights + opt + activations + logits, recompute)
    else:
        activations = c.n_layers * layer + head + casts
        backward_start = weights + opt + activations + logits
    optimizer_step = weights + grads + opt + _step_temporaries(c, optimizer)  # + temporaries of the update
    return {"weights": weights, "gradients": grads, "optimizer": opt, "activations": activations,
            "logits": logits, "total": max(backward_start, optimizer_step)}


#: Float32 copies of one parameter alive at once inside an ``lmcore.optim`` step, counted from the code:
#: dequantized moments and a denominator (adamw8bit), Adam's direction beside the preconditioned one
#: (shampoo), the rotated gradient, momentum and update (soap; low-bit adds the dequantized moments).
#: Muon holds its copies for a whole stack of same-shaped matrices (see ``_step_temporaries``).
OPTIMIZER_STEP_TEMPORARIES = {"adamw8bit": 4, "shampoo": 4, "soap": 4, "soap-lowbit": 6, "muon": 3}


def _step_temporaries(c: ModelConfig, optimizer: str) -> int:
    """Bytes of temporaries at the optimizer step: copies of the largest matrix, or for Muon of the
    largest stack of same-shaped hidden matrices (updates, their stack, the Newton-Schulz iterate)."""
    if optimizer != "muon":
        return OPTIMIZER_STEP_TEMPORARIES.get(optimizer, 1) * 4 * c.vocab_size * c.d_model
    from lmcore.nn import TransformerLM
    from lmcore.optim import param_roles

    stacks: dict[tuple, int] = {}
    for _, p, role in param_roles(TransformerLM(c, device="meta")):
        if role == "hidden":
            stacks[tuple(p.shape)] = stacks.get(tuple(p.shape), 0) + p.numel()
    return OPTIMIZER_STEP_TEMPORARIES["muon"] * 4 * max(stacks.values(), default=0)


def _state_bytes(c: ModelConfig, optimizer: str, options: dict) -> int:
    """Optimizer state by the formulas of ``lmcore.optim.memory``, from a model built on the meta device."""
    from lmcore.nn import TransformerLM
    from lmcore.optim import state_bytes_formula

    options = {k: v for k, v in options.items() if k in ("min_8bit_size", "block", "bits", "max_precond_dim",
                                                        "quantize_bases")}
    return state_bytes_formula(optimizer, TransformerLM(c, device="meta"), **options)


def tracked_peak_memory(config: ModelConfig, batch: int, seq: int | None = None, dtype: str = "bfloat16",
                        checkpointing: bool = False, device="cpu", seed: int = 0, optimizer: str = "adamw",
                        optimizer_options: dict | None = None) -> int:
    """Peak bytes of live tensors during one training step (the second; the first creates the
    optimizer state), tracked tensor by tensor with torch's ``MemTracker``. Works on CPU, where
    there is no allocator statistic like ``torch.cuda.max_memory_allocated``.
    """
    import torch

    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as err:  # a private tool: present in the torch versions lmcore supports
        raise ImportError(f"torch {torch.__version__} has no MemTracker to track memory with") from err
    from lmcore.nn import TransformerLM
    from lmcore.train import TrainConfig, configure_optimizer, cross_entropy

    c = _check(config)
    seq = c.context_length if seq is None else seq
    torch.manual_seed(seed)
    model = TransformerLM(c).to(device)
    model.activation_checkpointing = checkpointing
    opt = configure_optimizer(model, TrainConfig(optimizer=optimizer, optimizer_options=optimizer_options or {}))
    x = torch.randint(0, c.vocab_size, (batch, seq + 1), device=device)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=_bytes(dtype) == 2):
            loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    return int(tracker.get_tracker_snapshot("peak")[torch.device(device)]["Total"])
