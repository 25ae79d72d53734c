"""The block-sparse kernel against dense attention with the same element mask (interpreter on CPU)."""

import pytest
import torch

from lmcore.nn.registry import get_attention_backend
from lmcore.sparse import (BlockIndex, BlockLayout, block_index, block_sparse_attention, make_layout,
                           masked_attention)
from lmcore.sparse import kernel as sparse_kernel

T, BS, D = 72, 32, 16  # 3 key blocks, the last one ragged; BS = 2 tiles of 16 under the interpreter
CASES = [
    ("dense", {}),
    ("local", {"window": 20}),
    ("strided", {"stride": 64}),
    ("global", {"num_global": 32}),
    ("mixed", {"window": 9, "num_global": 32}),
    ("bigbird", {"window": 9, "num_global": 32, "num_random": 1, "seed": 3}),
    ("dilated", {"span": 72, "dilation": 2}),
]


def qkv(b=1, h=2, t=T, d=D, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]


def check_against_dense(layout, q, k, v, causal=False, atol=2e-5, **kwargs):
    out = block_sparse_attention(q, k, v, layout, causal=causal, **kwargs)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    mask = layout.element_mask()
    if causal:
        mask = mask & torch.ones_like(mask).tril()
    ref = masked_attention(q, k, v, mask)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), f"d{name} has non-finite values"
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=lambda m: f"d{name}: {m}")
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name, params", CASES, ids=[c[0] for c in CASES])
def test_pattern_matches_dense_masked_attention(name, params, causal):
    layout = make_layout(name, T, BS, causal=causal, **params)
    check_against_dense(layout, *qkv(seed=len(name)))


@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_implementation_matches_dense(causal, impl):
    layout = make_layout("mixed", T, BS, window=9, num_global=32)  # causal through the argument
    check_against_dense(layout, *qkv(), causal=causal, impl=impl)


VALID = "'auto', 'triton', 'torch', 'reference'"


@pytest.mark.parametrize("impl", ["gather", "kernel", "Triton"])
def test_unknown_impl_names_the_valid_ones(impl):
    with pytest.raises(ValueError, match=f"impl='{impl}'; expected one of {VALID}"):
        block_sparse_attention(*qkv(), make_layout("dense", T, BS), impl=impl)


@pytest.mark.parametrize("name, params", [("dense", {}), ("local", {"window": 72}), ("local", {"window": 64}),
                                          ("mixed", {"window": 20, "num_global": 32})],
                         ids=["dense", "local-ragged-window", "local-aligned", "mixed"])
def test_whole_blocks_use_the_unmasked_loop(name, params):
    # T a multiple of the block size: most entries are full blocks (no mask, no bounds checks)
    layout = make_layout(name, 128, BS, causal=True, **params)
    index = block_index(layout)
    assert int(index.row_full.sum()) > 0 and int(index.col_full.sum()) > 0
    check_against_dense(layout, *qkv(t=128, seed=7))


def test_causal_argument_on_a_non_causal_layout():
    layout = make_layout("local", T, BS, window=40)
    check_against_dense(layout, *qkv(), causal=True)


def test_empty_rows_give_zero_and_finite_gradients():
    blocks = torch.tensor([[True, False, False], [False, False, False], [True, False, True]])
    q, k, v = qkv()
    out = check_against_dense(BlockLayout(blocks, BS, T), q, k, v)
    assert out[:, :, BS:2 * BS].abs().max().item() == 0.0
    assert torch.isfinite(out).all()


def test_rows_whose_listed_blocks_are_all_masked():
    # key block 1 listed for query block 0 but a window of 1 leaves only the diagonal pairs
    blocks = torch.tensor([[False, True, False], [False, True, False], [False, False, True]])
    partial = torch.tensor([[False, True, False], [False, False, False], [False, False, False]])
    layout = BlockLayout(blocks, BS, T, window=1, partial=partial)
    assert not layout.element_mask()[:BS].any()
    out = check_against_dense(layout, *qkv())
    assert out[:, :, :BS].abs().max().item() == 0.0


def test_per_head_and_per_batch_layouts():
    g = torch.Generator().manual_seed(0)
    heads = torch.rand(2, 3, 3, generator=g) < 0.6
    check_against_dense(BlockLayout(heads, BS, T), *qkv(h=2))
    both = torch.rand(2, 2, 3, 3, generator=g) < 0.6
    check_against_dense(BlockLayout(both, BS, T, causal=True), *qkv(b=2, h=2))


