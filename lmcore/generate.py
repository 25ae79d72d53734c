"""Sampling text from a TransformerLM: temperature, top-k, top-p, a KV cache, batched prompts.

With the cache, the prompt is run once and every new token costs one single-position forward
pass; without it, each new token re-runs the whole prefix. Under greedy decoding both give the
same tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lmcore.nn import KVCache, TransformerLM


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id per row of ``logits`` (B, V); ``temperature=0`` is greedy (argmax).

    ``top_k`` keeps the k most likely tokens; ``top_p`` keeps the smallest set of most likely
    tokens whose probabilities sum to at least ``top_p`` (nucleus sampling).
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be a positive integer or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in (0, 1] or be None")
    logits = logits.float()  # (B, V)
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the top token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(model: TransformerLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eot_id: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    Returns the new tokens of each prompt, cut after ``eot_id`` (included) when it is sampled.
    Prompts may differ in length: all rows advance one position per step, and a row whose prompt
    is longer keeps its own prompt tokens until it reaches its end.
    """
    prompts = [p.tolist() if hasattr(p, "tolist") else list(p) for p in prompts]  # tensors and arrays too
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    config = model.config
    for row, prompt in enumerate(prompts):
        bad = [t for t in prompt
               if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {row} holds token id {bad[0]!r}; expected int ids in "
                             f"0..{config.vocab_size - 1} (the model's vocab_size={config.vocab_size})")
    lengths = [len(p) for p in prompts]
    total = max(lengths) + max_new_tokens
    if total > config.context_length:
        raise ValueError(f"longest prompt ({max(lengths)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds the model's context_length={config.context_length}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    B = len(prompts)
    tokens = torch.zeros(B, total, dtype=torch.long, device=device)  # (B, total)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
    length = torch.tensor(lengths, device=device)  # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    start = min(lengths)
    cache = KVCache(config, B, total, device=device, dtype=next(model.parameters()).dtype) if use_cache else None
    logits = model(tokens[:, :start], cache)[:, -1]  # (B, V)
    for pos in range(start, total):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        in_prompt = pos < length
        nxt = torch.where(in_prompt, tokens[:, pos], nxt)
        if eot_id is not None:
            nxt = torch.where(done & ~in_prompt, torch.full_like(nxt, eot_id), nxt)
            done |= (nxt == eot_id) & ~in_prompt
        tokens[:, pos] = nxt
        finished = done | (pos + 1 >= length + max_new_tokens)
        if bool(finished.all()) or pos + 1 == total:
            break
        if use_cache:
            logits = model(tokens[:, pos:pos + 1], cache)[:, -1]  # one position: (B, V)
        else:
            logits = model(tokens[:, :pos + 1])[:, -1]  # the whole prefix again
    model.train(was_training)
    out = []
    for row, n in enumerate(lengths):
        new = tokens[row, n: min(n + max_new_tokens, pos + 1)].tolist()
        if eot_id is not None and eot_id in new:
            new = new[: new.index(eot_id) + 1]
        out.append(new)
    return out


def generate_text(model: TransformerLM, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 100,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  end_token: str | None = "<|endoftext|>", seed: int | None = None,
                  use_cache: bool = True) -> str | list[str]:
    """Text in, text out: encode the prompt(s), ``generate``, decode the continuations."""
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    eot_id = getattr(tokenizer, "special_tokens", {}).get(end_token) if end_token else None
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed) if seed is not None else None
    ids = generate(model, [tokenizer.encode(t) for t in texts], max_new_tokens, temperature, top_k, top_p,
                   eot_id, use_cache, generator)
    outs = [tokenizer.decode(i) for i in ids]
    return outs[0] if single else outs
