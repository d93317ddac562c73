"""The Triton kernels of the ``triton`` backend: the reduce pass, the update pass (a step: two launches) and the
apply pass (theta at rest's eps, applied by a training forward: one launch).

Every kernel walks a *block table* (program -> (tensor index, first element)) and a *tensor table* (one row of
int64 per tensor: addresses of p, g, m, v, master, step, the element count and a meta word), so one launch covers
every tensor of every param group whatever their number, sizes and dtypes.  A program never straddles tensors:
it handles ``iters * BLOCK`` consecutive elements of one tensor (``iters`` and every count are runtime values).

Tensor table row (``TAB_W`` int64):
  0 p  1 g (0: no grad this step)  2 m  3 v  4 master (0: fp32 param)  5 step  6 numel
  7 meta = has_grad | dtype_code << 1 | aligned << 3 | group << 8        dtype_code: 0 fp32, 1 bf16, 2 fp16
The dtype code is a runtime value (one launch mixes dtypes), uniform within a program: its branches do not
diverge.  ``aligned`` says every address of the row and the block table's own address are 16-byte aligned: full
blocks of such a tensor are compiled as the ``FULL`` specialisation of a chunk (a ``tl.constexpr``): no mask, and
pointers formed as ``blk_ptr`` (a kernel argument, which Triton specializes as 16-byte aligned)
``+ ((addr - blk_addr) // 16) * (16 / elem_size)``, from which the compiler *derives* the alignment and emits
16-byte vector accesses (``_ptr``).  An address cast with ``int_to_ptr`` carries no alignment for the compiler
(even with ``tl.multiple_of``, checked on the sm_90 PTX), and no hint is asserted anywhere, so a misaligned view
cannot be miscompiled: it takes the masked path.  Each kernel's loop therefore calls its chunk function twice,
``FULL=True`` for an aligned full block and ``FULL=False`` for the rest: two compiled bodies, on purpose.

Hyper table ``hyp`` (float64, rows of ``HYP_W``): row 0 is global, row 1 + k is param group k.
  row 0: sign*rho, ema_beta, 1-ema_beta, max_grad_norm, has_clip, adaptive, perturbed, has_scale, has_found_inf,
         gbar_floor (the bound on the perturbation; 0: none)
  row 1+k: lr (used when the group's lr address is 0), b1, 1-b1, b2, 1-b2, eps, wd, b1*b1, 2*b1*(1-b1), (1-b1)**2

Memory traffic per element (fp32 parameter / bf16 or fp16 parameter; m, v and the master are fp32):
  reduce  reads g, m                                     8 B / 6 B   (m only for a tensor without gradient: 4 B)
  update  reads p (or the master), g, m, v; writes p, m, v (and the master)          28 B / 28 B
          (a tensor without gradient: reads p or the master, and m; writes p: 12 B / 10 B)
  apply   reads p or master, m; writes p                 12 B / 10 B

Deterministic, no float atomics: each program of the reduce pass writes its 4 partial sums (float64); the last
program to finish (an int32 ticket counter: the classic "last block" pattern, ``_is_last_program``) adds the
partials group by group in a fixed order into ``sums`` and resets the counter.  The update pass computes the
scalar stage redundantly in every program (a few float64 flops on the 4 * groups sums) and its last program
writes the optimizer-wide scalars and the per-tensor step counts, after every program has read the old ones
(program 0 hands it the new gbar and coef through ``pending``, 2 fp32 of the backend's tables).

bf16 is loaded and stored as its uint16 bits with integer conversions (exactly c10::BFloat16's round to nearest
even): the interpreter truncates ``.to(tl.bfloat16)``, and this gives the same bits on the CPU and the GPU.
Arithmetic that must round like the reference (products rounded, then summed) relies on the launch option
``enable_fp_fusion=False`` (backends/triton.py); divisions and square roots are IEEE (``div_rn``, ``sqrt_rn``).

The helpers (``@triton.jit`` functions) are inlined by the compiler.  Under TRITON_INTERPRET=1 they are called as
plain Python functions (``_call_helpers_directly_when_interpreted``, at the end of this module).
"""
from __future__ import annotations

import triton
import triton.language as tl

TAB_W = 8
HYP_W = 12
BLOCK = 1024  # largest elements per inner iteration (the host picks 256..1024 by a rule; 4 per thread)
RBLOCK = 256  # partial rows per iteration of the final sum
TBLOCK = 256  # tensor rows per iteration of the step-count update


# ------------------------------------------------------------------------------------------ element access

