"""Local "machines": one real process group each, with the environment Fly gives a machine.

States as Fly has them (shared/fly-platform.md, "Machine states"): ``started``;
``stopped`` (process gone, memory lost); ``suspended`` (process group frozen with SIGSTOP,
memory kept, SIGCONT resumes it); ``crashed`` (the process exited without being asked,
or was killed: to Fly a stopped machine, started again when a request is aimed at it);
``destroyed`` (gone for good). ``starting``/``stopping`` are the moments in between.

Private network (shared/fly-platform.md, "Private network (6PN)"): on Fly every machine has
its own address and the app listens on the same port (``internal_port``) on each. Here
machine n gets 127.0.0.(n+2), a loopback address of its own (on Linux all of 127.0.0.0/8
is this computer), and every machine listens there on one port shared by the fleet; its
private address is that address IPv4-mapped (``::ffff:127.0.0.2``), which reaches the
IPv4 listener. Where 127.0.0.2 is not a local address (macOS without ``ifconfig lo0
alias``), machines cannot share a port: each listens on 127.0.0.1 on a port of its own,
and its private address (still in the internal DNS) reaches nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from ..regions import region_problem
from .flytoml import Metrics
from .routing import MachineFacts, State

#: Fly's defaults for a machine stop: kill_signal SIGINT, kill_timeout 5 s, then SIGKILL.
KILL_SIGNAL = signal.SIGINT
KILL_TIMEOUT = 5.0
#: Longest output line kept whole; longer ones are cut (the reader never stops reading,
#: so a machine never blocks on a full pipe).
MAX_LINE = 64 * 1024
_PR_SET_PDEATHSIG = 1
#: Machines (not destroyed) a fleet runs at most: each is a process on this computer.
MAX_MACHINES = 32
#: The first machine's private address; the next machines count up from it.
FIRST_PRIVATE_ADDRESS = IPv4Address("127.0.0.2")

_log = logging.getLogger(__name__)
#: Machines share one port on addresses of their own, as on Fly: an app that listens on
#: 127.0.0.1 or 0.0.0.0 whatever $HOST says takes the port from the others.
_HOST_HINT = (
    " (an app must listen on $HOST, or {host} in its command; for one that cannot: "
    "--port-per-machine)"
)


class MachineError(RuntimeError):
    """A machine that could not be started or changed; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def own_loopback_addresses() -> bool:
    """Whether a machine can listen on a loopback address of its own (127.0.0.2 ...)."""
    try:
        with socket.socket() as sock:
            sock.bind((str(FIRST_PRIVATE_ADDRESS), 0))
    except OSError:
        return False
    return True


def mapped(address: IPv4Address) -> IPv6Address:
    """The IPv4-mapped IPv6 address (``::ffff:127.0.0.2``): an AAAA record can hold it, and
    a client connecting to it reaches the IPv4 listener."""
    return IPv6Address(f"::ffff:{address}")


def address_text(address: IPv6Address) -> str:
    """``::ffff:127.0.0.2``, as Python 3.13 writes it; before, ``::ffff:7f00:2``."""
    if address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def new_machine_id() -> str:
    """14 lowercase hex digits, as Fly's machine ids are."""
    return secrets.token_hex(7)


