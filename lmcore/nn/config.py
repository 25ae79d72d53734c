"""``ModelConfig``: every size and choice of a TransformerLM, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lmcore.nn.rope import ROPE_STYLES

NORMS = ("rmsnorm", "layernorm")
MLPS = ("gated", "plain")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@dataclass
class ModelConfig:
    """Shape and options of a decoder-only Transformer language model."""

    vocab_size: int = 512  # number of token ids
    context_length: int = 64  # longest sequence the model accepts
    d_model: int = 64  # width of the residual stream
    n_layers: int = 2  # Transformer blocks
    n_heads: int = 4  # query heads per attention layer
    d_ff: int = 172  # hidden width of the feed-forward network
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    d_head: int | None = None  # width of one attention head; None = d_model // n_heads (Qwen3 sets 128)
    rope_theta: float = 10000.0  # rotary base
    rope_style: str = "half"  # "half" (GPT-NeoX) or "interleaved" (RoFormer/GPT-J) channel pairing
    rotary_fraction: float = 1.0  # share of each head's channels that is rotated (Pythia: 0.25)
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm"
    norm_bias: bool = False  # LayerNorm's additive bias (RMSNorm has none)
    norm_eps: float = 1e-5  # normalisation epsilon
    qk_norm: bool = False  # RMSNorm on each query and key head before the rotation (Qwen3)
    mlp: str = "gated"  # "gated" (W2 (act(W1 x) * W3 x), SwiGLU) or "plain" (W2 act(W1 x))
    activation: str = "silu"  # "silu", "gelu" (exact, erf) or "gelu_tanh"
    mlp_bias: bool = False  # biases in the feed-forward matrices
    attention_bias: bool = False  # biases in the q, k, v and output projections
    parallel_residual: bool = False  # x + attn(norm1 x) + mlp(norm2 x) (GPT-NeoX) instead of in sequence
    tie_weights: bool = False  # share the embedding table with the output head
    attention_backend: str = "sdpa"  # a name from lmcore.nn.registry
    attention_options: dict = field(default_factory=dict)  # extra keyword arguments for the backend

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r} must be a positive integer")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                             "each head needs an equal share of the model width (or set d_head)")
        if self.d_head is not None and (not isinstance(self.d_head, int) or self.d_head < 1):
            raise ValueError(f"ModelConfig.d_head={self.d_head!r} must be a positive integer or None")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = {self.head_dim} is odd; rotary embeddings "
                             "rotate pairs of channels and need an even head dimension")
        self._check_choices()
        kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if not isinstance(kv, int) or kv < 1 or self.n_heads % kv:
            raise ValueError(f"n_kv_heads={self.n_kv_heads!r} must be a positive divisor of "
                             f"n_heads={self.n_heads} (each key/value head serves a whole group of query heads)")
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"rope_style={self.rope_style!r} is not one of {ROPE_STYLES}")
        if not isinstance(self.attention_options, dict):
            raise ValueError(f"attention_options={self.attention_options!r} must be a dict")

    def _check_choices(self):
        """The architecture switches: known values, and combinations that can be built."""
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.norm == "rmsnorm" and self.norm_bias:
            raise ValueError("norm_bias=True needs norm='layernorm': RMSNorm only rescales, it has no bias "
                             "(it does not subtract the mean, so there is no centre to shift)")
        if not isinstance(self.rotary_fraction, (int, float)) or not 0 < self.rotary_fraction <= 1:
            raise ValueError(f"rotary_fraction={self.rotary_fraction!r} must lie in (0, 1]")
        if self.rotary_dim % 2 or self.rotary_dim < 2:
            raise ValueError(f"rotary_fraction={self.rotary_fraction} of head_dim={self.head_dim} gives "
                             f"{self.rotary_dim} rotated channels; rotation needs an even number, at least 2")
        if not isinstance(self.norm_eps, (int, float)) or self.norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps!r} must be a positive number")
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 1:
            raise ValueError(f"rope_theta={self.rope_theta!r} must be a number greater than 1")

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that the rotary embedding rotates (the first ``rotary_dim``)."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (see ``PRESETS``), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


#: Named model shapes. ``*-shape`` presets copy a published model's dimensions, not its weights.
#: SwiGLU widths of 8/3 d_model keep the feed-forward parameter count of a 4 d_model GELU MLP.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, context_length=64, d_model=64, n_layers=2, n_heads=4, d_ff=172),
    "tinystories-17m": dict(vocab_size=10000, context_length=256, d_model=512, n_layers=4, n_heads=16,
                            d_ff=1344),
    "pythia-70m-shape": dict(vocab_size=50304, context_length=2048, d_model=512, n_layers=6, n_heads=8,
                             d_ff=2048),
    "gpt2-small-shape": dict(vocab_size=50304, context_length=1024, d_model=768, n_layers=12, n_heads=12,
                             d_ff=2048, tie_weights=True),
}

# The Pythia suite (GPT-NeoX architecture), from the Hugging Face configs of EleutherAI/pythia-70m,
# pythia-160m and pythia-410m: hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
# vocab_size 50304, max_position_embeddings 2048, rotary_pct 0.25, rotary_emb_base 10000,
# use_parallel_residual true, hidden_act "gelu", layer_norm_eps 1e-5, tie_word_embeddings false.
_PYTHIA = dict(vocab_size=50304, context_length=2048, rope_theta=10000.0, rotary_fraction=0.25,
               norm="layernorm", norm_bias=True, norm_eps=1e-5, mlp="plain", activation="gelu", mlp_bias=True,
               attention_bias=True, parallel_residual=True, tie_weights=False)
PRESETS.update({
    "pythia-70m": dict(_PYTHIA, d_model=512, n_layers=6, n_heads=8, d_ff=2048),
    "pythia-160m": dict(_PYTHIA, d_model=768, n_layers=12, n_heads=12, d_ff=3072),
    "pythia-410m": dict(_PYTHIA, d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
})
# Qwen3, from the Hugging Face configs of Qwen/Qwen3-0.6B, Qwen3-4B, Qwen3-8B and Qwen3-32B:
# hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim 128,
# intermediate_size, vocab_size 151936, max_position_embeddings 40960, rope_theta 1000000,
# rms_norm_eps 1e-6, hidden_act "silu", attention_bias false, tie_word_embeddings (true up to 4B).
_QWEN3 = dict(vocab_size=151936, context_length=40960, d_head=128, n_kv_heads=8, rope_theta=1e6, norm_eps=1e-6,
              qk_norm=True)
PRESETS.update({
    "qwen3-0.6b": dict(_QWEN3, d_model=1024, n_layers=28, n_heads=16, d_ff=3072, tie_weights=True),
    "qwen3-4b": dict(_QWEN3, d_model=2560, n_layers=36, n_heads=32, d_ff=9728, tie_weights=True),
    "qwen3-8b": dict(_QWEN3, d_model=4096, n_layers=36, n_heads=32, d_ff=12288),
    "qwen3-32b": dict(_QWEN3, d_model=5120, n_layers=64, n_heads=64, d_ff=25600),
})