@triton.jit
def _ptr(base_ptr, addr, offs, DTYPE: tl.constexpr, FULL: tl.constexpr):
    """Pointers to elements ``offs`` of the ``DTYPE`` tensor at the integer address ``addr``.  ``FULL`` (every
    address 16-byte aligned): relative to ``base_ptr``, an aligned kernel argument, so that the compiler knows the
    alignment (module doc); otherwise a plain cast, of unknown alignment."""
    if FULL:
        per_16_bytes: tl.constexpr = 128 // DTYPE.primitive_bitwidth
        base = base_ptr.to(tl.pointer_type(DTYPE), bitcast=True)
        return base + ((addr - base_ptr.to(tl.int64)) // 16) * per_16_bytes + offs
    else:
        return addr.to(tl.pointer_type(DTYPE)) + offs


@triton.jit
def _load(ptrs, mask, FULL: tl.constexpr):
    """A chunk's elements: unmasked in a full block, else 0 beyond the tensor's end."""
    if FULL:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _store(ptrs, x, mask, FULL: tl.constexpr):
    if FULL:
        tl.store(ptrs, x)
    else:
        tl.store(ptrs, x, mask=mask)


@triton.jit
def _load_grad(base_ptr, g_addr, code, offs, mask, FULL: tl.constexpr):
    """The gradient in fp32 (exact for every dtype): fp32, bf16 (its bits shifted into an fp32's), or fp16."""
    if code == 0:
        g = _load(_ptr(base_ptr, g_addr, offs, tl.float32, FULL), mask, FULL)
    elif code == 1:
        bits = _load(_ptr(base_ptr, g_addr, offs, tl.uint16, FULL), mask, FULL)
        g = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        g = _load(_ptr(base_ptr, g_addr, offs, tl.float16, FULL), mask, FULL).to(tl.float32)
    return g


@triton.jit
def _load_theta(base_ptr, p_addr, ma_addr, code, offs, mask, FULL: tl.constexpr):
    """The fp32 storage of theta: an fp32 parameter itself (which may hold theta + eps), else the fp32 master."""
    if code == 0:
        theta = _load(_ptr(base_ptr, p_addr, offs, tl.float32, FULL), mask, FULL)
    else:
        theta = _load(_ptr(base_ptr, ma_addr, offs, tl.float32, FULL), mask, FULL)
    return theta


@triton.jit
def _store_param(base_ptr, p_addr, code, offs, mask, x, FULL: tl.constexpr):
    """Writes fp32 ``x`` into the parameter, rounded to its dtype to nearest even (bf16: by integer arithmetic,
    NaN as c10's canonical 0x7FC0)."""
    if code == 0:
        _store(_ptr(base_ptr, p_addr, offs, tl.float32, FULL), x, mask, FULL)
    elif code == 1:
        u = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x != x, 0x7FC0, (u + (((u >> 16) & 1) + 0x7FFF)) >> 16).to(tl.uint16)
        _store(_ptr(base_ptr, p_addr, offs, tl.uint16, FULL), bits, mask, FULL)
    else:
        _store(_ptr(base_ptr, p_addr, offs, tl.float16, FULL), x.to(tl.float16), mask, FULL)


# ------------------------------------------------------------------------------------------ shared structure

@triton.jit
def _block(tab_ptr, blk_ptr, pid, iters, BLOCK: tl.constexpr, TAB_W: tl.constexpr):
    """Program ``pid``'s block: its tensor's row of the tensor table (module doc) and its element range.

    Returns (p, g, m, v, master, step addresses, start, end, has_grad, dtype code, aligned, group); what a
    kernel does not use is not loaded in its compiled code."""
    t = tl.load(blk_ptr + 2 * pid)
    start = tl.load(blk_ptr + 2 * pid + 1)
    row = tab_ptr + t * TAB_W
    end = tl.minimum(start + iters * BLOCK, tl.load(row + 6))
    meta = tl.load(row + 7)
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5), start, end, (meta & 1) != 0, (meta >> 1) & 3, ((meta >> 3) & 1) != 0, meta >> 8)


@triton.jit
def _is_last_program(counter_ptr, n_blocks):
    """True in the one program that finishes last (the "last block" ticket; acq_rel: it sees every other
    program's writes).  That program must reset the counter to 0 for the next launch."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == n_blocks - 1


# ----------------------------------------------------------------------------------------------- reduce pass

@triton.jit
def _reduce_chunk(base_ptr, g_addr, m_addr, code, has_grad, start, end, acc_gg, acc_mg, acc_mm,
                  BLOCK: tl.constexpr, FULL: tl.constexpr):
    """Adds one chunk's g*g, m*g and m*m (float64) to the per-lane accumulators.  Reads m (4 B), g (2 or 4 B)."""
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < end
    m = _load(_ptr(base_ptr, m_addr, offs, tl.float32, FULL), mask, FULL).to(tl.float64)
    acc_mm += m * m
    if has_grad:
        g = _load_grad(base_ptr, g_addr, code, offs, mask, FULL).to(tl.float64)
        acc_gg += g * g
        acc_mg += m * g
    return acc_gg, acc_mg, acc_mm


