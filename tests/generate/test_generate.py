"""Sampling: the filters, the KV cache against recomputation, batching and end-of-text."""

import pytest
import torch

from lmcore.generate import generate, sample_next
from lmcore.nn import ModelConfig, TransformerLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TransformerLM(ModelConfig.preset("tiny", vocab_size=64, context_length=48))


def test_greedy_with_cache_equals_recomputation(model):
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    cached = generate(model, prompts, 20, temperature=0)
    recomputed = generate(model, prompts, 20, temperature=0, use_cache=False)
    assert cached == recomputed
    assert [len(c) for c in cached] == [20, 20, 20]


def test_batched_prompts_match_one_at_a_time(model):
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    together = generate(model, prompts, 8, temperature=0)
    alone = [generate(model, [p], 8, temperature=0)[0] for p in prompts]
    assert together == alone


def test_sampling_is_seeded_and_temperature_matters(model):
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = generate(model, [[1, 2]], 16, temperature=1.0, generator=g(0))
    b = generate(model, [[1, 2]], 16, temperature=1.0, generator=g(0))
    c = generate(model, [[1, 2]], 16, temperature=1.0, generator=g(1))
    assert a == b and a != c


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = lambda **kw: {int(sample_next(logits, generator=gen, **kw)) for _ in range(300)}  # noqa: E731
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert draws(top_p=0.5) == {0}
    assert draws() == {0, 1, 2, 3}
    assert int(sample_next(logits, temperature=0)) == 0
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, top_p=1.5)


def test_stops_at_end_of_text(model):
    first = generate(model, [[1, 2, 3]], 10, temperature=0)[0]
    eot = first[3]  # pretend the 4th greedy token is end-of-text
    out = generate(model, [[1, 2, 3], [4, 5, 6]], 10, temperature=0, eot_id=eot)
    assert out[0] == first[: first.index(eot) + 1] and out[0][-1] == eot and len(out[0]) <= 4
    assert len(out[1]) == 10 or out[1][-1] == eot


def test_refuses_to_run_past_the_context(model):
    with pytest.raises(ValueError, match="exceeds the model's context_length=48"):
        generate(model, [[1] * 40], 10)


@pytest.mark.parametrize("bad", [-1, 64, 2.0, True])
def test_refuses_prompt_ids_outside_the_vocabulary(model, bad):
    with pytest.raises(ValueError, match=rf"prompt 1 holds token id {bad!r}; expected int ids in 0..63"):
        generate(model, [[1, 2], [3, bad]], 2, temperature=0)


def test_prompts_may_be_tensors(model):
    assert generate(model, [torch.tensor([1, 2, 3])], 4, temperature=0) == generate(model, [[1, 2, 3]], 4,
                                                                                   temperature=0)
