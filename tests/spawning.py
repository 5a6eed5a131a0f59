"""Real multi-process tests: a free loopback port, and ranks spawned as fresh processes whose exit
codes are all asserted."""

import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, *args, world: int, timeout: float = 300) -> None:
    """Run ``worker(rank, port, *args)`` in ``world`` fresh processes; assert every exit code is 0."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world, f"worker exit codes {codes}"