@triton.jit(do_not_specialize=["n_blocks", "n_groups", "iters"])
def mgpo_reduce_kernel(
    tab_ptr, blk_ptr, grp_blk_ptr, part_ptr, sums_ptr, counter_ptr,
    n_blocks, n_groups, iters,
    BLOCK: tl.constexpr, RBLOCK: tl.constexpr, TAB_W: tl.constexpr,
):
    """Pass 1: ``sums[4k:4k+4] = [|g|^2, <m, g>, |m|^2 (with grad), |m|^2 (without grad)]`` of group k, float64,
    over the raw gradients and m_{t-1} (base.py's layout).  Reads g and m; writes its 4 partials to ``part``, and
    the last program ``sums``.  Modifies no tensor of the optimizer."""
    pid = tl.program_id(0).to(tl.int64)
    _, g_addr, m_addr, _, _, _, start, end, has_grad, code, aligned, _ = _block(tab_ptr, blk_ptr, pid, iters,
                                                                                BLOCK, TAB_W)
    acc_gg = tl.zeros([BLOCK], dtype=tl.float64)
    acc_mg = tl.zeros([BLOCK], dtype=tl.float64)
    acc_mm = tl.zeros([BLOCK], dtype=tl.float64)
    for it in range(0, iters):
        base = tl.multiple_of(start + it * BLOCK, BLOCK)
        if aligned & (base + BLOCK <= end):  # the FULL specialisation (module doc)
            acc_gg, acc_mg, acc_mm = _reduce_chunk(blk_ptr, g_addr, m_addr, code, has_grad, base, end,
                                                   acc_gg, acc_mg, acc_mm, BLOCK, True)
        elif base < end:
            acc_gg, acc_mg, acc_mm = _reduce_chunk(blk_ptr, g_addr, m_addr, code, has_grad, base, end,
                                                   acc_gg, acc_mg, acc_mm, BLOCK, False)
    # one reduction for the 4 partial sums: [gg, mg, mm (with grad), mm (without grad)]
    acc_mm_ng = tl.where(has_grad, 0.0, acc_mm)
    acc_mm = tl.where(has_grad, acc_mm, 0.0)
    # join stacks on a new last axis: [i, j, k] = (k ? second : first)[i, j], so this is [gg, mg, mm, mm_ng]
    part = tl.reshape(tl.join(tl.join(acc_gg, acc_mm), tl.join(acc_mg, acc_mm_ng)), [BLOCK, 4])
    tl.store(part_ptr + 4 * pid + tl.arange(0, 4), tl.sum(part, axis=0))

    # the last program to finish adds the partials in a fixed order (deterministic), then resets the ticket
    if _is_last_program(counter_ptr, n_blocks):
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
def _scalar_stage(hyp_ptr, sums_ptr, n_groups, g_step_ptr, g_gbar_ptr, scale_ptr, found_inf_ptr,
                  HYP_W: tl.constexpr):
    """reference.scalar_stage, same formulas and order, float64: (c, skip, gbar_new, coef_new) from the sums.
    c turns a raw gradient into g_t (unscale, then clip); skip: the gradients are not finite (or found_inf)."""
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
    return c, skip, gbar_new, coef_new


@triton.jit
def _adamw_scalars(h, lr, step_addr):
    """AdamW's per-tensor scalars as torch.optim.AdamW computes them, from group row ``h`` of the hyper table and
    the tensor's step count before this step: in float64 from the exact betas (b**step by squaring), each
    rounded to fp32 once where the element math uses it.  Returns (lr / bc1, sqrt(bc2), 1 - lr * wd)."""
    n = (tl.load(step_addr.to(tl.pointer_type(tl.float32))) + 1.0).to(tl.int64)
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
    step_size = (lr64 / (1.0 - pw1)).to(tl.float32)
    sqrt_bc2 = tl.sqrt(1.0 - pw2).to(tl.float32)
    decay = (1.0 - lr64 * tl.load(h + 6).to(tl.float64)).to(tl.float32)
    return step_size, sqrt_bc2, decay


