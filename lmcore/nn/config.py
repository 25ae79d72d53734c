"""``ModelConfig``: every size and choice of a TransformerLM, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lmcore.nn.rope import ROPE_STYLES


@dataclass
class ModelConfig:
    """Shape and options of a decoder-only Transformer language model."""

    vocab_size: int = 512  # number of token ids
    context_length: int = 64  # longest sequence the model accepts
    d_model: int = 64  # width of the residual stream
    n_layers: int = 2  # Transformer blocks
    n_heads: int = 4  # query heads per attention layer
    d_ff: int = 172  # hidden width of the SwiGLU feed-forward network
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    rope_theta: float = 10000.0  # rotary base
    rope_style: str = "half"  # "half" (GPT-NeoX) or "interleaved" (RoFormer/GPT-J) channel pairing
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_weights: bool = False  # share the embedding table with the output head
    attention_backend: str = "sdpa"  # a name from lmcore.nn.registry
    attention_options: dict = field(default_factory=dict)  # extra keyword arguments for the backend

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                             "each head needs an equal share of the model width")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} is odd; rotary embeddings "
                             "rotate pairs of channels and need an even head dimension")
        kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if not isinstance(kv, int) or kv < 1 or self.n_heads % kv:
            raise ValueError(f"n_kv_heads={self.n_kv_heads!r} must be a positive divisor of "
                             f"n_heads={self.n_heads} (each key/value head serves a whole group of query heads)")
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"rope_style={self.rope_style!r} is not one of {ROPE_STYLES}")
        if not isinstance(self.attention_options, dict):
            raise ValueError(f"attention_options={self.attention_options!r} must be a dict")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

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
