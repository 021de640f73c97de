"""
Start distributed training the way Detectron2 does, also on machines without CUDA.

``launch`` has the signature and behaviour of ``detectron2.engine.launch`` and hands over to
it whenever that Detectron2 can do the job: one process, a machine with CUDA (NCCL), or a
Detectron2 whose ``launch`` falls back to gloo by itself (main since 2023). Only Detectron2
releases whose worker asserts CUDA (v0.6) on a machine without it take the path here: the same
steps as Detectron2's worker (spawn one process per slot, ``init_process_group``, the
per-machine process group of ``detectron2.utils.comm``, a barrier, ``main_func(*args)``), with
the gloo backend. The training itself stays Detectron2's trainer over ``torch.distributed``.

``launch_from_env`` is the entry for processes that another launcher already started
(``torchrun``, or a SLURM step that exports torchrun's variables): it joins the process group
from the environment instead of spawning.

Both entries take any ``main_func``: ``train_net.py`` passes its ``main``; a LazyConfig entry
can pass its own.
"""
import importlib
import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

__all__ = ["DEFAULT_TIMEOUT", "call_in_rank_order", "check_launch_args", "launch", "launch_entry",
           "launch_from_env",
           "started_by_torchrun", "detectron2_launch_supports_this_machine"]

logger = logging.getLogger(__name__)

# ``detectron2.engine.launch`` is the function (the package re-exports it over the module's
# name), so the module is looked up by its full name.
_D2_LAUNCH = importlib.import_module("detectron2.engine.launch")
# Detectron2's process-group timeout (30 minutes): how long a collective waits for a peer
# that is alive but stuck. A peer that dies closes its sockets and fails collectives at once.
DEFAULT_TIMEOUT = getattr(_D2_LAUNCH, "DEFAULT_TIMEOUT", timedelta(minutes=30))

# Variables torchrun (torch.distributed.run) sets in every process it starts.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT")


def detectron2_launch_supports_this_machine() -> bool:
    """
    Whether ``detectron2.engine.launch`` can start several processes here: with CUDA always
    (NCCL); without, only a Detectron2 that falls back to gloo. That Detectron2 also has
    ``comm.create_local_process_group`` (added two weeks after the gloo fallback); v0.6 has
    neither and asserts CUDA in its worker.
    """
    return torch.cuda.is_available() or hasattr(comm, "create_local_process_group")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _create_local_process_group(num_workers_per_machine: int) -> None:
    """``comm``'s per-machine group (``get_local_rank``, ``get_local_size``); a collective."""
    if hasattr(comm, "create_local_process_group"):  # Detectron2 main
        comm.create_local_process_group(num_workers_per_machine)
        return
    # v0.6 keeps the group in a module attribute that its own launch fills in.
    if comm._LOCAL_PROCESS_GROUP is not None:
        raise RuntimeError("detectron2.utils.comm already has a local process group")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    for machine in range(world_size // num_workers_per_machine):
        ranks = list(range(machine * num_workers_per_machine,
                           (machine + 1) * num_workers_per_machine))
        group = dist.new_group(ranks)  # every rank creates every group, in the same order
        if rank in ranks:
            comm._LOCAL_PROCESS_GROUP = group


def _gloo_worker(local_rank, main_func, world_size, num_workers_per_machine, machine_rank,
                 dist_url, args, timeout):
    global_rank = machine_rank * num_workers_per_machine + local_rank
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logger.error(f"Process group URL: {dist_url}")
        raise
    _create_local_process_group(num_workers_per_machine)
    comm.synchronize()  # all ranks joined before any work starts
    main_func(*args)


def _log_worker_failure(error: Exception) -> None:
    cause = str(error).strip()
    if isinstance(error, mp.ProcessRaisedException):  # its message is the whole traceback
        last = [line.strip() for line in cause.splitlines() if line.strip()][-1:]
        cause = f"process {error.error_index} raised {last[0] if last else 'an exception'}"
    logger.error(
        f"Distributed job stopped: {cause}. The launcher stops the other workers of this "
        "machine; workers on other machines fail at their next collective (or after the "
        "process-group timeout if a peer hangs without exiting). Rerun the same command with "
        "--resume to continue from OUTPUT_DIR/last_checkpoint.")


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None,
           args=(), timeout=DEFAULT_TIMEOUT):
    """
    ``detectron2.engine.launch``, which also runs without CUDA on Detectron2 v0.6 (gloo).

    Call it on every machine of the job. It starts ``num_gpus_per_machine`` worker processes
    on this machine (one process per GPU; without GPUs, that many CPU processes), joins them
    into one process group of ``num_machines * num_gpus_per_machine`` ranks and calls
    ``main_func(*args)`` in each. With one process in all, ``main_func`` runs in this process.

    Args:
        main_func: a picklable function (module level), called as ``main_func(*args)``.
        num_gpus_per_machine (int): worker processes per machine.
        num_machines (int): machines in the job.
        machine_rank (int): this machine's index in ``[0, num_machines)``; machine 0 hosts
            the rendezvous.
        dist_url (str): ``tcp://HOST:PORT`` of machine 0 (``"auto"``: a free port on
            127.0.0.1, one machine only).
        args (tuple): arguments of ``main_func`` (picklable).
        timeout (timedelta): process-group timeout.

    Raises:
        torch.multiprocessing.ProcessRaisedException / ProcessExitedException: a worker
            raised or died (killed, out of memory); the other local workers are stopped.
    """
    world_size = num_machines * num_gpus_per_machine
    try:
        if world_size <= 1 or detectron2_launch_supports_this_machine():
            return _D2_LAUNCH.launch(main_func, num_gpus_per_machine, num_machines=num_machines,
                                     machine_rank=machine_rank, dist_url=dist_url, args=args,
                                     timeout=timeout)
        if dist_url == "auto":
            if num_machines != 1:
                raise ValueError("dist_url='auto' works on one machine only; give machine 0's "
                                 "tcp://HOST:PORT to every machine")
            dist_url = f"tcp://127.0.0.1:{_free_port()}"
        if not dist_url:
            raise ValueError("dist_url is required with more than one process, e.g. "
                             "tcp://127.0.0.1:29500")
        if num_machines > 1 and dist_url.startswith("file://"):
            logger.warning("file:// is not a reliable init_method in multi-machine jobs. "
                           "Prefer tcp://")
        mp.start_processes(
            _gloo_worker, nprocs=num_gpus_per_machine,
            args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args,
                  timeout),
            daemon=False, start_method="spawn")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        _log_worker_failure(e)
        raise