@triton.jit
def _update_chunk(base_ptr, p_addr, g_addr, m_addr, v_addr, ma_addr, code, has_grad, start, end,
                  c, restore, decay, b1, omb1, b2, omb2, eps, step_size, sqrt_bc2,
                  BLOCK: tl.constexpr, FULL: tl.constexpr):
    """Restore theta, AdamW (torch.optim.AdamW's fp32 element math, IEEE division and sqrt), write theta_{t+1}
    into p (theta at rest: no eps).  fp32 parameter: reads p, g, m, v, writes p, m, v; bf16/fp16: reads the
    master, g, m, v, writes p, m, v and the master.  Without a gradient: reads p (or the master) and m, writes p
    (theta: eps removed)."""
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < end
    # the fp32 pointers formed once, up front: formed at their uses, the same code took 73 VGPRs instead of 57 on
    # gfx942, and spilled on sm_90 or sm_100 in other arrangements (2026-12-07-triton-after-house.txt)
    m_ptr = _ptr(base_ptr, m_addr, offs, tl.float32, FULL)
    v_ptr = _ptr(base_ptr, v_addr, offs, tl.float32, FULL)
    ma_ptr = _ptr(base_ptr, ma_addr, offs, tl.float32, FULL)
    p32_ptr = _ptr(base_ptr, p_addr, offs, tl.float32, FULL)
    m = _load(m_ptr, mask, FULL)
    if code == 0:  # an fp32 parameter holds theta + restore * m: theta = p - restore * m, product rounded first
        theta = _load(p32_ptr, mask, FULL) - restore * m
    else:
        theta = _load(ma_ptr, mask, FULL)
    if has_grad:
        gt = _load_grad(base_ptr, g_addr, code, offs, mask, FULL) * c
        v = _load(v_ptr, mask, FULL)
        theta = theta * decay
        m = m * b1 + gt * omb1
        v = v * b2 + gt * gt * omb2
        denom = tl.math.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
        theta = theta - tl.math.div_rn(step_size * m, denom)
        _store(m_ptr, m, mask, FULL)
        _store(v_ptr, v, mask, FULL)
        if code != 0:
            _store(ma_ptr, theta, mask, FULL)
    _store_param(base_ptr, p_addr, code, offs, mask, theta, FULL)


@triton.jit(do_not_specialize=["n_blocks", "n_tensors", "n_groups", "iters"])
def mgpo_update_kernel(
    tab_ptr, blk_ptr, grp_lr_ptr, hyp_ptr, sums_ptr,
    g_step_ptr, g_gbar_ptr, g_coef_ptr, g_skipped_ptr, scale_ptr, found_inf_ptr, counter_ptr, pending_ptr,
    n_blocks, n_tensors, n_groups, iters,
    BLOCK: tl.constexpr, TBLOCK: tl.constexpr, TAB_W: tl.constexpr, HYP_W: tl.constexpr,
):
    """Pass 2: the scalar stage (every program), then restore + AdamW on its block (``_update_chunk``: p, m, v and
    the master in place); the last program writes the optimizer-wide scalars (step, gbar, coef or skipped) and
    the step counts of the tensors with a gradient.  A skipped step (non-finite gradients) still removes the eps
    a training forward applied (``perturbed``), with no gradients, and changes nothing else."""
    pid = tl.program_id(0).to(tl.int64)
    c, skip, gbar_new, coef_new = _scalar_stage(hyp_ptr, sums_ptr, n_groups, g_step_ptr, g_gbar_ptr, scale_ptr,
                                                found_inf_ptr, HYP_W)
    # the new gbar and coef are written by the last program, after every program has read the old ones; program 0
    # hands them over through ``pending`` (2 fp32), rather than every program keeping them live through its loop
    # (sm_80: 95 registers instead of 80) or the last one computing them again in its branch (gfx942: 78 VGPRs
    # instead of 57; benchmarks/results/2026-12-07-triton-after-house.txt)
    if pid == 0:
        tl.store(pending_ptr + 0, gbar_new.to(tl.float32))
        tl.store(pending_ptr + 1, coef_new)
    perturbed = tl.load(hyp_ptr + 6) != 0.0
    if (skip == 0) | perturbed:
        c32 = c.to(tl.float32)
        restore = tl.where(perturbed, tl.load(g_coef_ptr), 0.0)
        p_addr, g_addr, m_addr, v_addr, ma_addr, st_addr, start, end, has_grad, code, aligned, grp = _block(
            tab_ptr, blk_ptr, pid, iters, BLOCK, TAB_W)
        has_grad = has_grad & (skip == 0)
        h = hyp_ptr + (1 + grp) * HYP_W
        lr_addr = tl.load(grp_lr_ptr + grp)  # a tensor lr read in place (0: the table's float lr)
        if lr_addr != 0:
            lr = tl.load(lr_addr.to(tl.pointer_type(tl.float32)))
        else:
            lr = tl.load(h + 0).to(tl.float32)
        b1 = tl.load(h + 1).to(tl.float32)
        omb1 = tl.load(h + 2).to(tl.float32)
        b2 = tl.load(h + 3).to(tl.float32)
        omb2 = tl.load(h + 4).to(tl.float32)
        eps = tl.load(h + 5).to(tl.float32)
        step_size, sqrt_bc2, decay = _adamw_scalars(h, lr, st_addr)
        for it in range(0, iters):
            base = tl.multiple_of(start + it * BLOCK, BLOCK)
            if aligned & (base + BLOCK <= end):  # the FULL specialisation (module doc)
                _update_chunk(blk_ptr, p_addr, g_addr, m_addr, v_addr, ma_addr, code, has_grad, base, end,
                              c32, restore, decay, b1, omb1, b2, omb2, eps, step_size, sqrt_bc2, BLOCK, True)
            elif base < end:
                _update_chunk(blk_ptr, p_addr, g_addr, m_addr, v_addr, ma_addr, code, has_grad, base, end,
                              c32, restore, decay, b1, omb1, b2, omb2, eps, step_size, sqrt_bc2, BLOCK, False)

    # the last program to finish writes the new scalars and step counts: every program has read the old ones
    if _is_last_program(counter_ptr, n_blocks):
        if skip:
            tl.store(g_skipped_ptr, tl.load(g_skipped_ptr) + 1)
        else:
            tl.store(g_gbar_ptr, tl.load(pending_ptr + 0, volatile=True))
            tl.store(g_coef_ptr, tl.load(pending_ptr + 1, volatile=True))
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

