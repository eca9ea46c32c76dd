"""The collective data plane (``--backend gloo|nccl``): process groups, one per membership epoch.

The master owns a torch ``TCPStore`` on the port it announces in the job. Every membership epoch
``g`` gets a fresh group under the store prefix ``hetero_ps/g`` (the master is rank 0; the workers of
the step follow in rank order), so a group that lost a member is simply abandoned: nobody reuses
its connections or its collective sequence numbers. Everything here blocks, and runs on a thread of
its own (:func:`in_thread`), never on the event loop or its default executor: an abandoned group's
collective may stay blocked until its timeout, and must not hold a thread anyone else needs.

Where the group binds: ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` when set (the scripts export the
interface they detect), else the local address of this node's control connection to the master —
the interface that reaches it. A wrong interface is a clear error naming it and the node's interfaces.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil
import torch

from hetero_ps.errors import ConfigError

CAST = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the codecs a plane reduces
IFNAME_VARS = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}
_CHOSEN: dict[str, str] = {}  # the variables this process set itself (the user's are never changed)
BOUND_KEY = "hetero_ps_bound"  # under a group's prefix: where each member binds ("<node> at <addr> (<how>)")

T = TypeVar("T")


class CollectiveError(Exception):
    """A group could not be set up, or one of its collectives failed or timed out: the step is redone
    in a new group (``str()`` says which node, what and why)."""


def in_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run ``fn`` on a daemon thread of its own; its result (or exception) as a future of this loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return  # abandoned (cancelled) meanwhile
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        value: Any
        try:
            value, ok = fn(), True
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            # Without its frames: they hold the group, whose last reference must not be dropped on the
            # event loop (a gloo group's destructor waits for collectives still blocked in it).
            value, ok = exc.with_traceback(None), False
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:
            pass  # the loop closed: nobody waits any more

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


def backend_available(backend: str) -> str | None:
    """None if this node's torch has ``backend``; else what is missing and the fix."""
    import torch.distributed as dist

    if not dist.is_available():
        return f"this torch ({torch.__version__}) was built without torch.distributed: install the official wheel"
    if backend == "gloo" and not dist.is_gloo_available():
        return f"this torch ({torch.__version__}) has no gloo backend: install the official wheel, or --backend tcp"
    if backend == "nccl" and not dist.is_nccl_available():
        return f"this torch ({torch.__version__}) has no NCCL (a CPU-only build?): install a CUDA wheel or use gloo"
    return None


def interface_address(name: str, var: str) -> str:
    """The IPv4 address of interface ``name`` (from ``var``); ConfigError naming it when there is none."""
    addrs = psutil.net_if_addrs()
    v4 = {n: [a.address for a in al if a.family.name == "AF_INET"] for n, al in addrs.items()}
    if name not in addrs or not v4.get(name):
        have = ", ".join(f"{n} ({', '.join(a) or 'no IPv4'})" for n, a in sorted(v4.items()))
        problem = "does not exist on this node" if name not in addrs else "has no IPv4 address"
        raise ConfigError(
            f"{var}={name}: that interface {problem}. This node has {have}. Set {var} to the interface "
            "that reaches the master (or unset it to use the one the control connection takes)"
        )
    return v4[name][0]


def interface_of(addr: str) -> str:
    """The name of the interface holding IPv4 address ``addr`` ("" if none does)."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family.name == "AF_INET" and a.address == addr for a in addrs):
            return name
    return ""


def bind_address(backend: str, local_addr: str) -> tuple[str, str]:
    """``(address, how)`` this node's group binds to: the interface named in the backend's variable,
    else the one holding ``local_addr`` (this end of the control connection), which then goes into
    that variable for torch to read; ``how`` says which, for error messages."""
    var = IFNAME_VARS[backend]
    name = os.environ.get(var, "").strip()
    if name and _CHOSEN.get(var) != name:
        return interface_address(name, var), f"{var}={name}"
    found = interface_of(local_addr)
    if found:
        os.environ[var] = _CHOSEN[var] = found  # torch binds to the interface this variable names
        return local_addr, f"{found}, the control connection's interface"
    return local_addr, "the control connection's address"


def connect_store(host: str, port: int, timeout: float) -> Any:
    """A client of the master's rendezvous store; a clear error when its port cannot be reached."""
    return _store(
        host,
        port,
        timeout,
        False,
        f"cannot reach the master's rendezvous store at {host}:{port}",
        f"open that port on the master's firewall (e.g. `sudo ufw allow {port}/tcp`) or pick another with "
        "--collective-port",
    )