@dataclass
class Counters:
    requests: int = 0  # delivered to this machine
    served: int = 0  # final answers it gave the client
    replays: int = 0  # fly-replay answers it issued
    cache_hits: int = 0  # requests the replay cache routed straight to it
    errors: int = 0  # connection failures, timeouts, 5xx

    def add(self, other: Counters) -> None:
        for name in ("requests", "served", "replays", "cache_hits", "errors"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Machine:
    id: str
    region: str
    port: int
    host: str = "127.0.0.1"  # where it listens: $HOST
    private_ip: IPv6Address = field(default_factory=lambda: mapped(IPv4Address("127.0.0.1")))
    #: Where its metrics are scraped, when the fleet has ``[metrics]``: fly.toml's port on
    #: its own address, or (no private network) a port of its own.
    metrics_port: int | None = None
    process: asyncio.subprocess.Process | None = None
    state: State = "stopped"
    counters: Counters = field(default_factory=Counters)
    output: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    in_flight: int = 0  # requests and websockets the proxy has open to it
    last_active: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one lifecycle change at a time
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def alive(self) -> bool:
        return (
            self.state == "started" and self.process is not None and self.process.returncode is None
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def facts(self) -> MachineFacts:
        # A process that died since the watcher last ran is crashed already.
        state: State = "crashed" if self.state == "started" and not self.alive else self.state
        return MachineFacts(self.id, self.region, state)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Counts a request or websocket as in flight, for autostop's idle clock."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self.last_active = time.monotonic()


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec function: the kernel SIGKILLs the machine if the proxy dies, even by
    SIGKILL (Linux's PR_SET_PDEATHSIG); elsewhere, None."""
    if not sys.platform.startswith("linux"):
        return None

    def arrange() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the proxy died before prctl took effect
            os._exit(1)

    return arrange


def _frozen(pid: int) -> bool:
    """The process is stopped by a signal (Linux's /proc says T); elsewhere, assumed."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def _signal_group(process: asyncio.subprocess.Process, sig: int) -> None:
    # start_new_session made the machine a group leader: its pid is the group's id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


class Fleet:
    """Starts, stops, suspends, crashes, destroys and adds machines running one command."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        app_name: str = "flysticky-local",
        regions: Sequence[str] = ("iad",),
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        echo: bool = False,
        ready_timeout: float = 30.0,
        kill_timeout: float = KILL_TIMEOUT,
        private_network: bool | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not command:
            raise MachineError("no command to run on the machines")
        for region in regions:
            problem = region_problem(region)
            if problem is not None:
                raise ValueError(problem)
        self.command = list(command)
        self.app_name = app_name
        self.regions = list(regions)
        self.cwd = cwd
        self.env = dict(env or {})
        #: fly.toml's ``[metrics]``: each machine is told where to serve them.
        self.metrics = metrics
        self.echo = echo
        self.ready_timeout = ready_timeout
        self.kill_timeout = kill_timeout
        self.machines: list[Machine] = []
        #: The internal DNS ("127.0.0.1:port") the machines are told to ask, in
        #: FLYSTICKY_RESOLVER; the Emulator sets it before it adds machines.
        self.resolver: str | None = None
        #: None: a private network wherever this computer has the loopback addresses.
        self.private_network = (
            own_loopback_addresses() if private_network is None else private_network
        )
        #: The port every machine listens on (Fly's internal_port), chosen when the first
        #: machine is added; None without a private network (a port per machine then).
        self.internal_port: int | None = None
        self._addresses = (FIRST_PRIVATE_ADDRESS + n for n in itertools.count())
        if private_network is None and not self.private_network:
            _log.warning(
                "private network: %s is not a local address here (macOS: sudo ifconfig lo0 "
                "alias %s), so machines listen on 127.0.0.1 on a port each and their "
                ".internal addresses reach nothing; the internal DNS still answers",
                FIRST_PRIVATE_ADDRESS,
                FIRST_PRIVATE_ADDRESS,
            )

    @property
    def primary_region(self) -> str:
        return self.regions[0]

    def live(self) -> list[Machine]:
        return [m for m in self.machines if m.alive]

    def get(self, machine_id: str) -> Machine | None:
        for machine in self.machines:
            if machine.id == machine_id and machine.state != "destroyed":
                return machine
        return None

    def _environment(self, machine: Machine) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLY_")}
        env.update(self.env)
        env.update(
            {
                "FLY_MACHINE_ID": machine.id,
                "FLY_ALLOC_ID": machine.id,
                "FLY_REGION": machine.region,
                "FLY_APP_NAME": self.app_name,
                "FLY_PRIVATE_IP": address_text(machine.private_ip),
                "FLY_PUBLIC_IP": "127.0.0.1",
                "FLY_IMAGE_REF": f"registry.fly.io/{self.app_name}:local",
                "FLY_MACHINE_VERSION": "local",
                "FLY_PROCESS_GROUP": "app",
                "FLY_VM_MEMORY_MB": "256",
                "PRIMARY_REGION": self.primary_region,
                "PORT": str(machine.port),
                # Not a Fly variable: apps that read HOST (the template's do) then listen
                # on the machine's own loopback address, not on every interface of the
                # laptop, where one port cannot serve every machine.
                "HOST": machine.host,
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.resolver is not None:
            env["FLYSTICKY_RESOLVER"] = self.resolver
        if machine.metrics_port is not None:
            # Not Fly variables: flysticky's metrics endpoint listens where $HOST does, as
            # the app does, and (no private network) on a port of its own.
            env["FLYSTICKY_METRICS_HOST"] = machine.host
            if self.metrics is not None and machine.metrics_port != self.metrics.port:
                env["FLYSTICKY_METRICS_PORT"] = str(machine.metrics_port)
        return env

    def _argv(self, machine: Machine) -> list[str]:
        values = {
            "{host}": machine.host,
            "{port}": str(machine.port),
            "{machine_id}": machine.id,
            "{region}": machine.region,
        }
        return [values.get(arg, arg) for arg in self.command]

    # ------------------------------------------------------------------ lifecycle
    async def add(self, region: str | None = None) -> Machine:
        """A new machine, started; a bad region, or a fleet at MAX_MACHINES, is a
        ValueError and adds nothing."""
        region = region or self.regions[len(self.machines) % len(self.regions)]
        problem = region_problem(region)
        if problem is not None:
            raise ValueError(problem)
        if sum(m.state != "destroyed" for m in self.machines) >= MAX_MACHINES:
            raise ValueError(
                f"machines: at most {MAX_MACHINES} at once (the emulator's cap); destroy one first"
            )
        address = next(self._addresses)
        if self.private_network:
            if self.internal_port is None:
                self.internal_port = free_port(str(address))
            machine = Machine(
                new_machine_id(), region, self.internal_port, str(address), mapped(address)
            )
            if self.metrics is not None:
                machine.metrics_port = self.metrics.port
        else:
            machine = Machine(new_machine_id(), region, free_port(), private_ip=mapped(address))
            if self.metrics is not None:
                machine.metrics_port = free_port()
        self.machines.append(machine)
        try:
            await self.start(machine)
        except BaseException:
            self.machines.remove(machine)
            raise
        return machine

    async def start(self, machine: Machine) -> None:
        """Start a stopped or crashed machine, resume a suspended one; a started one stays."""
        async with machine.lock:
            if machine.state == "destroyed":
                raise MachineError(f"machine {machine.id} is destroyed")
            if machine.alive:
                return
            process = machine.process
            if machine.state == "suspended" and process is not None and process.returncode is None:
                _signal_group(process, signal.SIGCONT)
                machine.state = "started"
                return
            await self._end(machine, signal.SIGKILL)
            await self._spawn(machine)

    async def stop(self, machine: Machine) -> None:
        """``fly machine stop``: kill_signal, then SIGKILL after kill_timeout; memory lost."""
        async with machine.lock:
            if machine.state != "destroyed":
                await self._end(machine, KILL_SIGNAL)
                machine.state = "stopped"

    async def suspend(self, machine: Machine) -> None:
        """Autostop's "suspend": the process group is frozen, memory and sockets kept."""
        async with machine.lock:
            if not machine.alive or machine.process is None:
                raise MachineError(
                    f"machine {machine.id} is {machine.facts().state}: only a started "
                    "machine can be suspended"
                )
            _signal_group(machine.process, signal.SIGSTOP)
            for _ in range(100):  # the signal is delivered asynchronously
                if _frozen(machine.process.pid):
                    break
                await asyncio.sleep(0.01)
            machine.state = "suspended"

    async def kill(self, machine: Machine) -> None:
        """A crash: SIGKILL to the machine and its children, memory gone, id kept."""
        async with machine.lock:
            if machine.state != "destroyed":
                await self._end(machine, signal.SIGKILL)
                machine.state = "crashed"

    async def restart(self, machine: Machine) -> None:
        async with machine.lock:
            if machine.state == "destroyed":
                raise MachineError(f"machine {machine.id} is destroyed")
            await self._end(machine, KILL_SIGNAL)
            await self._spawn(machine)

    async def destroy(self, machine: Machine) -> None:
        async with machine.lock:
            await self._end(machine, signal.SIGKILL)
            machine.state = "destroyed"

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(m) for m in self.machines), return_exceptions=True)

    # ------------------------------------------------------------------ processes
    async def _spawn(self, machine: Machine) -> None:
        if not self.private_network:
            machine.port = free_port()
        machine.state = "starting"  # not given traffic until it listens
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv(machine),
                cwd=self.cwd,
                env=self._environment(machine),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own group: stopping it stops its children
                preexec_fn=_die_with_parent(os.getpid()),
            )
        except OSError as error:
            machine.state = "crashed"
            raise MachineError(f"cannot run {self.command[0]!r}: {error.strerror}") from None
        machine.process = process
        self._track(machine, self._read_output(machine, process))
        try:
            await self._wait_ready(machine, process)
        except BaseException:
            # Cancelled (Ctrl-C during start-up) or never came up: nothing may outlive it.
            await self._end(machine, signal.SIGKILL)
            machine.state = "crashed"
            raise
        machine.state = "started"
        machine.last_active = time.monotonic()
        self._track(machine, self._watch(machine, process))

    def _track(self, machine: Machine, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        machine._tasks.add(task)
        task.add_done_callback(machine._tasks.discard)

    async def _watch(self, machine: Machine, process: asyncio.subprocess.Process) -> None:
        # returncode, not wait(): wait() also waits for the output pipe, which a child
        # that outlived its parent still holds open.
        while process.returncode is None:
            await asyncio.sleep(0.05)
        if machine.process is process and machine.state in ("started", "suspended"):
            machine.state = "crashed"
            _signal_group(process, signal.SIGKILL)  # its children go with it

    async def _end(self, machine: Machine, sig: int) -> None:
        """Signal the machine's process group, wait up to kill_timeout, then SIGKILL it."""
        process = machine.process
        if process is None:
            return
        machine.state = "stopping"
        if process.returncode is None:
            _signal_group(process, sig)
            _signal_group(process, signal.SIGCONT)  # a suspended group must run to exit
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.kill_timeout
            while process.returncode is None and loop.time() < deadline:
                await asyncio.sleep(0.02)
        _signal_group(process, signal.SIGKILL)  # the group: children that outlived it too
        with contextlib.suppress(TimeoutError):
            # Reaps it; a child that left the group may keep the output pipe open.
            await asyncio.wait_for(asyncio.shield(process.wait()), 2)

    async def _read_output(self, machine: Machine, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        pending = b""
        while chunk := await process.stdout.read(MAX_LINE):
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > MAX_LINE:
                lines.append(pending[:MAX_LINE] + b" [line cut at 64 KiB]")
                pending = b""
            for line in lines:
                self._print(machine, line.decode(errors="replace").rstrip())
        if pending:
            self._print(machine, pending.decode(errors="replace").rstrip())

    def _print(self, machine: Machine, text: str) -> None:
        machine.output.append(text)
        if self.echo:
            print(f"[{machine.id} {machine.region}] {text}", file=sys.stderr, flush=True)

    async def _wait_ready(self, machine: Machine, process: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        while loop.time() < deadline:
            if process.returncode is not None:
                await asyncio.sleep(0.1)  # let the last output arrive
                raise MachineError(
                    f"machine {machine.id} exited with code {process.returncode} before "
                    f"listening on {machine.host}:{machine.port} ($HOST:$PORT){_HOST_HINT}; "
                    "it printed:\n" + self.tail(machine)
                )
            try:
                _, writer = await asyncio.open_connection(machine.host, machine.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        raise MachineError(
            f"machine {machine.id} did not listen on {machine.host}:{machine.port} "
            f"($HOST:$PORT){_HOST_HINT} within "
            f"{self.ready_timeout:.0f}s; it printed:\n" + self.tail(machine)
        )

    def tail(self, machine: Machine, lines: int = 15) -> str:
        return "\n".join(list(machine.output)[-lines:]) or "(nothing)"
