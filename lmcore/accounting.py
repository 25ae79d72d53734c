"""Counting a TransformerLM: parameters, FLOPs per token and training memory.

The memory estimate follows what autograd keeps for *this* implementation (``lmcore.nn`` with a
fused attention backend such as ``sdpa``): every tensor a layer saves for its backward pass is
listed in :func:`activation_bytes_per_layer`, so the chapter can show where each byte goes.
"""

from __future__ import annotations

from lmcore.nn import ModelConfig, checkpointed_blocks
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
    d, V = c.d_model, c.vocab_size
    layer = _matrix_params_per_layer(c) + _vector_params_per_layer(c)
    total = c.n_layers * layer + _norm_params(c)  # + final norm
    total += V * d if (embedding or c.tie_weights) else 0  # input table (it *is* the head when tied)
    total += 0 if c.tie_weights else V * d  # output head
    return total


def _matrix_params_per_layer(c: ModelConfig) -> int:
    """Weights of one block's matrices: q, k, v, o projections and the feed-forward network."""
    q, kv = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    return 2 * c.d_model * q + 2 * c.d_model * kv + (3 if c.mlp == "gated" else 2) * c.d_model * c.d_ff


def _norm_params(c: ModelConfig) -> int:
    return c.d_model * (2 if c.norm_bias else 1)


def _vector_params_per_layer(c: ModelConfig) -> int:
    """Gains and biases of one block: two norms, optional QK-norm gains and projection/MLP biases."""
    q, kv = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    ffn_bias = (2 * c.d_ff if c.mlp == "gated" else c.d_ff) + c.d_model
    return (2 * _norm_params(c) + (2 * c.head_dim if c.qk_norm else 0)
            + (q + 2 * kv + c.d_model if c.attention_bias else 0) + (ffn_bias if c.mlp_bias else 0))


