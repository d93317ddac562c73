"""The Triton kernels of the ``triton`` backend: one launch for the reduce pass, one for the update pass.

Both kernels walk a *block table* (program -> (tensor index, first element)) and a *tensor table* (one row of
int64 per tensor: addresses of p, g, m, v, master, step, the element count and a meta word), so one launch covers
every tensor of every param group whatever their number, sizes and dtypes.  A program never straddles tensors:
it handles ``iters * BLOCK`` consecutive elements of one tensor (``iters`` and every count are runtime values).

Tensor table row (``TAB_W`` int64):
  0 p  1 g (0: no grad this step)  2 m  3 v  4 master (0: fp32 param)  5 step  6 numel
  7 meta = has_grad | dtype_code << 1 | aligned << 3 | group << 8        dtype_code: 0 fp32, 1 bf16, 2 fp16
``aligned`` says every address of the row and the block table's own address are 16-byte aligned: full blocks
of such a tensor take the FULL path: no mask, and pointers formed as ``blk_ptr`` (a kernel argument, which
Triton specializes as 16-byte aligned) ``+ ((addr - blk_addr) // 16) * (16 / elem_size)``, from which the
compiler *derives* the alignment and emits 16-byte vector accesses.  An address cast with ``int_to_ptr`` carries
no alignment for the compiler (even with ``tl.multiple_of``, checked on the sm_90 PTX), and no hint is asserted
anywhere, so a misaligned view cannot be miscompiled: it takes the masked path.

Hyper table ``hyp`` (float64, rows of ``HYP_W``): row 0 is global, row 1 + k is param group k.
  row 0: sign*rho, ema_beta, 1-ema_beta, max_grad_norm, has_clip, adaptive, perturbed, has_scale, has_found_inf,
         gbar_floor (the bound on the perturbation; 0: none)
  row 1+k: lr (used when the group's lr address is 0), b1, 1-b1, b2, 1-b2, eps, wd, b1*b1, 2*b1*(1-b1), (1-b1)**2

Deterministic, no float atomics: each program of the reduce pass writes its 4 partial sums (float64); the last
program to finish (an int32 ticket counter: the classic "last block" pattern) adds the partials group by group
in a fixed order into ``sums`` and resets the counter.  The update pass computes the scalar stage redundantly in
every program (a few float64 flops on the 4 * groups sums) and its last program writes the optimizer-wide
scalars and the per-tensor step counts, after every program has read the old ones.

bf16 is loaded and stored as its uint16 bits with integer conversions (exactly c10::BFloat16's round to nearest
even): the interpreter truncates ``.to(tl.bfloat16)``, and this gives the same bits on the CPU and the GPU.
Helpers are few on purpose: under the interpreter every call of a ``@triton.jit`` helper costs ~1 ms.
"""
from __future__ import annotations

import triton
import triton.language as tl

TAB_W = 8
HYP_W = 12
BLOCK = 1024  # largest elements per inner iteration (the host picks 256..1024 by a rule; 4 per thread)
RBLOCK = 256  # partial rows per iteration of the final sum
TBLOCK = 256  # tensor rows per iteration of the step-count update


# ----------------------------------------------------------------------------------------------- reduce pass