def started_by_torchrun() -> bool:
    """Whether this process was started by torchrun (its rank variables are set)."""
    return all(name in os.environ for name in _TORCHRUN_ENV)


def launch_from_env(main_func, args=(), timeout=DEFAULT_TIMEOUT):
    """
    Run ``main_func(*args)`` in a process that torchrun (or a scheduler exporting the same
    variables: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    started: join the process group (NCCL with CUDA, gloo without), select the GPU
    ``LOCAL_RANK``, create ``comm``'s per-machine group, synchronize, run.

    Raises:
        ValueError: a variable is missing or the machines run different numbers of processes
            (Detectron2's per-machine group needs the same number on every machine).
    """
    missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ValueError(f"launch_from_env needs the torchrun variables {missing} in the "
                         "environment (start the script with torchrun)")
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
    if local_world_size < 1 or world_size % local_world_size != 0:
        raise ValueError(f"WORLD_SIZE={world_size} is not a multiple of "
                         f"LOCAL_WORLD_SIZE={local_world_size}: every machine must run the "
                         "same number of processes (torchrun --nproc-per-node)")
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        torch.cuda.set_device(local_rank)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if has_gpu else "gloo", init_method="env://",
                                timeout=timeout)
        _create_local_process_group(local_world_size)
        comm.synchronize()
    return main_func(*args)


def call_in_rank_order(fn):
    """
    Call ``fn()`` in every process of the job, one writer per file system at a time: first
    the main process, then the first process of every other machine (which finds rank 0's
    files on shared storage or writes its own copy), then every other process. A collective:
    call it on every rank. For set-up that writes files and registers something in each
    process, e.g. generating and registering a dataset.

    Returns:
        what ``fn()`` returned in this process.
    """
    result = None
    if comm.is_main_process():
        result = fn()
    comm.synchronize()
    if comm.get_local_rank() == 0 and not comm.is_main_process():
        result = fn()
    comm.synchronize()
    if comm.get_local_rank() != 0:
        result = fn()
    return result


def check_launch_args(num_gpus, num_machines, machine_rank) -> None:
    """
    Raise a ``ValueError`` naming the flag (``--num-gpus``, ``--num-machines``,
    ``--machine-rank``) when the values cannot describe a job: a machine rank outside
    ``[0, num_machines)`` would otherwise wait for peers that never come.
    """
    for flag, value, minimum in (("--num-gpus", num_gpus, 1), ("--num-machines", num_machines, 1),
                                 ("--machine-rank", machine_rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    if machine_rank >= num_machines:
        raise ValueError(f"--machine-rank {machine_rank} is not below --num-machines "
                         f"{num_machines}: machines are numbered 0 to {num_machines - 1}")


def launch_entry(main_func, args) -> None:
    """
    Run ``main_func(args)`` the way a training entry's command line asks (``args`` from
    Detectron2's ``default_argument_parser``): under torchrun, join the processes it started;
    otherwise :func:`launch` ``--num-gpus`` processes on each of ``--num-machines`` machines.

    Raises:
        SystemExit: ``--num-gpus``/``--num-machines`` given under torchrun (its own options set
            the processes).
    """
    if started_by_torchrun():  # torchrun started the processes: join them, spawn nothing
        if args.num_gpus != 1 or args.num_machines != 1:
            raise SystemExit("under torchrun, leave --num-gpus/--num-machines at 1: torchrun's "
                             "--nproc-per-node/--nnodes set the processes")
        launch_from_env(main_func, args=(args,))
    else:
        launch(main_func, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
