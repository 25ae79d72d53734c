"""NSA's kernels in Triton: group-shared attention over key ranges or selected blocks, block
importance, and top-n selection, all on the GPU with no host synchronisation.

Every attention kernel here works on *rows* that are (query token, query head) pairs of one KV
group: a program takes ``BT`` consecutive tokens times the ``G`` query heads that share a KV head,
so each key block it loads serves ``BT * G`` rows at once (the paper's hardware alignment: one
load for the whole group). Two ways of choosing keys:

- **range**: keys ``i`` with position ``pos_i = i * KS + KO`` and ``pos_i <= t`` (and, with a
  window ``W``, ``pos_i >= t - W + 1``). The compressed branch uses ``KS = d`` (stride) and
  ``KO = l - 1`` (a compressed token is usable once its last key has passed); the sliding
  window uses ``KS = 1, KO = 0``.
- **selected**: one token per program (``BT = 1``), keys from its list of selected blocks.

Forward: the online softmax of FlashAttention-2 over the chosen key tiles, storing ``O`` and the
natural-log ``LSE`` (``+inf`` for a row that sees no key, so its backward terms vanish).
Backward: ``dQ`` by the same loop; ``dK, dV`` per key tile over the rows that saw it, in chunks
of query tokens whose partial sums are added atomically (float32), so a block that every query
selects (the first one) is spread over many programs. For selected blocks the rows that saw a
block come from a reverse index (tokens sorted by block, built with ``torch.sort``).

Importance: per token tile, ``P = exp(S - LSE)`` of the compressed attention summed over the
group's heads, then given to the selection blocks each compressed token overlaps, in proportion
to the overlap. Top-n: per token, ``n`` rounds of "largest score, lowest block on ties", with
the first block and the ``n_local`` most recent blocks forced in and future blocks excluded.
Gated sum: ``g0 o_cmp + g1 o_sel + g2 o_win`` and its gradients, one pass over the rows each way.

Split-K: a forward or importance launch with few programs (decoding: one query per KV group)
spreads each program's key tiles over several programs; the attention's partial softmaxes
(running max, sum of exponentials, unnormalised output) are combined by a last small kernel, and
each importance program starts from what the block before its share spills into it.
"""

from __future__ import annotations

import torch