def test_block_index_lists_only_allowed_blocks():
    layout = make_layout("local", 64, 16, causal=True, window=16)
    index = block_index(layout)
    assert index.row_cnt.flatten().tolist() == [1, 2, 2, 2]
    assert index.row_idx[0, 0, :, :2].tolist()[1:] == [[0, 1], [1, 2], [2, 3]]
    assert index.col_cnt.flatten().tolist() == [2, 2, 2, 1]
    assert int(index.row_cnt.sum()) == int(layout.blocks.sum())  # work = allowed blocks
    # flags: 1 on the causal diagonal, 2 on window edges
    assert index.row_flag[0, 0, 1, :2].tolist() == [2, 1]
    assert block_index(layout) is index  # built once per layout
    assert index.row_full.flatten().tolist() == [0, 0, 0, 0]  # every block of a 16-token window is an edge


def test_block_index_lists_full_blocks_before_edge_blocks():
    layout = make_layout("local", 6 * 16, 16, causal=True, window=40)  # 2.5 blocks
    index = block_index(layout)
    cnt, full = index.row_cnt[0, 0].tolist(), index.row_full[0, 0].tolist()
    assert cnt == [1, 2, 3, 4, 4, 4] and full == [0, 1, 1, 1, 1, 1]
    assert index.row_idx[0, 0, 4, :4].tolist() == [3, 1, 2, 4]  # full block 3, window edges 1 and 2, diagonal 4
    assert index.row_flag[0, 0, 4, :4].tolist() == [0, 2, 2, 1]
    # columns: key block 1 is seen fully by query block 2, on the diagonal by 1, at the window's edge by 3, 4
    assert index.col_idx[0, 0, 1, :4].tolist() == [2, 1, 3, 4] and index.col_full[0, 0, 1].item() == 1
    for lists, cnts, fulls in ((index.row_flag, index.row_cnt, index.row_full),
                               (index.col_flag, index.col_cnt, index.col_full)):
        for f, c, n in zip(lists.reshape(-1, lists.shape[-1]).tolist(), cnts.flatten().tolist(), fulls.flatten().tolist()):
            assert all(x == 0 for x in f[:n]) and all(x != 0 for x in f[n:c])


def test_ragged_end_is_an_edge_for_queries_and_keys():
    index = block_index(make_layout("dense", 72, 32, causal=False))
    assert index.row_full[0, 0].tolist() == [2, 2, 0]  # the last query block is all edges
    assert index.col_full[0, 0].tolist() == [2, 2, 0]


def test_attention_backend():
    q, k, v = qkv(t=64)
    fn = get_attention_backend("block_sparse")
    out = fn(q, k, v, causal=True, pattern="local", block_size=16, window=24)
    ref = masked_attention(q, k, v, make_layout("local", 64, 16, causal=True, window=24).element_mask())
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fn(q, k, v, causal=True, pattern="local", block_size=16, window=24, impl="torch"),
                               ref, atol=2e-5, rtol=1e-4)


def test_backend_decoding_with_fewer_queries_matches_the_last_rows():
    q, k, v = qkv(t=64)
    fn = get_attention_backend("block_sparse")
    full = fn(q, k, v, causal=True, pattern="mixed", block_size=16, window=10, num_global=16)
    last = fn(q[:, :, -5:], k, v, causal=True, pattern="mixed", block_size=16, window=10, num_global=16)
    torch.testing.assert_close(last, full[:, :, -5:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    ({"block_size": 24}, "block_size=24 must be a power of two"),
    ({"block_size": 8}, "block_size=8 must be a power of two"),
])
def test_bad_block_size(kwargs, match):
    q, k, v = qkv(t=48)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, torch.ones(2, 2, dtype=torch.bool), **kwargs)