@triton.jit
def _reduce_chunk(base_ptr, g_addr, m_addr, code, has_grad, offs, mask, acc_gg, acc_mg, acc_mm,
                  FULL: tl.constexpr):
    if FULL:  # 16-byte aligned full block: pointers relative to an aligned kernel argument (see module doc)
        base_i = base_ptr.to(tl.int64)
        m_ptr = base_ptr.to(tl.pointer_type(tl.float32), bitcast=True) + ((m_addr - base_i) // 16) * 4 + offs
        m = tl.load(m_ptr)
    else:
        m = tl.load(m_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    m = m.to(tl.float64)
    acc_mm += m * m
    if has_grad:
        if code == 0:
            if FULL:
                g32_ptr = base_ptr.to(tl.pointer_type(tl.float32), bitcast=True) + ((g_addr - base_i) // 16) * 4
                g = tl.load(g32_ptr + offs).to(tl.float64)
            else:
                g = tl.load(g_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0).to(tl.float64)
        elif code == 1:
            if FULL:
                gb_ptr = base_ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + ((g_addr - base_i) // 16) * 8
                raw = tl.load(gb_ptr + offs)
            else:
                raw = tl.load(g_addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
            g = (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(tl.float64)
        else:
            if FULL:
                gh_ptr = base_ptr.to(tl.pointer_type(tl.float16), bitcast=True) + ((g_addr - base_i) // 16) * 8
                g = tl.load(gh_ptr + offs).to(tl.float64)
            else:
                g = tl.load(g_addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float64)
        acc_gg += g * g
        acc_mg += m * g
    return acc_gg, acc_mg, acc_mm


@triton.jit(do_not_specialize=["n_blocks", "n_groups", "iters"])
def mgpo_reduce_kernel(
    tab_ptr, blk_ptr, grp_blk_ptr, part_ptr, sums_ptr, counter_ptr,
    n_blocks, n_groups, iters,
    BLOCK: tl.constexpr, RBLOCK: tl.constexpr, TAB_W: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(blk_ptr + 2 * pid)
    start = tl.load(blk_ptr + 2 * pid + 1)
    row = tab_ptr + t * TAB_W
    g_addr = tl.load(row + 1)
    m_addr = tl.load(row + 2)
    numel = tl.load(row + 6)
    meta = tl.load(row + 7)
    has_grad = (meta & 1) != 0
    code = (meta >> 1) & 3
    aligned = ((meta >> 3) & 1) != 0
    end = tl.minimum(start + iters * BLOCK, numel)

    acc_gg = tl.zeros([BLOCK], dtype=tl.float64)
    acc_mg = tl.zeros([BLOCK], dtype=tl.float64)
    acc_mm = tl.zeros([BLOCK], dtype=tl.float64)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    for it in range(0, iters):
        base = tl.multiple_of(start + it * BLOCK, BLOCK)
        offs = base + lane
        if aligned & (base + BLOCK <= end):
            acc_gg, acc_mg, acc_mm = _reduce_chunk(blk_ptr, g_addr, m_addr, code, has_grad, offs, offs < end,
                                                   acc_gg, acc_mg, acc_mm, True)
        elif base < end:
            acc_gg, acc_mg, acc_mm = _reduce_chunk(blk_ptr, g_addr, m_addr, code, has_grad, offs, offs < end,
                                                   acc_gg, acc_mg, acc_mm, False)
    # one reduction for the 4 partial sums: [gg, mg, mm (with grad), mm (without grad)]
    acc_mm_ng = tl.where(has_grad, 0.0, acc_mm)
    acc_mm = tl.where(has_grad, acc_mm, 0.0)
    # join stacks on a new last axis: [i, j, k] = (k ? second : first)[i, j], so this is [gg, mg, mm, mm_ng]
    part = tl.reshape(tl.join(tl.join(acc_gg, acc_mm), tl.join(acc_mg, acc_mm_ng)), [BLOCK, 4])
    tl.store(part_ptr + 4 * pid + tl.arange(0, 4), tl.sum(part, axis=0))

    # the last program to finish adds the partials in a fixed order (deterministic), then resets the ticket
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == n_blocks - 1:
        rows = tl.arange(0, RBLOCK).to(tl.int64)
        cols = tl.arange(0, 4).to(tl.int64)
        for k in range(0, n_groups):
            b0 = tl.load(grp_blk_ptr + k)
            b1 = tl.load(grp_blk_ptr + k + 1)
            tot = tl.zeros([RBLOCK, 4], dtype=tl.float64)
            for r0 in range(b0, b1, RBLOCK):
                r = r0 + rows
                ptrs = part_ptr + r[:, None] * 4 + cols[None, :]
                tot += tl.load(ptrs, mask=(r < b1)[:, None], other=0.0, volatile=True)
            tl.store(sums_ptr + 4 * k + cols, tl.sum(tot, axis=0))
        tl.store(counter_ptr, 0)


# ----------------------------------------------------------------------------------------------- update pass

@triton.jit
def _update_chunk(base_ptr, p_addr, g_addr, m_addr, v_addr, ma_addr, code, has_grad, start, end,
                  c, restore, apply, decay, b1, omb1, b2, omb2, eps, step_size, sqrt_bc2,
                  BLOCK: tl.constexpr, FULL: tl.constexpr):
    offs = start + tl.arange(0, BLOCK).to(tl.int64)  # here, so that each path gets its own layout
    mask = offs < end
    if FULL:  # 16-byte aligned full block: pointers relative to an aligned kernel argument (see module doc)
        base_i = base_ptr.to(tl.int64)
        b32 = base_ptr.to(tl.pointer_type(tl.float32), bitcast=True)
        m_ptr = b32 + ((m_addr - base_i) // 16) * 4 + offs
        v_ptr = b32 + ((v_addr - base_i) // 16) * 4 + offs
        ma_ptr = b32 + ((ma_addr - base_i) // 16) * 4 + offs
        p32_ptr = b32 + ((p_addr - base_i) // 16) * 4 + offs
        m = tl.load(m_ptr)
    else:
        m_ptr = m_addr.to(tl.pointer_type(tl.float32)) + offs
        v_ptr = v_addr.to(tl.pointer_type(tl.float32)) + offs
        ma_ptr = ma_addr.to(tl.pointer_type(tl.float32)) + offs
        p32_ptr = p_addr.to(tl.pointer_type(tl.float32)) + offs
        m = tl.load(m_ptr, mask=mask, other=0.0)
    if code == 0:  # fp32 parameter: theta = p - coef_old * m, in place
        if FULL:
            theta = tl.load(p32_ptr) - restore * m
        else:
            theta = tl.load(p32_ptr, mask=mask, other=0.0) - restore * m
    else:  # bf16/fp16: the fp32 master copy holds theta
        if FULL:
            theta = tl.load(ma_ptr)
        else:
            theta = tl.load(ma_ptr, mask=mask, other=0.0)
    if has_grad:
        # AdamW exactly as torch.optim.AdamW (and the reference backend), fp32, IEEE division and sqrt
        if code == 0:
            if FULL:
                g32_ptr = b32 + ((g_addr - base_i) // 16) * 4
                g = tl.load(g32_ptr + offs)
            else:
                g = tl.load(g_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
        elif code == 1:
            if FULL:
                gb_ptr = base_ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + ((g_addr - base_i) // 16) * 8
                raw = tl.load(gb_ptr + offs)
            else:
                raw = tl.load(g_addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
            g = (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            if FULL:
                gh_ptr = base_ptr.to(tl.pointer_type(tl.float16), bitcast=True) + ((g_addr - base_i) // 16) * 8
                g = tl.load(gh_ptr + offs).to(tl.float32)
            else:
                g = tl.load(g_addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
        if FULL:
            v = tl.load(v_ptr)
        else:
            v = tl.load(v_ptr, mask=mask, other=0.0)
        gt = g * c
        theta = theta * decay
        m = m * b1 + gt * omb1
        v = v * b2 + gt * gt * omb2
        denom = tl.math.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
        theta = theta - tl.math.div_rn(step_size * m, denom)
        if FULL:
            tl.store(m_ptr, m)
            tl.store(v_ptr, v)
        else:
            tl.store(m_ptr, m, mask=mask)
            tl.store(v_ptr, v, mask=mask)
        if code != 0:
            if FULL:
                tl.store(ma_ptr, theta)
            else:
                tl.store(ma_ptr, theta, mask=mask)
    # p = theta + apply * m (rounded to the parameter dtype): apply = 0 in a step (theta at rest), coef in the
    # apply pass
    new_p = theta + apply * m
    if code == 0:
        if FULL:
            tl.store(p32_ptr, new_p)
        else:
            tl.store(p32_ptr, new_p, mask=mask)
    elif code == 1:
        u = new_p.to(tl.uint32, bitcast=True)
        bits = tl.where(new_p != new_p, 0x7FC0, (u + (((u >> 16) & 1) + 0x7FFF)) >> 16).to(tl.uint16)
        if FULL:
            pb_ptr = base_ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + ((p_addr - base_i) // 16) * 8
            tl.store(pb_ptr + offs, bits)
        else:
            tl.store(p_addr.to(tl.pointer_type(tl.uint16)) + offs, bits, mask=mask)
    else:
        if FULL:
            ph_ptr = base_ptr.to(tl.pointer_type(tl.float16), bitcast=True) + ((p_addr - base_i) // 16) * 8
            tl.store(ph_ptr + offs, new_p.to(tl.float16))
        else:
            tl.store(p_addr.to(tl.pointer_type(tl.float16)) + offs, new_p.to(tl.float16), mask=mask)


@triton.jit(do_not_specialize=["n_blocks", "n_tensors", "n_groups", "iters"])
def mgpo_update_kernel(
    tab_ptr, blk_ptr, grp_lr_ptr, hyp_ptr, sums_ptr,
    g_step_ptr, g_gbar_ptr, g_coef_ptr, g_skipped_ptr, scale_ptr, found_inf_ptr, counter_ptr,
    n_blocks, n_tensors, n_groups, iters,
    BLOCK: tl.constexpr, TBLOCK: tl.constexpr, TAB_W: tl.constexpr, HYP_W: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # ---- scalar stage (every program, float64): reference.scalar_stage, same formulas and order
    rho_s = tl.load(hyp_ptr + 0)
    ema = tl.load(hyp_ptr + 1)
    one_m_ema = tl.load(hyp_ptr + 2)
    mgn = tl.load(hyp_ptr + 3).to(tl.float32)
    has_clip = tl.load(hyp_ptr + 4) != 0.0
    adaptive = tl.load(hyp_ptr + 5) != 0.0
    has_scale = tl.load(hyp_ptr + 7) != 0.0
    has_found_inf = tl.load(hyp_ptr + 8) != 0.0

    s_gg = tl.load(sums_ptr + 0)
    for k in range(1, n_groups):
        s_gg += tl.load(sums_ptr + 4 * k)
    inv_scale = tl.full([], 1.0, tl.float64)
    if has_scale:
        inv_scale = 1.0 / tl.load(scale_ptr).to(tl.float64)
    raw_norm = tl.sqrt(s_gg) * inv_scale  # float64 sqrt and division are IEEE-rounded
    clip = tl.full([], 1.0, tl.float64)
    if has_clip:
        # torch.nn.utils.clip_grad_norm_ in fp32: max / (norm + 1e-6), clamped to 1; and torch evaluates
        # ``scalar / tensor`` as ``tensor.reciprocal() * scalar``
        clip32 = tl.math.div_rn(1.0, raw_norm.to(tl.float32) + 1e-6) * mgn
        clip = tl.where(clip32 > 1.0, 1.0, clip32).to(tl.float64)  # NaN stays NaN
    c = inv_scale * clip
    n_t = raw_norm * clip
    skip = (s_gg - s_gg) != 0.0  # not finite
    if has_found_inf:
        skip = skip | (tl.load(found_inf_ptr) > 0.0)

    first = tl.load(g_step_ptr) == 0.0
    gbar_old = tl.load(g_gbar_ptr).to(tl.float64)
    gbar_new = tl.where(first, n_t, ema * gbar_old + one_m_ema * n_t)

    mm = tl.full([], 0.0, tl.float64)
    for k in range(0, n_groups):
        h = hyp_ptr + (1 + k) * HYP_W
        srow = sums_ptr + 4 * k
        mm = mm + tl.load(h + 7) * tl.load(srow + 2) + tl.load(h + 8) * c * tl.load(srow + 1) \
            + tl.load(h + 9) * c * c * tl.load(srow + 0) + tl.load(srow + 3)
    mm = tl.where(mm < 0.0, 0.0, mm)
    m_norm = tl.sqrt(mm)
    denom = m_norm
    if adaptive:
        gbar_floor = tl.load(hyp_ptr + 9)
        denom = m_norm * tl.where(gbar_new < gbar_floor, gbar_floor, gbar_new)
    coef = rho_s / denom
    ok = ((coef - coef) == 0.0) & (denom > 0.0)
    coef_new = tl.where(ok, coef, 0.0).to(tl.float32)

    # ---- restore, AdamW one chunk of one tensor (theta_{t+1} at rest: nothing is re-applied, apply = 0).  A
    # skipped step (non-finite gradients) still removes the eps a training forward applied, with no gradients.
    perturbed = tl.load(hyp_ptr + 6) != 0.0
    if (skip == 0) | perturbed:
        c32 = c.to(tl.float32)
        coef_old = tl.load(g_coef_ptr)
        restore = tl.where(perturbed, coef_old, 0.0)
        apply = tl.where(perturbed, 0.0, 0.0)

        t = tl.load(blk_ptr + 2 * pid)
        start = tl.load(blk_ptr + 2 * pid + 1)
        row = tab_ptr + t * TAB_W
        p_addr = tl.load(row + 0)
        g_addr = tl.load(row + 1)
        m_addr = tl.load(row + 2)
        v_addr = tl.load(row + 3)
        ma_addr = tl.load(row + 4)
        st_addr = tl.load(row + 5)
        numel = tl.load(row + 6)
        meta = tl.load(row + 7)
        has_grad = ((meta & 1) != 0) & (skip == 0)
        code = (meta >> 1) & 3
        aligned = ((meta >> 3) & 1) != 0
        grp = meta >> 8
        h = hyp_ptr + (1 + grp) * HYP_W
        lr_addr = tl.load(grp_lr_ptr + grp)
        if lr_addr != 0:
            lr = tl.load(lr_addr.to(tl.pointer_type(tl.float32)))
        else:
            lr = tl.load(h + 0).to(tl.float32)
        b1 = tl.load(h + 1).to(tl.float32)
        omb1 = tl.load(h + 2).to(tl.float32)
        b2 = tl.load(h + 3).to(tl.float32)
        omb2 = tl.load(h + 4).to(tl.float32)
        eps = tl.load(h + 5).to(tl.float32)
        # AdamW's per-tensor scalars as torch.optim.AdamW computes them: in fp64 from the exact betas (b**step by
        # squaring), each rounded to fp32 once where the element math uses it
        n = (tl.load(st_addr.to(tl.pointer_type(tl.float32))) + 1.0).to(tl.int64)
        x1 = tl.load(h + 1).to(tl.float64)
        x2 = tl.load(h + 3).to(tl.float64)
        pw1 = tl.full([], 1.0, tl.float64)
        pw2 = tl.full([], 1.0, tl.float64)
        while n > 0:
            odd = (n & 1) != 0
            pw1 = tl.where(odd, pw1 * x1, pw1)
            pw2 = tl.where(odd, pw2 * x2, pw2)
            x1 = x1 * x1
            x2 = x2 * x2
            n = n >> 1
        lr64 = lr.to(tl.float64)
        bc1 = 1.0 - pw1
        bc2 = 1.0 - pw2
        step_size = (lr64 / bc1).to(tl.float32)
        sqrt_bc2 = tl.sqrt(bc2).to(tl.float32)
        decay = (1.0 - lr64 * tl.load(h + 6).to(tl.float64)).to(tl.float32)

        end = tl.minimum(start + iters * BLOCK, numel)
        for it in range(0, iters):
            base = tl.multiple_of(start + it * BLOCK, BLOCK)
            if aligned & (base + BLOCK <= end):
                _update_chunk(blk_ptr, p_addr, g_addr, m_addr, v_addr, ma_addr, code, has_grad, base, end,
                              c32, restore, apply, decay, b1, omb1, b2, omb2, eps, step_size, sqrt_bc2, BLOCK, True)
            elif base < end:
                _update_chunk(blk_ptr, p_addr, g_addr, m_addr, v_addr, ma_addr, code, has_grad, base, end,
                              c32, restore, apply, decay, b1, omb1, b2, omb2, eps, step_size, sqrt_bc2, BLOCK, False)

    # the last program to finish writes the new scalars and step counts: every program has read the old ones
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == n_blocks - 1:
        if skip:
            tl.store(g_skipped_ptr, tl.load(g_skipped_ptr) + 1)
        else:
            tl.store(g_gbar_ptr, gbar_new.to(tl.float32))
            tl.store(g_coef_ptr, coef_new)
            tl.store(g_step_ptr, tl.load(g_step_ptr) + 1.0)
            rows = tl.arange(0, TBLOCK).to(tl.int64)
            for r0 in range(0, n_tensors, TBLOCK):
                r = r0 + rows
                inb = r < n_tensors
                meta_v = tl.load(tab_ptr + r * TAB_W + 7, mask=inb, other=0)
                st_v = tl.load(tab_ptr + r * TAB_W + 5, mask=inb, other=0)
                hg = inb & ((meta_v & 1) != 0)
                sp = st_v.to(tl.pointer_type(tl.float32))
                s = tl.load(sp, mask=hg, other=0.0, volatile=True)
                tl.store(sp, s + 1.0, mask=hg)
        tl.store(counter_ptr, 0)


# ----------------------------------------------------------------------------------------------- apply pass

@triton.jit(do_not_specialize=["iters"])
def mgpo_apply_kernel(tab_ptr, blk_ptr, coef_ptr, iters, BLOCK: tl.constexpr, TAB_W: tl.constexpr):
    """Theta at rest: eps = coef * m applied by the first training forward after a step, p = theta + coef * m
    (theta: p itself, or the fp32 master), with the update pass's element code (no gradient, restore 0), so the
    next step's restore removes exactly this.  Reads p (or the master) and m, writes p; nothing while coef = 0.
    The tensor table is the update pass's (its gradient, v and step columns are not read); its row is read as the
    update kernel reads it, written out again on purpose (a helper costs ~1 ms a call under the interpreter)."""
    pid = tl.program_id(0).to(tl.int64)
    coef = tl.load(coef_ptr)
    if coef != 0.0:
        t = tl.load(blk_ptr + 2 * pid)
        start = tl.load(blk_ptr + 2 * pid + 1)
        row = tab_ptr + t * TAB_W
        p_addr = tl.load(row + 0)
        m_addr = tl.load(row + 2)
        ma_addr = tl.load(row + 4)
        numel = tl.load(row + 6)
        meta = tl.load(row + 7)
        code = (meta >> 1) & 3
        aligned = ((meta >> 3) & 1) != 0
        one = tl.full([], 1.0, tl.float32)
        zero = tl.full([], 0.0, tl.float32)
        end = tl.minimum(start + iters * BLOCK, numel)
        for it in range(0, iters):
            base = tl.multiple_of(start + it * BLOCK, BLOCK)
            if aligned & (base + BLOCK <= end):
                _update_chunk(blk_ptr, p_addr, m_addr, m_addr, m_addr, ma_addr, code, False, base, end,
                              one, zero, coef, one, one, zero, one, zero, one, zero, one, BLOCK, True)
            elif base < end:
                _update_chunk(blk_ptr, p_addr, m_addr, m_addr, m_addr, ma_addr, code, False, base, end,
                              one, zero, coef, one, one, zero, one, zero, one, zero, one, BLOCK, False)