from lmcore.kernels.common import LOG2E, LN2, precision, rowsum_delta, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rows(Q, b, kvh, t0, n_q_heads, tq, G: tl.constexpr, BT: tl.constexpr, BG: tl.constexpr,
              head_dim, HEAD_DIM: tl.constexpr):
        """Row bookkeeping of a (BT tokens x BG heads) tile: token index, row validity, and the
        element offsets of each row of a (B, Hq, Tq, D) contiguous tensor."""
        r = tl.arange(0, BT * BG)
        tok = t0 + r // BG  # (R,)
        head = kvh * G + r % BG
        ok = (tok < tq) & (r % BG < G)
        base = ((b * n_q_heads + head).to(tl.int64) * tq + tok) * head_dim  # (R,)
        offs_d = tl.arange(0, HEAD_DIM)
        mask = ok[:, None] & (offs_d[None, :] < head_dim)
        return tok, ok, base, offs_d, mask

    @triton.jit
    def _key_tile(K, V, kv_base, kidx, n_keys, head_dim, offs_d):
        """(BK, D) tiles of keys and values at indices ``kidx`` of one KV head."""
        ptr = (kv_base + kidx.to(tl.int64) * head_dim)[:, None] + offs_d[None, :]
        m = (kidx[:, None] < n_keys) & (kidx[:, None] >= 0) & (offs_d[None, :] < head_dim)
        return tl.load(K + ptr, mask=m, other=0.0), tl.load(V + ptr, mask=m, other=0.0)

    @triton.jit
    def _visible(qpos, kidx, n_keys, KS: tl.constexpr, KO: tl.constexpr, WINDOW: tl.constexpr):
        """(R, BK) mask: key ``kidx`` (position kidx*KS + KO) is visible to the row at ``qpos``."""
        kpos = kidx * KS + KO
        ok = (kpos[None, :] <= qpos[:, None]) & (kidx[None, :] < n_keys) & (kidx[None, :] >= 0)
        if WINDOW > 0:
            ok = ok & (kpos[None, :] > qpos[:, None] - WINDOW)
        return ok

    @triton.jit
    def _key_span(t0, tq, q_off, n_keys, BT: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr,
                  KO: tl.constexpr, WINDOW: tl.constexpr, N_SEL: tl.constexpr):
        """(first key, number of BK-key tiles) a tile of BT tokens visits: its N_SEL selected blocks
        (one token), or the key range any of its rows can see."""
        lo = 0
        if N_SEL > 0:
            n_iter = N_SEL
        else:
            q_hi = q_off + tl.minimum(t0 + BT, tq) - 1
            if WINDOW > 0:
                lo = tl.maximum(0, (q_off + t0 - WINDOW + 1 - KO) // KS) // BK * BK
            hi = tl.minimum(n_keys, tl.maximum(0, (q_hi - KO) // KS + 1))
            n_iter = tl.cdiv(tl.maximum(hi - lo, 0), BK)
        return lo, n_iter

    @triton.jit
    def _tile_keys(IDX, bkv, tq, t0, it, lo, BK: tl.constexpr, N_SEL: tl.constexpr):
        """Key indices (BK,) of the ``it``-th tile: a selected block of token t0, or the next range tile."""
        if N_SEL > 0:
            blk = tl.load(IDX + (bkv.to(tl.int64) * tq + t0) * N_SEL + it)
            kidx = blk * BK + tl.arange(0, BK)
        else:
            kidx = lo + it * BK + tl.arange(0, BK)
        return kidx

    @triton.jit
    def _normalized(acc, m, l):
        """Output rows and natural-log LSE from a softmax's running max ``m`` (log2 units), sum of
        exponentials ``l`` and unnormalised output ``acc``; a row that saw no key gets 0 and +inf."""
        seen = l > 0
        out = acc / tl.where(seen, l, 1.0)[:, None]
        return out, tl.where(seen, (m + tl.log2(tl.where(seen, l, 1.0))) * 0.6931471805599453, float("inf"))

    @triton.jit
    def _fwd_kernel(Q, K, V, O, L, IDX, n_q_heads, n_kv_heads, tq, n_keys, q_off, head_dim, split_tiles,
                    QK_SCALE: tl.constexpr, G: tl.constexpr, BT: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr,
                    HEAD_DIM: tl.constexpr, KS: tl.constexpr, KO: tl.constexpr, WINDOW: tl.constexpr,
                    N_SEL: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
        """O, LSE of one (BT tokens x G heads) tile over a key range (N_SEL == 0) or its selected blocks.

        Program ``s`` of the third grid axis takes key tiles ``s * split_tiles`` to
        ``(s + 1) * split_tiles``. With SPLIT (several such programs: split-K, for few queries over
        many keys) it stores its unnormalised partial sums for :func:`_combine_kernel`: ``O`` is then
        (splits, rows, D) float32 and ``L`` (2, splits, rows) holds the running max and the sum of
        exponentials.
        """
        t0 = tl.program_id(0) * BT
        bkv = tl.program_id(1)
        split = tl.program_id(2)
        b, kvh = bkv // n_kv_heads, bkv % n_kv_heads
        tok, ok, base, offs_d, mask = _rows(Q, b, kvh, t0, n_q_heads, tq, G, BT, BG, head_dim, HEAD_DIM)
        qpos = q_off + tok
        q = tl.load(Q + base[:, None] + offs_d[None, :], mask=mask, other=0.0)  # (R, D)
        kv_base = bkv.to(tl.int64) * n_keys * head_dim
        m_i = tl.full([BT * BG], float("-inf"), tl.float32)
        l_i = tl.zeros([BT * BG], tl.float32)
        acc = tl.zeros([BT * BG, HEAD_DIM], tl.float32)
        lo, n_iter = _key_span(t0, tq, q_off, n_keys, BT, BK, KS, KO, WINDOW, N_SEL)
        for it in range(split * split_tiles, tl.minimum(n_iter, (split + 1) * split_tiles)):
            kidx = _tile_keys(IDX, bkv, tq, t0, it, lo, BK, N_SEL)
            k, v = _key_tile(K, V, kv_base, kidx, n_keys, head_dim, offs_d)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * QK_SCALE  # (R, BK), log2 units
            s = tl.where(_visible(qpos, kidx, n_keys, KS, KO, WINDOW), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        if SPLIT:
            n_rows = tl.num_programs(1) // n_kv_heads * n_q_heads * tq
            part = split.to(tl.int64) * n_rows
            tl.store(O + part * head_dim + base[:, None] + offs_d[None, :], acc, mask=mask)
            tl.store(L + part + base // head_dim, m_i, mask=ok)
            tl.store(L + (tl.num_programs(2) + split).to(tl.int64) * n_rows + base // head_dim, l_i, mask=ok)
        else:
            out, lse = _normalized(acc, m_i, l_i)
            tl.store(O + base[:, None] + offs_d[None, :], out.to(O.dtype.element_ty), mask=mask)
            tl.store(L + base // head_dim, lse, mask=ok)

    @triton.jit
    def _row_block(n_rows, head_dim, BR: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Rows (int64), their validity, and element offsets and mask of BR rows of a (rows, D) tensor."""
        rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
        cols = tl.arange(0, HEAD_DIM)
        ok = rows < n_rows
        return rows, ok, rows[:, None] * head_dim + cols[None, :], ok[:, None] & (cols[None, :] < head_dim)

    @triton.jit
    def _combine_kernel(O_PART, ML, O, L, n_rows, n_split, head_dim, BR: tl.constexpr, HEAD_DIM: tl.constexpr):
        """O and LSE of BR rows from the partial sums of :func:`_fwd_kernel`'s key splits."""
        rows, ok, at, m = _row_block(n_rows, head_dim, BR, HEAD_DIM)
        m_all = tl.full([BR], float("-inf"), tl.float32)
        for s in range(n_split):
            m_all = tl.maximum(m_all, tl.load(ML + s * n_rows + rows, mask=ok, other=float("-inf")))
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        l_all = tl.zeros([BR], tl.float32)
        acc = tl.zeros([BR, HEAD_DIM], tl.float32)
        for s in range(n_split):
            w = tl.exp2(tl.load(ML + s * n_rows + rows, mask=ok, other=float("-inf")) - m_safe)
            l_all += w * tl.load(ML + (n_split + s) * n_rows + rows, mask=ok, other=0.0)
            acc += w[:, None] * tl.load(O_PART + s * n_rows * head_dim + at, mask=m, other=0.0)
        out, lse = _normalized(acc, m_all, l_all)
        tl.store(O + at, out.to(O.dtype.element_ty), mask=m)
        tl.store(L + rows, lse, mask=ok)

    @triton.jit
    def _dq_kernel(Q, K, V, DO, DQ, L, Delta, IDX, n_q_heads, n_kv_heads, tq, n_keys, q_off, head_dim,
                   QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr, G: tl.constexpr, BT: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr,
                   HEAD_DIM: tl.constexpr, KS: tl.constexpr, KO: tl.constexpr, WINDOW: tl.constexpr,
                   N_SEL: tl.constexpr, PREC: tl.constexpr):
        """dQ = sum_j dS_j K_j * scale over the same keys as the forward, dS = P (dO V^T - delta)."""
        t0 = tl.program_id(0) * BT
        bkv = tl.program_id(1)
        b, kvh = bkv // n_kv_heads, bkv % n_kv_heads
        tok, ok, base, offs_d, mask = _rows(Q, b, kvh, t0, n_q_heads, tq, G, BT, BG, head_dim, HEAD_DIM)
        qpos = q_off + tok
        q = tl.load(Q + base[:, None] + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + base[:, None] + offs_d[None, :], mask=mask, other=0.0)
        lse2 = tl.load(L + base // head_dim, mask=ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(Delta + base // head_dim, mask=ok, other=0.0)
        kv_base = bkv.to(tl.int64) * n_keys * head_dim
        dq = tl.zeros([BT * BG, HEAD_DIM], tl.float32)
        lo, n_iter = _key_span(t0, tq, q_off, n_keys, BT, BK, KS, KO, WINDOW, N_SEL)
        for it in range(n_iter):
            kidx = _tile_keys(IDX, bkv, tq, t0, it, lo, BK, N_SEL)
            k, v = _key_tile(K, V, kv_base, kidx, n_keys, head_dim, offs_d)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * QK_SCALE
            p = tl.where(_visible(qpos, kidx, n_keys, KS, KO, WINDOW), tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        tl.store(DQ + base[:, None] + offs_d[None, :], (dq * SM_SCALE).to(DQ.dtype.element_ty), mask=mask)

    @triton.jit
    def _dkv_kernel(Q, K, V, DO, DK, DV, L, Delta, REV, OFFS, n_q_heads, n_kv_heads, tq, n_keys, q_off,
                    head_dim, n_tiles, chunk, rev_len, QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr,
                    G: tl.constexpr, BT: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr,
                    HEAD_DIM: tl.constexpr, KS: tl.constexpr, KO: tl.constexpr, WINDOW: tl.constexpr,
                    SELECTED: tl.constexpr, PREC: tl.constexpr):
        """dK, dV of one key tile from one chunk of the query tokens that see it (added atomically).

        Range mode: the tokens are the contiguous positions that can see the tile. Selected mode:
        the tokens listed for this block in the reverse index ``REV[OFFS[j]:OFFS[j+1]]``.
        """
        j = tl.program_id(0)
        c = tl.program_id(1)
        bkv = tl.program_id(2)
        b, kvh = bkv // n_kv_heads, bkv % n_kv_heads
        kidx = j * BK + tl.arange(0, BK)
        offs_d = tl.arange(0, HEAD_DIM)
        kv_base = bkv.to(tl.int64) * n_keys * head_dim
        k, v = _key_tile(K, V, kv_base, kidx, n_keys, head_dim, offs_d)
        if SELECTED:
            start = tl.load(OFFS + bkv.to(tl.int64) * (n_tiles + 1) + j)
            end = tl.load(OFFS + bkv.to(tl.int64) * (n_tiles + 1) + j + 1)
        else:  # tokens whose position can see some key of the tile
            start = tl.maximum(0, j * BK * KS + KO - q_off)
            end = tq
            if WINDOW > 0:
                end = tl.minimum(tq, ((j + 1) * BK - 1) * KS + KO + WINDOW - q_off)
        lo = start + c * chunk
        hi = tl.minimum(end, lo + chunk)
        if lo < hi:
            dk = tl.zeros([BK, HEAD_DIM], tl.float32)
            dv = tl.zeros([BK, HEAD_DIM], tl.float32)
            r = tl.arange(0, BT * BG)
            d_ok = offs_d[None, :] < head_dim
            for i0 in range(lo, hi, BT):
                slot = i0 + r // BG
                in_chunk = (slot < hi) & (r % BG < G)
                if SELECTED:
                    tok = tl.load(REV + bkv.to(tl.int64) * rev_len + slot, mask=in_chunk, other=0)
                else:
                    tok = slot
                head = kvh * G + r % BG
                base = ((b * n_q_heads + head).to(tl.int64) * tq + tok) * head_dim
                rmask = in_chunk[:, None] & d_ok
                q = tl.load(Q + base[:, None] + offs_d[None, :], mask=rmask, other=0.0)  # (R, D)
                do = tl.load(DO + base[:, None] + offs_d[None, :], mask=rmask, other=0.0)
                lse2 = tl.load(L + base // head_dim, mask=in_chunk, other=float("inf")) * 1.4426950408889634
                delta = tl.load(Delta + base // head_dim, mask=in_chunk, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * QK_SCALE  # (R, BK)
                vis = _visible(q_off + tok, kidx, n_keys, KS, KO, WINDOW) & in_chunk[:, None]
                p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
                dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
            ptr = (kv_base + kidx.to(tl.int64) * head_dim)[:, None] + offs_d[None, :]
            m = (kidx[:, None] < n_keys) & d_ok
            tl.atomic_add(DK + ptr, dk * SM_SCALE, mask=m)
            tl.atomic_add(DV + ptr, dv, mask=m)

    @triton.jit
    def _importance_group(q, KC, kc_base, j0, n_cmp, head_dim, offs_d, qpos, ok, lse2, carry,
                          QK_SCALE: tl.constexpr, cmp_len, cmp_stride, sel_len, BT: tl.constexpr, BG: tl.constexpr, NB: tl.constexpr,
                          R: tl.constexpr, PREC: tl.constexpr):
        """Scores (BT, NB) of blocks j0 .. j0+NB-1, and the share the last one's tokens spill onward.

        A compressed token starting at offset r*stride of its block gives w_a to that block and
        1 - w_a to the next one (R = sel_len / stride tokens start in each block); ``carry`` is what
        the block before j0 spilled into j0."""
        r_in = tl.arange(0, R)
        w_a = tl.minimum(sel_len - r_in * cmp_stride, cmp_len).to(tl.float32) / cmp_len  # (R,)
        kk = tl.arange(0, NB)
        cidx = j0 * R + tl.arange(0, NB * R)  # compressed tokens starting in blocks j0 .. j0+NB-1
        cm = (cidx[:, None] < n_cmp) & (offs_d[None, :] < head_dim)
        kc_ptr = KC + kc_base + cidx.to(tl.int64)[:, None] * head_dim + offs_d[None, :]
        kc = tl.load(kc_ptr, mask=cm, other=0.0)
        s = tl.dot(q, tl.trans(kc), input_precision=PREC) * QK_SCALE  # (R, NB*R)
        vis = ((cidx[None, :] * cmp_stride + cmp_len - 1) <= qpos[:, None]) & (cidx[None, :] < n_cmp)
        p = tl.where(vis & ok[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        p = tl.sum(tl.reshape(p, (BT, BG, NB * R)), 1)  # (BT, NB*R): summed over the group's heads
        p3 = tl.reshape(p, (BT, NB, R))
        own = tl.sum(p3 * w_a[None, None, :], 2)  # (BT, NB)
        spill = tl.sum(p3 * (1.0 - w_a)[None, None, :], 2)
        shift = ((kk[:, None] + 1) == kk[None, :]).to(tl.float32)  # (NB, NB): block k spills into k + 1
        moved = tl.sum(spill[:, :, None] * shift[None, :, :], 1)  # spill[k-1] at k
        score = own + moved + tl.where(kk[None, :] == 0, carry[:, None], 0.0)
        return score, tl.sum(tl.where(kk[None, :] == NB - 1, spill, 0.0), 1)

    @triton.jit
    def _importance_kernel(Q, KC, L, S_OUT, n_q_heads, n_kv_heads, tq, n_cmp, n_blocks, q_off, head_dim,
                           split_groups, QK_SCALE: tl.constexpr, cmp_len, cmp_stride, sel_len,
                           G: tl.constexpr, BT: tl.constexpr, BG: tl.constexpr, NB: tl.constexpr,
                           R: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
        """Block scores (B*Hkv, Tq, n_blocks): compressed-attention probabilities summed over the
        group's heads, each compressed token's share given to the selection blocks it overlaps.
        Program ``s`` of the third grid axis scores the NB-block groups ``s * split_groups`` onward
        (``split_groups`` of them), starting from what the group before them spills."""
        t0 = tl.program_id(0) * BT
        bkv = tl.program_id(1)
        g_lo = tl.program_id(2) * split_groups
        b, kvh = bkv // n_kv_heads, bkv % n_kv_heads
        tok, ok, base, offs_d, mask = _rows(Q, b, kvh, t0, n_q_heads, tq, G, BT, BG, head_dim, HEAD_DIM)
        qpos = q_off + tok
        q = tl.load(Q + base[:, None] + offs_d[None, :], mask=mask, other=0.0)  # (R, D)
        lse2 = tl.load(L + base // head_dim, mask=ok, other=float("inf")) * 1.4426950408889634
        kc_base = bkv.to(tl.int64) * n_cmp * head_dim
        carry = tl.zeros([BT], tl.float32)
        if g_lo > 0:
            _, carry = _importance_group(q, KC, kc_base, (g_lo - 1) * NB, n_cmp, head_dim, offs_d, qpos, ok,
                                         lse2, carry, QK_SCALE, cmp_len, cmp_stride, sel_len, BT, BG, NB, R, PREC)
        last_block = tl.minimum(q_off + tl.minimum(t0 + BT, tq) - 1, (n_blocks * sel_len) - 1) // sel_len
        tok1 = t0 + tl.arange(0, BT)
        kk = tl.arange(0, NB)
        for j0 in range(g_lo * NB, tl.minimum(last_block + 1, (g_lo + split_groups) * NB), NB):
            score, carry = _importance_group(q, KC, kc_base, j0, n_cmp, head_dim, offs_d, qpos, ok, lse2,
                                             carry, QK_SCALE, cmp_len, cmp_stride, sel_len, BT, BG, NB, R, PREC)
            blk = j0 + kk
            sm = (tok1[:, None] < tq) & (blk[None, :] < n_blocks)
            at = (bkv.to(tl.int64) * tq + tok1[:, None]) * n_blocks + blk[None, :]
            tl.store(S_OUT + at, score, mask=sm)

    @triton.jit
    def _topn_kernel(S_IN, IDX, tq, n_blocks, q_off, sel_len, N_SEL: tl.constexpr, N_LOCAL: tl.constexpr,
                     NBP: tl.constexpr):
        """Indices of the N_SEL selected blocks of one token (-1 where fewer blocks exist)."""
        t = tl.program_id(0)
        bkv = tl.program_id(1).to(tl.int64)
        j = tl.arange(0, NBP)
        cur = (q_off + t) // sel_len  # the block holding the query
        x = tl.load(S_IN + (bkv * tq + t) * n_blocks + j, mask=j <= cur, other=0.0)
        forced = (j == 0) | ((j <= cur) & (j > cur - N_LOCAL))
        x = tl.where(forced, float("inf"), x)
        x = tl.where((j <= cur) & (j < n_blocks), x, float("-inf"))
        for s in range(N_SEL):
            best = tl.max(x, 0)
            pick = tl.min(tl.where(x == best, j, NBP), 0)
            found = best > float("-inf")
            tl.store(IDX + (bkv * tq + t) * N_SEL + s, tl.where(found, pick, -1))
            x = tl.where(j == pick, float("-inf"), x)


    @triton.jit
    def _mix_fwd_kernel(O1, O2, O3, GATE, OUT, n_rows, head_dim, BR: tl.constexpr, HEAD_DIM: tl.constexpr):
        """out = g0 o1 + g1 o2 + g2 o3 over (rows, D) branch outputs and (rows, 3) gates, in float32."""
        rows, ok, at, m = _row_block(n_rows, head_dim, BR, HEAD_DIM)
        gat = rows * 3  # (rows, 3) gates
        out = tl.load(GATE + gat, mask=ok, other=0.0).to(tl.float32)[:, None] * tl.load(O1 + at, mask=m, other=0.0)
        out += tl.load(GATE + gat + 1, mask=ok, other=0.0).to(tl.float32)[:, None] * tl.load(O2 + at, mask=m, other=0.0)
        out += tl.load(GATE + gat + 2, mask=ok, other=0.0).to(tl.float32)[:, None] * tl.load(O3 + at, mask=m, other=0.0)
        tl.store(OUT + at, out.to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _mix_grad(O, G, D, DG, dout, at, m, ok):
        """One branch's share of the backward: d o = g dout, d g = rowsum(o dout)."""
        tl.store(D + at, (tl.load(G, mask=ok, other=0.0).to(tl.float32)[:, None] * dout).to(D.dtype.element_ty), mask=m)
        o = tl.load(O + at, mask=m, other=0.0).to(tl.float32)
        tl.store(DG, tl.sum(o * dout, 1).to(DG.dtype.element_ty), mask=ok)

    @triton.jit
    def _mix_bwd_kernel(O1, O2, O3, GATE, DOUT, D1, D2, D3, DGATE, n_rows, head_dim, BR: tl.constexpr,
                        HEAD_DIM: tl.constexpr):
        """Gradients of :func:`_mix_fwd_kernel`'s output with respect to the three outputs and the gates."""
        rows, ok, at, m = _row_block(n_rows, head_dim, BR, HEAD_DIM)
        gat = rows * 3
        dout = tl.load(DOUT + at, mask=m, other=0.0).to(tl.float32)
        _mix_grad(O1, GATE + gat, D1, DGATE + gat, dout, at, m, ok)
        _mix_grad(O2, GATE + gat + 1, D2, DGATE + gat + 1, dout, at, m, ok)
        _mix_grad(O3, GATE + gat + 2, D3, DGATE + gat + 2, dout, at, m, ok)


#: How each kernel is launched: ``rows`` (query token x head pairs) per program (a selected-block
#: program always holds one token's heads), ``chunk`` query tokens per dK/dV program, and the
#: compiler's warps and pipeline stages. Chosen by timing every
#: candidate on an H200 at 65,536 tokens, 64 query heads in 4 KV groups, head dim 128, bfloat16
#: (``topn_few``: top-n for fewer tokens than SPLIT_BELOW_PROGRAMS, the setting decoding measured
#: fastest before the table existed).
LAUNCH = {
    "fwd": dict(rows=64, num_warps=4, num_stages=3),
    "fwd_selected": dict(num_warps=2, num_stages=2),
    "dq": dict(rows=128, num_warps=8, num_stages=3),
    "dq_selected": dict(num_warps=2, num_stages=2),
    "dkv": dict(rows=64, chunk=1024, num_warps=4, num_stages=2),
    "importance": dict(rows=128, num_warps=8, num_stages=2),
    "topn": dict(num_warps=1),
    "topn_few": dict(num_warps=4),
}


def _launch(kind: str, group: int, selected: bool = False) -> tuple[dict, dict]:
    """(tile meta-parameters, compiler options) of one kernel for a KV group of ``group`` heads:
    BT tokens x BG heads (the group padded to a power of two, at least 16 rows for tl.dot)."""
    setting = dict(LAUNCH[kind + ("_selected" if selected else "")])
    opts = {k: setting.pop(k) for k in ("num_warps", "num_stages") if k in setting}
    bg = max(1, triton.next_power_of_2(group))
    if selected:
        return dict(BT=1, BG=max(16, bg)), opts
    return dict(BT=max(1, setting["rows"] // bg), BG=bg), opts


#: Split-K: a launch with fewer programs than this (few query tokens: decoding) spreads each
#: program's keys over several programs, each taking at least SPLIT_MIN_TILES key tiles.
SPLIT_BELOW_PROGRAMS = 256
SPLIT_MIN_TILES = 4


def key_splits(programs: int, n_tiles: int, splits: int | None = None) -> tuple[int, int]:
    """(splits, tiles per split) for a launch of ``programs`` each visiting up to ``n_tiles`` tiles;
    ``splits`` forces a count (1: no split)."""
    if splits is None:
        splits = 1 if programs >= SPLIT_BELOW_PROGRAMS else \
            min(triton.cdiv(n_tiles, SPLIT_MIN_TILES), triton.cdiv(SPLIT_BELOW_PROGRAMS, programs))
    per = triton.cdiv(max(n_tiles, 1), max(1, splits))
    return triton.cdiv(max(n_tiles, 1), per), per


def _meta(q, k, window: int, ks: int, ko: int):
    bsz, hq, tq, d = q.shape
    hkv, n_keys = k.shape[1], k.shape[2]
    return dict(G=hq // hkv, HEAD_DIM=max(16, triton.next_power_of_2(d)), KS=ks, KO=ko, WINDOW=window,
                PREC=precision(q.dtype)), (bsz, hq, hkv, tq, n_keys, d)


def attn_forward(q, k, v, scale: float, q_off: int, block: int, idx=None, window: int = 0, ks: int = 1,
                 ko: int = 0, splits: int | None = None):
    """(O, LSE) of group-shared attention: over selected blocks (``idx`` (B*Hkv, Tq, n) of block
    numbers of size ``block``) or over the key range ``pos_i = i*ks + ko <= t`` (within ``window``).
    Few queries over many keys are split across programs (``splits``: see :func:`key_splits`)."""
    meta, (bsz, hq, hkv, tq, n_keys, d) = _meta(q, k, window, ks, ko)
    tiles, opts = _launch("fwd", hq // hkv, idx is not None)
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(tq, tiles["BT"]), bsz * hkv)
    if idx is not None:  # the tiles a program visits: its selected blocks, or a range's tiles
        n_tiles = idx.shape[-1]
    else:
        n_tiles = triton.cdiv(min(n_keys, window // ks + 2 * tiles["BT"]) if window else n_keys, block) + 1
    n_split, per = key_splits(grid[0] * grid[1], n_tiles, splits)
    if n_split == 1:
        out, ml = o, lse
    else:  # partial sums per split, combined below
        out = torch.empty((n_split, o.numel() // d, d), device=q.device, dtype=torch.float32)
        ml = torch.empty((2, n_split, o.numel() // d), device=q.device, dtype=torch.float32)
    _fwd_kernel[grid + (n_split,)](q, k, v, out, ml, idx if idx is not None else q, hq, hkv, tq, n_keys,
                                   q_off, d, per, QK_SCALE=scale * LOG2E, BK=block,
                                   N_SEL=idx.shape[-1] if idx is not None else 0, SPLIT=n_split > 1,
                                   **tiles, **meta, **opts)
    if n_split > 1:
        rows = o.numel() // d
        _combine_kernel[(triton.cdiv(rows, 16),)](out, ml, o, lse, rows, n_split, d, BR=16,
                                                  HEAD_DIM=meta["HEAD_DIM"])
    return o, lse


def reverse_index(idx: torch.Tensor, n_blocks: int):
    """Tokens grouped by the block they selected: (tokens (B*Hkv, Tq*n), offsets (B*Hkv, n_blocks+1))."""
    bkv, tq, n = idx.shape
    t = torch.arange(tq, device=idx.device).repeat_interleave(n)  # (Tq*n,)
    blk = idx.reshape(bkv, tq * n).long()
    key = torch.where(blk >= 0, blk, n_blocks) * tq + t  # sorted by block, then token
    key, _ = torch.sort(key, dim=1)
    bounds = torch.arange(n_blocks + 1, device=idx.device) * tq
    offs = torch.searchsorted(key, bounds.expand(bkv, -1).contiguous()).to(torch.int32)
    return (key % tq).to(torch.int32).contiguous(), offs.contiguous()


def attn_backward(q, k, v, o, lse, do, scale: float, q_off: int, block: int, idx=None, window: int = 0,
                  ks: int = 1, ko: int = 0):
    """(dQ, dK, dV) of :func:`attn_forward`."""
    selected = idx is not None
    meta, (bsz, hq, hkv, tq, n_keys, d) = _meta(q, k, window, ks, ko)
    do = do.contiguous()
    delta = rowsum_delta(o, do)  # (B, Hq, Tq)
    dq = torch.empty_like(q)
    n_sel = idx.shape[-1] if selected else 0
    tiles, opts = _launch("dq", hq // hkv, selected)
    _dq_kernel[(triton.cdiv(tq, tiles["BT"]), bsz * hkv)](
        q, k, v, do, dq, lse, delta, idx if selected else q, hq, hkv, tq, n_keys, q_off, d,
        QK_SCALE=scale * LOG2E, SM_SCALE=scale, BK=block, N_SEL=n_sel, **tiles, **meta, **opts)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    n_tiles = triton.cdiv(n_keys, block)
    chunk = LAUNCH["dkv"]["chunk"]
    if selected:
        rev, offs = reverse_index(idx, n_tiles)
        n_chunks = triton.cdiv(tq, chunk)
    else:
        rev = offs = q
        reach = (block * ks + window) if window else tq  # tokens that can see one tile
        n_chunks = triton.cdiv(min(tq, reach), chunk)
    tiles, opts = _launch("dkv", hq // hkv)
    _dkv_kernel[(n_tiles, n_chunks, bsz * hkv)](
        q, k, v, do, dk, dv, lse, delta, rev, offs, hq, hkv, tq, n_keys, q_off, d, n_tiles, chunk,
        rev.shape[-1] if selected else 0, QK_SCALE=scale * LOG2E, SM_SCALE=scale, BK=block, SELECTED=selected,
        **tiles, **meta, **opts)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def block_scores(q, k_cmp, lse_cmp, n_keys: int, cfg, scale: float, splits: int | None = None) -> torch.Tensor:
    """Importance of every selection block for every query: (B*Hkv, Tq, n_blocks) float32 (few
    queries: the blocks split across programs, see :func:`key_splits`)."""
    bsz, hq, tq, d = q.shape
    hkv, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    n_blocks = triton.cdiv(n_keys, cfg.sel_block)
    r = cfg.sel_block // cfg.cmp_stride
    if r & (r - 1):
        raise ValueError(f"sel_block / cmp_stride = {r}: the Triton path needs a power of two")
    out = torch.empty((bsz * hkv, tq, n_blocks), device=q.device, dtype=torch.float32)
    tiles, opts = _launch("importance", hq // hkv)
    nb = max(1, 64 // r)
    grid = (triton.cdiv(tq, tiles["BT"]), bsz * hkv)
    n_split, per = key_splits(grid[0] * grid[1], triton.cdiv(n_blocks, nb), splits)
    _importance_kernel[grid + (n_split,)](
        q, k_cmp.contiguous(), lse_cmp, out, hq, hkv, tq, n_cmp, n_blocks, n_keys - tq, d, per,
        QK_SCALE=scale * LOG2E, cmp_len=cfg.cmp_block, cmp_stride=cfg.cmp_stride, sel_len=cfg.sel_block,
        G=hq // hkv, NB=nb, R=r, HEAD_DIM=max(16, triton.next_power_of_2(d)), PREC=precision(q.dtype),
        **tiles, **opts)
    return out


def top_blocks(scores: torch.Tensor, n_keys: int, cfg) -> torch.Tensor:
    """(B*Hkv, Tq, top_n) int32 block indices per query, best first; -1 where fewer blocks exist."""
    bkv, tq, n_blocks = scores.shape
    idx = torch.empty((bkv, tq, cfg.top_n), device=scores.device, dtype=torch.int32)
    few = tq * bkv < SPLIT_BELOW_PROGRAMS  # decoding: more warps for each of the few tokens
    _topn_kernel[(tq, bkv)](scores, idx, tq, n_blocks, n_keys - tq, cfg.sel_block, N_SEL=cfg.top_n,
                            N_LOCAL=cfg.n_local, NBP=triton.next_power_of_2(n_blocks),
                            **LAUNCH["topn_few" if few else "topn"])
    return idx


class _GroupAttention(torch.autograd.Function):
    """Group-shared attention over a key range or selected blocks, with its backward kernels."""

    @staticmethod
    def forward(ctx, q, k, v, scale, q_off, block, idx, window, ks, ko):
        o, lse = attn_forward(q, k, v, scale, q_off, block, idx, window, ks, ko)
        ctx.save_for_backward(q, k, v, o, lse, idx)
        ctx.args = (scale, q_off, block, window, ks, ko)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, idx = ctx.saved_tensors
        scale, q_off, block, window, ks, ko = ctx.args
        dq, dk, dv = attn_backward(q, k, v, o, lse, do, scale, q_off, block, idx, window, ks, ko)
        return dq, dk, dv, None, None, None, None, None, None, None


def _mix_launch(o1) -> tuple[tuple, int, dict]:
    """(grid, rows, block sizes) of a gated-sum kernel over (..., D) outputs: about 4096 values a program."""
    d = o1.shape[-1]
    n_rows, br = o1.numel() // d, max(1, 4096 // triton.next_power_of_2(d))
    return (triton.cdiv(n_rows, br),), n_rows, dict(BR=br, HEAD_DIM=max(16, triton.next_power_of_2(d)))


class _GatedSum(torch.autograd.Function):
    """``g0 o_cmp + g1 o_sel + g2 o_win`` with gates (B, Hq, T, 3), in one pass each way."""

    @staticmethod
    def forward(ctx, o1, o2, o3, gates):
        o1, o2, o3, gates = o1.contiguous(), o2.contiguous(), o3.contiguous(), gates.contiguous()
        out = torch.empty_like(o1)
        grid, n_rows, meta = _mix_launch(o1)
        _mix_fwd_kernel[grid](o1, o2, o3, gates, out, n_rows, o1.shape[-1], **meta)
        ctx.save_for_backward(o1, o2, o3, gates)
        return out

    @staticmethod
    def backward(ctx, dout):
        o1, o2, o3, gates = ctx.saved_tensors
        dout = dout.contiguous()
        d1, d2, d3 = torch.empty_like(o1), torch.empty_like(o2), torch.empty_like(o3)
        dgates = torch.empty_like(gates)
        grid, n_rows, meta = _mix_launch(o1)
        _mix_bwd_kernel[grid](o1, o2, o3, gates, dout, d1, d2, d3, dgates, n_rows, o1.shape[-1], **meta)
        return d1, d2, d3, dgates


def nsa_triton(q, k, v, k_cmp, v_cmp, cfg, scale: float, gates=None, return_parts: bool = False):
    """NSA through the kernels above: the same function as :func:`lmcore.sparse.nsa.nsa_torch`."""
    from lmcore.sparse.nsa import _mix

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    k_cmp, v_cmp = k_cmp.contiguous(), v_cmp.contiguous()
    tq, tk = q.shape[2], k.shape[2]
    q_off = tk - tq
    with torch.no_grad():
        if k_cmp.shape[2] == 0:  # no compressed block has ended yet: the branch is 0, every block scores 0
            o_cmp = q.new_zeros(q.shape) + 0 * (k_cmp.sum() + v_cmp.sum())
            scores = q.new_zeros((k.shape[0] * k.shape[1], tq, triton.cdiv(tk, cfg.sel_block)), dtype=torch.float32)
    if k_cmp.shape[2] > 0:
        o_cmp, lse_cmp = _GroupAttention.apply(q, k_cmp, v_cmp, scale, q_off, 64, None, 0, cfg.cmp_stride,
                                               cfg.cmp_block - 1)
        with torch.no_grad():
            scores = block_scores(q, k_cmp, lse_cmp, tk, cfg, scale)
    with torch.no_grad():
        idx = top_blocks(scores, tk, cfg)
    o_sel, _ = _GroupAttention.apply(q, k, v, scale, q_off, cfg.sel_block, idx, 0, 1, 0)
    o_win = _GroupAttention.apply(q, k, v, scale, q_off, 64, None, cfg.window, 1, 0)[0] if cfg.window else 0 * o_sel
    out = _mix(o_cmp, o_sel, o_win, None) if gates is None else _GatedSum.apply(o_cmp, o_sel, o_win, gates)
    if return_parts:
        bsz, hkv = k.shape[:2]
        return out, dict(o_cmp=o_cmp, o_sel=o_sel, o_win=o_win, idx=idx.view(bsz, hkv, tq, -1))
    return out