def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 3, 3\)"):
        block_sparse_attention(q, k, v, torch.ones(2, 3, dtype=torch.bool), block_size=BS)
    with pytest.raises(ValueError, match="seq_len=64"):
        block_sparse_attention(q, k, v, make_layout("dense", 64, BS))
    with pytest.raises(ValueError, match="differs from the layout's block_size=32"):
        block_sparse_attention(q, k, v, make_layout("dense", T, BS), block_size=16)
    q20, k20, v20 = qkv(d=20)
    with pytest.raises(ValueError, match="head_dim=20"):
        block_sparse_attention(q20, k20, v20, make_layout("dense", T, BS))
    with pytest.raises(ValueError, match="batch=1, heads=3"):
        block_sparse_attention(*qkv(h=3), BlockLayout(torch.ones(2, 3, 3, dtype=torch.bool), BS, T))
    with pytest.raises(ValueError, match="one shape"):
        block_sparse_attention(q, k[:, :, :64], v, make_layout("dense", T, BS))


def test_a_second_call_prepares_nothing(monkeypatch):
    layout = make_layout("local", T, BS, causal=True, window=20)
    q, k, v = qkv()
    grad = torch.randn_like(q)
    first = block_sparse_attention(q, k, v, layout)
    first_grads = torch.autograd.grad(first, (q, k, v), grad)
    done = []
    monkeypatch.setattr(sparse_kernel, "block_index", lambda *a, **kw: done.append("built an index"))
    monkeypatch.setattr(sparse_kernel, "_check_inputs", lambda *a, **kw: done.append("checked the inputs"))
    monkeypatch.setattr(BlockIndex, "strides", lambda *a, **kw: done.append("checked the strides"))
    for kernel in (sparse_kernel._fwd, sparse_kernel._dkdv, sparse_kernel._dq):  # the autotuners' per-call work
        monkeypatch.setattr(kernel, "run", lambda *a, **kw: done.append("asked the autotuner"))
    again = block_sparse_attention(q, k, v, layout)
    again_grads = torch.autograd.grad(again, (q, k, v), grad)
    assert done == []
    torch.testing.assert_close(again, first, atol=0, rtol=0)  # the same kernels with the same tiles
    for a, b in zip(again_grads, first_grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_new_shape_gets_its_own_plan_from_the_cached_index(monkeypatch):
    layout = make_layout("local", T, BS, causal=True, window=20)
    block_sparse_attention(*qkv(), layout)
    built = []
    real = sparse_kernel.block_index
    monkeypatch.setattr(sparse_kernel, "block_index", lambda *a, **kw: built.append(1) or real(*a, **kw))
    monkeypatch.setattr("lmcore.sparse.index._lists", lambda *a: pytest.fail("rebuilt the index"))
    check_against_dense(layout, *qkv(b=2, h=3))  # another batch and head count: one plan more
    assert len(built) == 1
    with pytest.raises(ValueError, match="head_dim=20"):  # a new plan checks its inputs again
        block_sparse_attention(*qkv(d=20), layout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_a_second_call_does_not_synchronize():
    layout = make_layout("local", 2048, 128, causal=True, window=512).to("cuda")
    q, k, v = qkv(b=2, h=4, t=2048, d=64, dtype=torch.bfloat16, device="cuda")
    grad = torch.randn_like(q)
    first = block_sparse_attention(q, k, v, layout)  # tunes the tiles and builds the plan
    first_grads = torch.autograd.grad(first, (q, k, v), grad)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronization now raises
    try:
        again = block_sparse_attention(q, k, v, layout)
        again_grads = torch.autograd.grad(again, (q, k, v), grad)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    for a, b in zip(again_grads, first_grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [64, 128])
def test_gpu_bf16_matches_dense(head_dim, block_size):
    t = 1000  # ragged
    layout = make_layout("bigbird", t, block_size, causal=True, window=200, num_global=block_size, num_random=2)
    q, k, v = qkv(b=2, h=3, t=t, d=head_dim, dtype=torch.bfloat16, device="cuda")
    check_against_dense(layout.to("cuda"), q, k, v, atol=6e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name, params", [("dense", {}), ("local", {"window": 320}), ("local", {"window": 256})])
def test_gpu_bf16_whole_blocks_match_dense(name, params, head_dim):
    t = 1024  # whole blocks: the unmasked loops and the diagonal-slice skipping at GPU tile sizes
    layout = make_layout(name, t, 128, causal=True, **params)
    q, k, v = qkv(b=1, h=4, t=t, d=head_dim, dtype=torch.bfloat16, device="cuda")
    check_against_dense(layout.to("cuda"), q, k, v, atol=6e-2)