def serve_store(host: str, port: int, timeout: float) -> Any:
    """The master's rendezvous store, listening on ``host:port`` (0: any free port; ``.port`` says which)."""
    return _store(
        host,
        port,
        timeout,
        True,
        f"cannot listen for the rendezvous store on {host}:{port}",
        "pick a free port with --collective-port",
    )


def _store(host: str, port: int, timeout: float, serve: bool, what: str, fix: str) -> Any:
    import torch.distributed as dist

    try:
        return dist.TCPStore(
            host, port, is_master=serve, timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False
        )
    except (RuntimeError, OSError) as exc:
        raise ConfigError(f"{what} ({_first_line(exc)[:160]}): {fix}") from None


@dataclass
class Group:
    """One membership epoch's process group, as this member sees it."""

    epoch: int
    rank: int
    size: int
    pg: Any  # torch's ProcessGroupGloo / ProcessGroupNCCL
    bound: str  # the address it bound to, and how it was chosen

    def abandon(self) -> None:
        """Stop using it. NCCL aborts its communicator (a collective blocked in it fails now); gloo
        has no abort (torch's does nothing there): its collectives end at their timeout, on their own
        threads, and nobody waits for them."""
        try:
            self.pg.abort()
        except Exception:  # noqa: BLE001 - best effort; its collectives still time out
            pass


def open_group(
    store: Any, backend: str, epoch: int, rank: int, size: int, local_addr: str, timeout: float, node: str
) -> Group:
    """Join membership epoch ``epoch``'s group (blocks until all ``size`` members have joined, at most
    ``timeout`` s). ``node`` names this member in errors."""
    import torch.distributed as dist

    try:
        addr, how = bind_address(backend, local_addr)
    except ConfigError as exc:
        raise ConfigError(f"{node}: {exc}") from None
    prefixed = dist.PrefixStore(f"hetero_ps/{epoch}", store)
    delta = datetime.timedelta(seconds=timeout)
    try:
        prefixed.set(f"{BOUND_KEY}/{rank}", f"{node} at {addr} ({how})")  # for the others' error messages
        if backend == "nccl":
            # A failed or timed-out collective raises in wait() (the step is redone) instead of its
            # watchdog tearing the process down (torch's default): the master is in every group.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            pg: Any = dist.ProcessGroupNCCL(prefixed, rank, size, delta)  # type: ignore[arg-type]  # (its timeout overload)
        else:
            pg = dist.ProcessGroupGloo(prefixed, rank, size, delta)
    except (RuntimeError, OSError, ValueError) as exc:
        raise CollectiveError(
            f"{node}: could not join group {epoch} ({size} members) from {addr} ({how}) within {timeout:.0f} s: "
            f"{_first_line(exc)}. Its members: {'; '.join(_bindings(prefixed, size))}. Check that every node's "
            f"{IFNAME_VARS[backend]} names an interface the others can reach, and that their firewalls let them "
            "connect to each other"
        ) from None
    return Group(epoch, rank, size, pg, f"{addr} ({how})")


def _bindings(store: Any, size: int) -> list[str]:
    """Where each member of a group said it binds (what a failed join's message names)."""
    out = []
    for r in range(size):
        key = f"{BOUND_KEY}/{r}"
        try:
            out.append(store.get(key).decode() if store.check([key]) else f"rank {r} had not arrived")
        except (RuntimeError, OSError):
            out.append(f"rank {r}: unknown (the store did not answer)")
    return out


def allreduce_sum(group: Group, chunks: Sequence[torch.Tensor], timeout: float, node: str) -> None:
    """Sum each tensor of ``chunks`` (the job's chunks, in chunk order) over the group, in place.
    Every member launches them in *descending* chunk order, the order backward finishes them (a
    worker launches each as soon as it is final: ``worker/collective_step.py``)."""
    try:
        works = [group.pg.allreduce([c]) for c in reversed(chunks)]
        for w in works:
            w.wait(datetime.timedelta(seconds=timeout))
    except (RuntimeError, OSError) as exc:
        raise failure(group, node, exc) from None


def failure(group: Group, node: str, exc: BaseException) -> CollectiveError:
    """What failed, where: ``node``'s all-reduce in ``group``, and torch's reason."""
    return CollectiveError(
        f"{node}: all-reduce in group {group.epoch} (rank {group.rank} of {group.size}, bound to {group.bound}) "
        f"failed: {_first_line(exc)}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
