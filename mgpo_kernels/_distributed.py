"""Global norms when the parameters are spread over processes.

MGPO's norms are over *all* the parameters it optimizes.  Two layouts split them between ranks:

* FSDP2 (``fully_shard``): DTensor parameters sharded on a 1-D mesh.  One all-reduce of the float64 sums over
  the mesh is exact.  Layouts where it would count elements twice or not at all are refused.
* A sharded optimizer over plain tensors (torch's ``ZeroRedundancyOptimizer``): every rank's MGPO holds a
  different subset of the parameters.  The same all-reduce, over the process group, makes the norms global.

Under DDP every rank holds all the parameters (replicated) and the local norms are the global ones.  Which case a
plain-tensor optimizer is in (``distributed="auto"``): built by a ZeroRedundancyOptimizer, sharded over its group;
otherwise decided at its first step: the ranks compare sizes and checksums of their parameters and gradients;
equal everywhere is replicated, different sizes are sharded, the same sizes with different values cannot be told
apart (independent runs, or a sharded optimizer that is not ZeRO) and are refused with a message asking for
``distributed=...``.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
from torch import Tensor

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
DISTRIBUTED_MODES = ("auto", "replicated", "sharded")


def local(t):
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def dtensor_mesh(param_groups):
    """The mesh of the DTensor (FSDP2) parameters, None if there are none; refuses layouts the single
    all-reduce of the global sums would get wrong (Replicate placements, 2-D meshes, several meshes, DTensors
    mixed with plain tensors, FSDP1's flat parameters)."""
    mesh, plain, where = None, None, None
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            if getattr(p, "_is_flat_param", False):  # FSDP1's FlatParameter is a plain nn.Parameter + this flag
                raise NotImplementedError(
                    f"param {pi} of group {gi} is an FSDP1 FlatParameter (a flat shard): MGPO's global norms "
                    "would be per rank. Use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP."
                )
            if type(p) in _PLAIN_TYPES:  # fast path: a plain tensor / nn.Parameter has no mesh
                plain = plain or f"param {pi} of group {gi}"
                continue
            m = getattr(p, "device_mesh", None)
            if m is None:
                plain = plain or f"param {pi} of group {gi}"
                continue
            placements = tuple(p.placements)
            if m.ndim != 1 or len(placements) != 1 or not placements[0].is_shard():
                raise NotImplementedError(
                    f"MGPO supports DTensor parameters sharded on a 1-D device mesh (FSDP2 fully_shard); param "
                    f"{pi} of group {gi} has placements {placements} on a {m.ndim}-D mesh. Replicated, "
                    "HSDP and tensor-parallel layouts are not supported: its global norms would be wrong."
                )
            if mesh is None:
                mesh, where = m, f"param {pi} of group {gi}"
            elif m != mesh:
                raise NotImplementedError(
                    f"MGPO needs all DTensor parameters on one device mesh; {where} and param {pi} of group "
                    f"{gi} are on different meshes"
                )
    if mesh is not None and plain is not None:
        raise NotImplementedError(
            f"MGPO got DTensor (sharded) parameters and plain tensors ({plain}) together; its global norms need "
            "all parameters sharded the same way (apply fully_shard to every module whose parameters it holds)"
        )
    return mesh


def _initialized_world(process_group) -> Optional[int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_world_size(process_group)


def sharding_parent():
    """The ZeroRedundancyOptimizer constructing this optimizer, if one is (it builds its local optimizer over this
    rank's shard inside its own __init__), else None: then MGPO knows it is sharded, and over which group."""
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    frame = sys._getframe(1)
    for _ in range(8):
        frame = frame.f_back
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, ZeroRedundancyOptimizer):
            return obj
    return None


def _signature(param_groups, device: torch.device) -> Tensor:
    """[number of tensors, number of elements, sums and sums of squares of the parameters and of their
    gradients] on this rank, float64.  Replicas (DDP) agree on all of it; shards differ in some of it."""
    n, numel = 0, 0
    s = torch.zeros(4, dtype=torch.float64, device=device)
    for g in param_groups:
        for p in g["params"]:
            t = p.detach().double()
            n += 1
            numel += p.numel()
            gr = p.grad.detach().double() if p.grad is not None else torch.zeros((), dtype=torch.float64,
                                                                                  device=device)
            s += torch.stack([t.sum(), t.square().sum(), gr.sum(), gr.square().sum()])
    return torch.cat([torch.tensor([float(n), float(numel)], dtype=torch.float64, device=device), s])


def detect_layout(param_groups, device: torch.device, mode: str, process_group) -> str:
    """"local" (one process, or every rank holds all the parameters) or "sharded" (ranks hold different
    parameters: the sums must be all-reduced).  A collective when ``mode == "auto"`` under a process group."""
    if dtensor_mesh(param_groups) is not None:  # FSDP2: the mesh says how they are sharded
        return "local"
    world = _initialized_world(process_group)
    if mode == "sharded":
        if world is None:
            raise RuntimeError("MGPO(distributed='sharded') needs an initialised torch.distributed process group")
        return "sharded" if world > 1 else "local"
    if mode == "replicated" or world is None or world == 1:
        return "local"
    import torch.distributed as dist

    sig = _signature(param_groups, device)
    if dist.get_backend(process_group) == "gloo":
        sig = sig.cpu()
    rows = [torch.empty_like(sig) for _ in range(world)]
    dist.all_gather(rows, sig, group=process_group)
    rows = torch.stack(rows).cpu()
    if bool((rows == rows[0]).all()):
        return "local"
    if bool((rows[:, :2] != rows[0, :2]).any()):
        return "sharded"
    raise RuntimeError(
        "MGPO: the ranks of this process group hold parameters of the same sizes but different values (or "
        "gradients), so MGPO "
        "cannot tell whether each rank holds a shard of one model (a sharded optimizer such as "
        "ZeroRedundancyOptimizer: its norms must be summed over the ranks) or its own copy (independent runs, or "
        "replicas not yet synchronised). Say which: MGPO(..., distributed='sharded') or distributed='replicated'."
    )


def reduce_hook(param_groups, layout: str, process_group) -> Optional[Callable[[Tensor], None]]:
    """The all-reduce of the global sums a step needs (None: the local sums are global)."""
    mesh = dtensor_mesh(param_groups)
    if mesh is None and layout != "sharded":
        return None
    import torch.distributed as dist

    pg = mesh.get_group() if mesh is not None else process_group
    return lambda sums: dist.all_reduce(sums, group=pg)
