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
    ("nsa", {"cmp_block": 8, "cmp_stride": 4, "sel_block": 16, "top_n": 2, "window": 8, "n_local": 1}),
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


def test_nsa_model_trains_then_decodes_with_its_kv_cache_like_the_full_sequence():
    """A model trained with NSA samples with NSA: cached decoding equals recomputing everything.

    It trains and samples through the definition (``impl="torch"``: on a CPU the kernels run in the
    interpreter, minutes for these steps); the same weights under the kernels (``"auto"``) give the
    definition's logits, one cached token at a time as over the whole sequence."""
    from lmcore.generate import generate
    from lmcore.nn import KVCache

    opts = {"cmp_block": 8, "cmp_stride": 4, "sel_block": 16, "top_n": 2, "window": 8, "n_local": 1}

    def nsa_model(impl):
        torch.manual_seed(0)
        return TransformerLM(ModelConfig(vocab_size=64, context_length=64, d_model=32, n_layers=2,
                                         n_heads=4, n_kv_heads=2, d_ff=64, attention_backend="nsa",
                                         attention_options={**opts, "impl": impl}))

    m = nsa_model("torch")
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 48), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    m.eval()
    cached = generate(m, [ids[0, :20].tolist()], 12, temperature=0.0)
    again = generate(m, [ids[0, :20].tolist()], 12, temperature=0.0, use_cache=False)
    assert cached == again
    kernels = nsa_model("auto")
    kernels.load_state_dict(m.state_dict())
    kernels.eval()
    full = {}
    for net, end in ((m, 40), (kernels, 28)):
        cache = KVCache(net.config, 1)
        with torch.no_grad():
            steps = [net(ids[:1, :20], cache)] + [net(ids[:1, t:t + 1], cache) for t in range(20, end)]
            full[net] = net(ids[:1, :end])
        torch.testing.assert_close(torch.cat(steps, 1), full[net], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(full[kernels], full[m][:, :28], atol=2e-5, rtol=1e-4)
