"""Training on several processes with PyTorch's own DDP, launched by torchrun (one node or many).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain ``dogkit train`` has none and runs as a
world of one, where every helper here is a no-op.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import DogkitError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_gpus(processes: int) -> None:
    """One process per GPU: more processes on this node than visible GPUs is an error, not a crash in NCCL."""
    gpus = torch.cuda.device_count()
    if processes > gpus:
        raise DogkitError(
            f"{processes} training processes on this node but {gpus} CUDA GPU{'s' if gpus != 1 else ''} visible; "
            f"start at most {gpus} (--devices / --nproc_per_node), or pass --device cpu to run the processes on "
            "the CPU (gloo)")


def init_distributed(use_cuda: bool) -> Dist:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) if this process was started by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        # Every process checks the node's process count (not only its own rank), so all stop with the same
        # line before any joins the group, instead of rank N dying with "invalid device ordinal".
        check_gpus(max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), info.local_rank + 1))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_object(d: Dist, obj):
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(d: Dist, obj) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_tensor(d: Dist, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of ``t`` on every rank, left on ``t``'s device (no host synchronisation of its own)."""
    if not d.enabled:
        return t
    out = t.detach().clone()
    if dist.get_backend() == "nccl" and out.device.type != "cuda":
        out = out.cuda()
    dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return out.to(t.device)


def all_reduce(d: Dist, values: list[float], op: str = "sum") -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return t.cpu().tolist()


def broadcast_buffers(d: Dist, module: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere. DDP only re-broadcasts them at the next training
    forward, so after an epoch each rank still holds the statistics of its own last batches."""
    if d.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def requested_device(argv: list[str]) -> str:
    """The --device (or --set device=…) of a ``dogkit train`` command line; auto when absent."""
    device = "auto"
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            device = argv[i + 1]
        elif arg.startswith("--device="):
            device = arg.split("=", 1)[1]
        elif arg == "--set" and i + 1 < len(argv) and argv[i + 1].replace("-", "_").startswith("device="):
            device = argv[i + 1].split("=", 1)[1]
    return device


def without_devices(argv: list[str]) -> list[str]:
    """The command line minus its ``--devices N`` (or ``--devices=N``): what each torchrun process runs."""
    i = argv.index("--devices") if "--devices" in argv else None
    return argv[:i] + argv[i + 2:] if i is not None else [a for a in argv if not a.startswith("--devices=")]


def launch(devices: int, argv: list[str]) -> int:
    """``dogkit train --devices N``: re-run the same command (``argv``, ``--devices`` dropped) under torchrun
    on this node.

    On a GPU machine each process takes one GPU: N above the visible GPUs is refused here, before any
    process starts. ``--device cpu`` asks for N processes on the CPU (gloo) instead, as on a machine
    without a GPU.
    """
    argv = without_devices(argv)
    device = requested_device(argv)
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        check_gpus(devices)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
           "-m", "dogkit", *argv]
    return subprocess.call(cmd)
