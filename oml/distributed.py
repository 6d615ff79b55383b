"""Process ranks under `deepspeed --num_gpus N` (or torchrun) and plain `python`.

The launchers export RANK/WORLD_SIZE/LOCAL_RANK; without them we are a single process.
Generation and checking split their work across ranks themselves; fine-tuning leaves
this to the Hugging Face Trainer.
"""
import gc
import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init() -> None:
    """Join the process group when launched with several ranks (no-op for one process)."""
    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size() == 1 or not dist.is_initialized():
        return [obj]
    objects: list[Any] = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects


def from_node_leader(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as the node's local rank 0 holds it, on every rank of the node (on `device()`);
    the node's other ranks pass a meta tensor of its shape and dtype. Lets a node keep one copy
    of something large in host memory instead of one per rank. Every rank must call it."""
    if world_size() == 1:
        return tensor
    group, leader = node_group()
    shared = tensor.to(device()) if local_rank() == 0 else torch.empty_like(tensor, device=device())
    dist.broadcast(shared, leader, group=group)
    return shared


@lru_cache(maxsize=1)
def node_group() -> tuple[dist.ProcessGroup, int]:
    """This node's ranks as a process group, and the global rank of its local rank 0. Launchers
    number a node's ranks consecutively, so that rank is rank() - local_rank(). Creating a group
    is collective: every rank creates every node's group, in the same order."""
    leaders = gather(rank() - local_rank())
    groups = {leader: dist.new_group([r for r, of in enumerate(leaders) if of == leader]) for leader in sorted(set(leaders))}
    return groups[leaders[rank()]], leaders[rank()]


def finish() -> None:
    """Wait for every rank, then leave the process group, so no rank exits while others still
    communicate (a rank that exits with live communication threads can abort). Objects in reference
    cycles (a DeepSpeed engine and the work handles it holds) are freed first, while the interpreter
    is whole: freed during its shutdown, gloo's threads can abort the process."""
    if world_size() > 1 and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        cpu_allreduce_buffer().unlink(missing_ok=True)


def cpu_allreduce_buffer() -> Path:
    """This rank's shared-memory file of DeepSpeed's CPU all-reduce (67 MB in /dev/shm, which is
    memory), which DeepSpeed never removes: left behind, every 2-rank CPU run would hold 134 MB of
    the machine's memory until it restarts."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank()}")


def choose_deepspeed_accelerator() -> None:
    """Tell DeepSpeed there is no GPU before anything imports it: left to find out, it announces its
    CPU fallback on stdout, which carries our results."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
