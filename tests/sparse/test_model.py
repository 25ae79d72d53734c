"""The sparse backends plug into TransformerLM unchanged."""

import pytest
import torch

from lmcore.nn import TransformerLM
from lmcore.nn.config import ModelConfig


def model(backend, options, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, context_length=32, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                      attention_backend=backend, attention_options=options)
    return TransformerLM(cfg)


def test_full_window_equals_dense_model():
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    dense = model("sdpa", {})(ids)
    local = model("block_sparse", {"pattern": "local", "block_size": 16, "window": 32})(ids)
    torch.testing.assert_close(local, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend, options", [
    ("block_sparse", {"pattern": "bigbird", "block_size": 16, "window": 8, "num_global": 16, "num_random": 1}),
    ("nsa", {"block_size": 16, "top_n": 1, "window": 8}),
])
def test_sparse_model_trains(backend, options):
    m = model(backend, options)
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(2))
    logits = m(ids)  # (B, T, vocab)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
