"""Run the loop in N local processes with torch.distributed (gloo/nccl), no Ray.

For laptops, debugging and the dist test tier; `cluster.launcher=local`. No automatic restarts here:
that is what the Ray launcher is for.

Everything listens on loopback only (one machine): the rendezvous store on 127.0.0.1 (it is
unauthenticated: anyone who reaches it could join or stall the group), gloo/NCCL on the loopback
interface unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say otherwise.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import config as config_mod
from pipeline import imports
from pipeline.data.shards import DataSpec
from pipeline.launch.plan import TrainingFailed
from pipeline.net import LOOPBACK, free_port, loopback_interface, loopback_listener
from pipeline.training import loop


def worker(rank: int, world_size: int, port: int, payloads: list[dict[str, Any]], results: Any) -> None:
    """One local rank: join the process group, run each payload in turn (the launcher passes one; the
    dist tests run several recipes per pair of processes), put rank 0's final metrics of each on
    `results` as ("ok", final), or ("error", traceback) and raise, then leave."""
    for payload in payloads:  # before anything is built: users' modules import as on the driver
        imports.add_paths(payload.get("module_roots", []))
    os.environ.update(
        MASTER_ADDR=LOOPBACK,
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    cluster = config_mod.from_dict(payloads[0]["config"]).cluster  # the same for every payload
    use_cuda = cluster.use_gpu and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(rank)
    lo = loopback_interface()
    if lo is not None:  # gloo and NCCL otherwise listen on the address the host name resolves to
        os.environ.setdefault("NCCL_SOCKET_IFNAME" if use_cuda else "GLOO_SOCKET_IFNAME", lo)
    timeout = timedelta(seconds=cluster.collective_timeout_s)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        store=_rendezvous_store(rank, world_size, port, timeout),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    for payload in payloads:
        try:
            env = loop.WorkerEnv(
                rank=rank,
                world_size=world_size,
                device=f"cuda:{rank}" if use_cuda else "cpu",
                run_id=payload["run_id"],
                launch_id=payload["launch_id"],
                startup_marks=payload.get("times", {}),
            )
            cfg = config_mod.from_dict(payload["config"])
            final = loop.run(cfg, DataSpec.from_dict(payload["spec"]), env, payload["resume_from"])
            if rank == 0:
                results.put(("ok", final))
        except BaseException:
            results.put(("error", f"rank {rank}, run {payload['run_id']}:\n{traceback.format_exc()}"))
            dist.destroy_process_group()
            raise
    # Done: every rank has its result out. Leave without the interpreter's teardown, where C++
    # destructors of the communication threads (gloo, DeepSpeed's shm op) have been seen to abort
    # ("terminate called without an active exception") and turn a finished run into a failure.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rendezvous_store(rank: int, world_size: int, port: int, timeout: timedelta) -> dist.TCPStore:
    """The process group's TCPStore on 127.0.0.1:`port`, rank 0 serving it. Given a host name
    (MASTER_ADDR, env://), torch binds the server to every interface; a socket bound to loopback,
    handed over by its descriptor (the store owns it from then on), keeps it on this machine."""
    if rank != 0:
        return dist.TCPStore(LOOPBACK, port, world_size, is_master=False, timeout=timeout)
    listen_fd = loopback_listener(port).detach()
    return dist.TCPStore(
        LOOPBACK, port, world_size, is_master=True, timeout=timeout, master_listen_fd=listen_fd
    )


def run(payload: dict[str, Any], world_size: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    try:
        mp.start_processes(
            worker,
            args=(world_size, free_port(), [payload], results),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
    except mp.ProcessRaisedException as e:
        raise TrainingFailed(str(e)) from None
    except mp.ProcessExitedException as e:
        raise TrainingFailed(f"a worker died: {e}") from None
    while not results.empty():
        status, value = results.get()
        if status == "ok":
            return value
    raise TrainingFailed("rank 0 finished without a result")