def flops_breakdown(config: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Forward FLOPs per token by component (a multiply-add counts 2).

    Attention scores count the full ``seq_len x seq_len`` matrix (the usual convention, as in
    the PaLM paper's MFU), although a causal kernel only computes half of it.
    """
    c = _check(config)
    T = c.context_length if seq_len is None else seq_len
    d, q, kv, L = c.d_model, c.n_heads * c.head_dim, c.kv_heads * c.head_dim, c.n_layers
    return {
        "attention projections": 2 * L * (2 * d * q + 2 * d * kv),
        "attention scores": 2 * L * 2 * T * q,  # q k^T and (probabilities) v
        "feed-forward": 2 * L * (3 if c.mlp == "gated" else 2) * d * c.d_ff,
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
    q, kv = H * c.head_dim, c.kv_heads * c.head_dim
    grouped = kv != q and attention_capabilities(c.attention_backend).grouped_kv
    # keys and values: repeated for a backend that needs as many key as query heads (the copies are
    # saved); otherwise v is a view into the stacked q|k|v projection output, which keeps all of it alive
    keys_values = 2 * a * n * q if kv != q and not grouped else a * n * (q + 2 * kv)
    rotated = a * n * q + (a * n * kv if kv == q or grouped else 0)  # a repeated k is saved as its copies
    # RMSNorm keeps x * rsqrt(mean x^2) and the rsqrt; LayerNorm only a mean and an inverse deviation per row
    norm = 4 * n * d + 4 * n if c.norm == "rmsnorm" else 8 * n
    # a fused kernel saves its output (B, H, T, D) for its backward; the o_proj input is a second copy, the
    # heads merged back to (B, T, H*D) (a reshape of the transposed output copies). A backend that writes
    # the scores out saves probabilities and v instead of its output.
    fused_out = 0 if attention_capabilities(c.attention_backend).stores_scores else a * n * q
    parts = {
        f"residual stream ({1 if c.parallel_residual else 2} per block, float32)":
            (1 if c.parallel_residual else 2) * 4 * n * d,
        f"{'RMSNorm x/rms' if c.norm == 'rmsnorm' else 'LayerNorm mean/rstd'} (2, float32)": 2 * norm,
        "matmul inputs (normed x twice, merged heads)": 2 * a * n * d + a * n * q,
        "rotated q, k; v; attention output": rotated + keys_values + fused_out + 4 * n * H,  # + log-sum-exp
    }
    if a == 2:  # the rotation casts its cos and sin rows (seq, rotary_dim / 2) to bf16 for q and for k and
        # saves them (a float32 rotation uses views of the tables): 2 calls x 2 tables x seq x rotary_dim/2 x 2 B
        parts["rotary cos/sin (bf16 copies)"] = 4 * seq * c.rotary_dim
    if c.qk_norm:  # float32 copy of q and k (autocast) and x*rsqrt, plus one rsqrt per head and row
        parts["QK-norm (float32)"] = (8 if a == 2 else 4) * n * (q + kv) + 4 * n * (H + c.kv_heads)
    if c.mlp == "gated":
        parts["SwiGLU hidden (W1x|W3x, silu, product)"] = 4 * a * n * f
    else:
        parts["MLP hidden (W1x + b, activation)"] = 2 * a * n * f
    if attention_capabilities(c.attention_backend).stores_scores:  # written out: scores and probabilities kept
        parts["attention matrix (T x T)"] = batch * H * seq * seq * (3 * a if a == 2 else 2 * a) + seq * seq
    return parts


def _bytes(dtype: str) -> int:
    if dtype not in _BYTES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_BYTES)}")
    return _BYTES[dtype]


def memory_estimate(config: ModelConfig, batch: int, seq: int | None = None, dtype: str = "bfloat16",
                    optimizer: str = "adamw", checkpointing: bool = False,
                    optimizer_options: dict | None = None, loss_chunk: int | None = None) -> dict[str, int]:
    """Peak bytes of one training step: weights, gradients, optimizer state, activations, logits, total.

    See ``memory_peaks``, which also returns the two candidate peaks.
    """
    est = memory_peaks(config, batch, seq, dtype, optimizer, checkpointing, optimizer_options, loss_chunk)
    return {k: v for k, v in est.items() if k not in ("at_backward", "at_step")}


def memory_peaks(config: ModelConfig, batch: int, seq: int | None = None, dtype: str = "bfloat16",
                 optimizer: str = "adamw", checkpointing: bool = False,
                 optimizer_options: dict | None = None, loss_chunk: int | None = None) -> dict[str, int]:
    """Peak bytes of one training step by part, and the candidate peaks ``at_backward``, ``at_step``.

    Weights are float32 (``dtype`` is the autocast compute type); ``buffers`` are the rotary cos/sin
    tables. With ``checkpointing`` each chosen block keeps only its input; it takes what
    ``TransformerLM.activation_checkpointing`` takes (``True``, every ``k``-th block, a list of blocks).
    ``loss_chunk`` is the chunk size of ``TransformerLM.loss`` (``lmcore.train.chunked_cross_entropy``).
    The step's memory is highest at one of three moments, each counted from what is alive then:

    - **the loss's backward** (the first thing backward does): every saved activation, no weight
      gradient yet but the output head's. Without ``loss_chunk`` the float32 log-probabilities
      saved by the loss's log-softmax, and the two gradients its backward holds at once: that of
      the log-probabilities (from the loss) and that of the logits. With it,
      ``chunked_cross_entropy`` holds its float32 gradient of the head (V, d), the gradient of the hidden states (N, d), the bf16 copy of
      the head, and the temporaries of one chunk counted line by line (``_chunk_temporaries``): a
      chunk's logits, their float32 copy, the softmax, the gradient of the logits, and, from the
      second chunk on, the previous chunk's softmax and gradient, which live until their names are
      bound again. Hence a single chunk (``seq <= loss_chunk``) peaks 4 (rows x V) float32 bytes
      lower than several.
    - **the backward of each block** (``_block_backward_peak``, the largest over the blocks): the
      gradients of the blocks above and of the head, what the blocks below still hold (a checkpointed
      block its input, another everything it saved), the block's own saved tensors (recomputed when
      checkpointed) and the working set of its feed-forward backward.
    - **the optimizer step**: weights, gradients, state and the update's temporaries.

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
    if loss_chunk is not None and not (isinstance(loss_chunk, int) and loss_chunk >= 1):
        raise ValueError(f"loss_chunk={loss_chunk!r} must be a positive integer or None")
    a = _bytes(dtype)
    n, d, V = batch * seq, c.d_model, c.vocab_size
    N = count_params(c)
    weights, grads = 4 * N, 4 * N
    opt = 4 * N * states[optimizer] if optimizer in states else _state_bytes(c, optimizer, optimizer_options or {})
    buffers = 2 * 4 * c.context_length * (c.rotary_dim // 2)  # rotary cos and sin, float32 (context, rotary/2)
    layer = sum(activation_bytes_per_layer(c, batch, seq, dtype).values())
    layer_casts = 2 * _matrix_params_per_layer(c) if a == 2 else 0  # bf16 weight copies saved by the matmuls
    final_norm = 4 * n * d + 4 * n if c.norm == "rmsnorm" else 8 * n
    head_input = a * n * d if loss_chunk is None else 4 * n * d  # the chunked loss saves the float32 hidden
    head = 4 * n * d + final_norm + head_input + 4 * n  # last residual, final norm, head input, log-sum-exps
    head_cast = 2 * V * d if a == 2 else 0  # the bf16 head, made again by the chunked loss's backward
    blocks = checkpointed_blocks(checkpointing, c.n_layers)
    saved = [4 * n * d if i in blocks else layer + layer_casts for i in range(c.n_layers)]
    activations = sum(saved) + head + head_cast
    if loss_chunk is None:  # float32 log-probabilities saved by the loss + two gradients in its backward
        logits = 4 * n * V + 2 * 4 * n * V
    else:  # one chunk's temporaries, the float32 gradients of the head (V, d) and of the hidden states (N, d)
        logits = _chunk_temporaries(n, V, d, a, loss_chunk) + 4 * V * d + 4 * n * d
    fixed = weights + opt + buffers
    backward_start = fixed + activations + logits
    blocks_peak = _block_backward_peak(c, n, a, saved, blocks, layer + layer_casts)
    optimizer_step = weights + grads + opt + buffers + _step_temporaries(c, optimizer)  # + the update's
    at_backward = max(backward_start, fixed + blocks_peak)
    return {"weights": weights, "gradients": grads, "optimizer": opt, "buffers": buffers,
            "activations": activations, "logits": logits, "at_backward": at_backward, "at_step": optimizer_step,
            "total": max(at_backward, optimizer_step)}


def _chunk_temporaries(n: int, V: int, d: int, a: int, chunk: int) -> int:
    """Largest bytes of temporaries inside the backward loop of ``chunked_cross_entropy``.

    For a chunk of ``r`` rows after one of ``p`` rows (``p = 0`` for the first), at three moments:
    forming ``exp(logits - lse)``: the float32 logits and their shifted copy (8 r V) beside the previous
    chunk's softmax (4 p V) and logit gradient (``a`` p V; in float32 the scaled softmax itself);
    scaling: softmax, scaled copy and its cast (8 r V, + 2 r V in bf16) beside the previous gradient;
    the head's gradient product: softmax, logit gradient and the (V, d) product (+ its float32 copy in
    bf16). In bf16 the first chunk peaks at 10 r V bytes, the later ones at 14 r V.
    """
    k = -(-n // chunk)  # number of chunks
    r, last = min(chunk, n), n - (k - 1) * chunk
    pairs = [(0, r)] + ([(chunk, chunk)] if k >= 3 else []) + ([(chunk, last)] if k >= 2 else [])
    bf16 = a == 2
    return max(max(8 * r * V + (4 + a) * p * V,
                   8 * r * V + (2 * r * V if bf16 else 0) + a * p * V,
                   4 * r * V + a * r * V + a * V * d + (4 * V * d if bf16 else 0)) for p, r in pairs)


def _block_backward_peak(c: ModelConfig, n: int, a: int, saved: list[int], blocks: frozenset, block: int) -> int:
    """Largest activation and gradient bytes while one block runs its backward (weights and state apart).

    At block ``i``: the gradients of the head and final norm and of the blocks above (each complete),
    what blocks ``0 .. i-1`` saved, block ``i``'s own saved tensors (recomputed from its kept input when
    checkpointed, the input still alive), and the working set of its feed-forward backward: the incoming
    float32 gradient (N, d) and its cast, the gradients of the hidden units (2 of (N, d_ff) for the gated
    network, after the product's saved input is freed; 1 for the plain one) and W2's float32 gradient.
    """
    per_block = 4 * (_matrix_params_per_layer(c) + _vector_params_per_layer(c))
    head_grads = 4 * (c.vocab_size * c.d_model + _norm_params(c))
    work = 4 * n * c.d_model + a * n * c.d_model + (2 if c.mlp == "gated" else 1) * a * n * c.d_ff \
        + 4 * c.d_ff * c.d_model
    below, peak = 0, 0
    for i in range(c.n_layers):
        own = block + (4 * n * c.d_model if i in blocks else 0)
        peak = max(peak, head_grads + (c.n_layers - 1 - i) * per_block + below + own + work)
        below += saved[i]
    return peak


#: Float32 copies of one parameter alive at once inside an ``lmcore.optim`` step, counted from the code:
#: dequantized moments and a denominator (adamw8bit), Adam's direction beside the preconditioned one
#: (shampoo), the rotated gradient, momentum and update (soap; low-bit adds the dequantized moments).
#: Muon holds its copies for a whole stack of matrices (see ``_step_temporaries``).
OPTIMIZER_STEP_TEMPORARIES = {"adamw8bit": 4, "shampoo": 4, "soap": 4, "soap-lowbit": 6, "muon": 3}


def _step_temporaries(c: ModelConfig, optimizer: str) -> int:
    """Bytes of temporaries at the optimizer step: copies of the largest matrix, or for Muon of the
    largest stack of hidden matrices that iterate together, a shape with its transpose (the stack,
    the Newton-Schulz products and the next iterate)."""
    if optimizer != "muon":
        return OPTIMIZER_STEP_TEMPORARIES.get(optimizer, 1) * 4 * c.vocab_size * c.d_model
    from lmcore.nn import TransformerLM
    from lmcore.optim import param_roles

    stacks: dict[tuple, int] = {}
    for _, p, role in param_roles(TransformerLM(c, device="meta")):
        if role == "hidden":
            m, n = p.shape[0], p.numel() // p.shape[0]
            key = (min(m, n), max(m, n))  # the wide orientation, as lmcore.optim.Muon stacks them
            stacks[key] = stacks.get(key, 0) + p.numel()
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
                        optimizer_options: dict | None = None, loss_chunk: int | None = None) -> int:
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
    from lmcore.train import TrainConfig, configure_optimizer

    c = _check(config)
    seq = c.context_length if seq is None else seq
    torch.manual_seed(seed)
    model = TransformerLM(c).to(device)
    model.activation_checkpointing = checkpointing
    opt = configure_optimizer(model, TrainConfig(optimizer=optimizer, optimizer_options=optimizer_options or {}))
    x = torch.randint(0, c.vocab_size, (batch, seq + 1), device=device)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=_bytes(dtype) == 2):
            loss = model.loss(x[:, :-1], x[:, 1:], loss_chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    return int(tracker.get_tracker_snapshot("peak")[torch.device(device)]["Total"])


#: Data-parallel schemes of ``sharded_memory_estimate``: what each splits over the ranks.
SHARDING = ("ddp", "zero1", "fsdp")


def sharded_memory_estimate(config: ModelConfig, batch: int, world_size: int, scheme: str = "fsdp",
                            seq: int | None = None, dtype: str = "bfloat16", **options) -> dict[str, int]:
    """Peak bytes per rank of one training step under data parallelism over ``world_size`` ranks.

    ``memory_peaks`` (same ``options``: optimizer, checkpointing, loss_chunk...) gives one rank's
    step; ``scheme`` then splits the model states: 'ddp' none, 'zero1' the optimizer state, 'fsdp'
    weights, gradients and optimizer state. Both peaks of ``memory_peaks`` are recomputed with the
    sharded states (the one at the start of backward may then be the larger). FSDP adds what it
    gathers: the root's weights (embedding, head) for the whole step and two
    blocks' weights at a time (the one computing, the next one prefetched) in ``dtype``, plus
    one block's gradients in float32 before they are reduce-scattered.
    """
    if scheme not in SHARDING:
        raise ValueError(f"scheme={scheme!r}: expected one of {', '.join(SHARDING)}")
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size={world_size!r}: expected a positive integer")
    c = _check(config)
    est = memory_peaks(c, batch, seq, dtype=dtype, **options)
    keep = 1 - 1 / world_size
    if scheme == "ddp":
        return {**est, "sharded_away": 0, "gathered": 0}
    if scheme == "zero1":
        away = int(est["optimizer"] * keep)
        return {**est, "at_backward": est["at_backward"] - away, "at_step": est["at_step"] - away,
                "total": est["total"] - away, "sharded_away": away, "gathered": 0}
    held = est["weights"] + est["optimizer"]  # at the start of backward (no gradients yet)
    at_backward = est["at_backward"] - int(held * keep)
    at_step = est["at_step"] - int((held + est["gradients"]) * keep)
    block = _matrix_params_per_layer(c) + _vector_params_per_layer(c)
    root = count_params(c) - c.n_layers * block
    gathered = int(world_size > 1) * (_bytes(dtype) * (root + 2 * block) + 4 * block)
    total = max(at_backward, at_step) + gathered
    return {**est, "at_backward": at_backward, "at_step": at_step, "total": total,
            "sharded_away": est["total"] - total + gathered, "gathered": gathered}
