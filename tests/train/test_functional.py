"""Loss, optimizer, schedule, clipping and batches against their definitions and torch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmcore.train import AdamW, clip_grad_norm, cosine_lr, cross_entropy, get_batch, load_tokens


def test_cross_entropy_matches_torch_and_survives_large_logits():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    torch.testing.assert_close(cross_entropy(logits, targets), F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)))
    huge = logits * 1e4
    loss = cross_entropy(huge, targets)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, F.cross_entropy(huge.reshape(-1, 11), targets.reshape(-1)))
    with pytest.raises(ValueError, match="disagree"):
        cross_entropy(logits, targets[:, :4])


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_matches_torch_step_for_step(foreach):
    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    torch_model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    torch_model.load_state_dict(ours_model.state_dict())
    kw = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)
    groups = lambda m: [{"params": [m[0].weight, m[2].weight], "weight_decay": 0.1},  # noqa: E731
                        {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0}]
    ours, theirs = AdamW(groups(ours_model), foreach=foreach, **kw), torch.optim.AdamW(groups(torch_model), foreach=False, **kw)
    for step in range(25):
        x = torch.randn(16, 6)
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            opt.zero_grad()
            model(x).square().mean().backward()
            for g in opt.param_groups:
                g["lr"] = 3e-2 * (1 - step / 30)
            opt.step()
        for a, b in zip(ours_model.parameters(), torch_model.parameters()):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    assert ours.state[ours_model[0].weight]["step"] == 25


def test_adamw_refuses_bad_hyperparameters():
    with pytest.raises(ValueError, match="betas"):
        AdamW([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 1.0))


def test_cosine_schedule_shape():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert cosine_lr(0, **kw) == 0.0
    assert cosine_lr(5, **kw) == pytest.approx(0.5)
    assert cosine_lr(10, **kw) == pytest.approx(1.0)
    assert cosine_lr(60, **kw) == pytest.approx(0.55)
    assert cosine_lr(110, **kw) == pytest.approx(0.1)
    assert cosine_lr(500, **kw) == pytest.approx(0.1)
    lrs = [cosine_lr(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_clipping_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 4)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for pa, pb in zip(a, b):
        pa.grad = torch.randn_like(pa) * 10
        pb.grad = pa.grad.clone()
    norm = float(clip_grad_norm(a, 1.0))
    expected = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert norm == pytest.approx(expected.item(), rel=1e-5)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.grad, pb.grad)
    total = math.sqrt(sum(p.grad.square().sum().item() for p in a))
    assert total == pytest.approx(1.0, rel=1e-4)
    assert float(clip_grad_norm(a, 5.0)) == pytest.approx(1.0, rel=1e-4)  # under the limit: untouched


def test_get_batch_windows_are_shifted_by_one(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    np.save(tmp_path / "t.npy", tokens)
    mm = load_tokens(tmp_path / "t.npy")
    x, y = get_batch(mm, 8, 16, "cpu", torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows
    assert int(y.max()) <= 999
    x2, _ = get_batch(mm, 8, 16, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="more than context_length"):
        get_batch(tokens[:10], 2, 16)
    np.save(tmp_path / "bad.npy", np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="1-D array of integer"):
        load_tokens(tmp_path / "bad.npy")


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_chunked_cross_entropy_equals_the_plain_one_values_and_gradients(chunk):
    from lmcore.train import chunked_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (3, 5))
    plain = cross_entropy(hidden @ weight.t(), targets)
    gh, gw = torch.autograd.grad(plain, (hidden, weight))
    chunked = chunked_cross_entropy(hidden, weight, targets, chunk)
    ch, cw = torch.autograd.grad(2.0 * chunked, (hidden, weight))  # an upstream gradient other than 1
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(ch, 2.0 * gh)
    torch.testing.assert_close(cw, 2.0 * gw)
    with pytest.raises(ValueError, match="disagree"):
        chunked_cross_entropy(hidden, weight, targets[:, :4])
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_cross_entropy(hidden, weight, targets, 0)


def test_chunked_loss_of_the_model_under_autocast():
    from lmcore.nn import ModelConfig, TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig.preset("tiny", context_length=16, tie_weights=True))
    ids = torch.randint(0, 512, (2, 17))
    results = []
    for chunk in (None, 5):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(ids[:, :-1], ids[:, 1:], chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-3, rtol=1e-3)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, atol=2e-3, rtol=5e-2)