@triton.jit
def _apply_chunk(base_ptr, p_addr, m_addr, ma_addr, code, coef, start, end, BLOCK: tl.constexpr,
                 FULL: tl.constexpr):
    """p = theta + coef * m (product rounded, then the sum: base.Backend.perturb's arithmetic), theta being p
    itself or the fp32 master.  Reads p (or the master) and m, writes p."""
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < end
    theta = _load_theta(base_ptr, p_addr, ma_addr, code, offs, mask, FULL)
    m = _load(_ptr(base_ptr, m_addr, offs, tl.float32, FULL), mask, FULL)
    _store_param(base_ptr, p_addr, code, offs, mask, theta + coef * m, FULL)


@triton.jit(do_not_specialize=["iters"])
def mgpo_apply_kernel(tab_ptr, blk_ptr, coef_ptr, iters, BLOCK: tl.constexpr, TAB_W: tl.constexpr):
    """Theta at rest: eps = coef * m applied by the first training forward after a step (``_apply_chunk``), so
    that the next step's restore removes exactly this.  Nothing is read or written while coef = 0.  The tensor
    table is the update pass's layout (its gradient, v and step columns are not read)."""
    pid = tl.program_id(0).to(tl.int64)
    coef = tl.load(coef_ptr)
    if coef != 0.0:
        p_addr, _, m_addr, _, ma_addr, _, start, end, _, code, aligned, _ = _block(tab_ptr, blk_ptr, pid, iters,
                                                                                  BLOCK, TAB_W)
        for it in range(0, iters):
            base = tl.multiple_of(start + it * BLOCK, BLOCK)
            if aligned & (base + BLOCK <= end):  # the FULL specialisation (module doc)
                _apply_chunk(blk_ptr, p_addr, m_addr, ma_addr, code, coef, base, end, BLOCK, True)
            elif base < end:
                _apply_chunk(blk_ptr, p_addr, m_addr, ma_addr, code, coef, base, end, BLOCK, False)


# ------------------------------------------------------------------------------------------ the interpreter

def _call_helpers_directly_when_interpreted() -> None:
    """Under TRITON_INTERPRET=1, each call of a ``@triton.jit`` helper from a kernel first patches
    ``triton.language`` again (about 0.15 ms a call, a few dozen calls per chunk), although the kernel's launch
    has already patched it for all of its programs.  The helpers are therefore replaced here by their
    interpreted bodies (the interpreter's own rewrite of each one), called as plain Python functions while a
    kernel runs: the same code and results, without the per-call patching.  Nothing changes for compiled
    kernels (no interpreter: the helpers stay JIT functions, inlined by the compiler) nor for the kernels
    themselves (still launched through the interpreter, which patches the language around each launch)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return
    module = globals()
    for name, fn in list(module.items()):
        if name.startswith("_") and isinstance(fn, InterpretedFunction) and hasattr(fn, "rewrite"):
            module[name] = fn.rewrite()


_call_helpers_directly_when_interpreted()
