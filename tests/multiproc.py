"""Run a function on N local gloo processes, for distributed tests on CPU.

Processes are forked, not spawned: a fresh interpreter would re-import torch (and torch._dynamo, which
every optimizer pulls in), which costs ~10 s per process here since bytecode is not cached.
They are spawned after all when this process runs a Ray driver (forking its threads is unsafe)."""
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world_size, *args):
    """fn(rank, world_size, *args) on world_size processes; an exception in any of them fails the caller."""
    ray = sys.modules.get("ray")
    # forking a process that runs a Ray driver (its threads, gRPC) is asking for trouble: spawn then
    method = "spawn" if ray is not None and ray.is_initialized() else "fork"
    mp.start_processes(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True,
                       start_method=method)
