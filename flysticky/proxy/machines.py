"""Local "machines": one real process each, with the environment Fly gives a machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


class MachineError(RuntimeError):
    """A machine that could not be started; the message says what it printed."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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
    process: asyncio.subprocess.Process | None = None
    state: str = "created"  # created | starting | started | stopped | destroyed
    counters: Counters = field(default_factory=Counters)
    output: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    _pump: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return (
            self.state == "started" and self.process is not None and self.process.returncode is None
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class Fleet:
    """Starts, kills, restarts and adds machines running one command."""

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
    ) -> None:
        if not command:
            raise MachineError("no command to run on the machines")
        self.command = list(command)
        self.app_name = app_name
        self.regions = list(regions)
        self.cwd = cwd
        self.env = dict(env or {})
        self.echo = echo
        self.ready_timeout = ready_timeout
        self.machines: list[Machine] = []

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
                "FLY_PRIVATE_IP": "127.0.0.1",
                "FLY_PUBLIC_IP": "127.0.0.1",
                "FLY_IMAGE_REF": f"registry.fly.io/{self.app_name}:local",
                "FLY_MACHINE_VERSION": "local",
                "FLY_PROCESS_GROUP": "app",
                "FLY_VM_MEMORY_MB": "256",
                "PRIMARY_REGION": self.regions[0],
                "PORT": str(machine.port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _argv(self, machine: Machine) -> list[str]:
        values = {
            "{port}": str(machine.port),
            "{machine_id}": machine.id,
            "{region}": machine.region,
        }
        return [values.get(arg, arg) for arg in self.command]

    async def add(self, region: str | None = None) -> Machine:
        index = len(self.machines)
        machine = Machine(
            new_machine_id(), region or self.regions[index % len(self.regions)], free_port()
        )
        self.machines.append(machine)
        await self.start(machine)
        return machine

    async def start(self, machine: Machine) -> None:
        if machine.alive:
            return
        machine.port = free_port()
        try:
            machine.process = await asyncio.create_subprocess_exec(
                *self._argv(machine),
                cwd=self.cwd,
                env=self._environment(machine),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own group: stopping it stops its children
            )
        except OSError as error:
            machine.state = "stopped"
            raise MachineError(f"cannot run {self.command[0]!r}: {error.strerror}") from None
        machine.state = "starting"  # not given traffic until it listens
        machine._pump = asyncio.create_task(self._read_output(machine))
        await self._wait_ready(machine)
        machine.state = "started"

    async def _read_output(self, machine: Machine) -> None:
        process = machine.process
        assert process is not None and process.stdout is not None
        while line := await process.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            machine.output.append(text)
            if self.echo:
                print(f"[{machine.id} {machine.region}] {text}", file=sys.stderr, flush=True)

    async def _wait_ready(self, machine: Machine) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        process = machine.process
        assert process is not None
        while loop.time() < deadline:
            if process.returncode is not None:
                await asyncio.sleep(0.1)  # let the last output arrive
                machine.state = "stopped"
                raise MachineError(
                    f"machine {machine.id} exited with code {process.returncode} before "
                    f"listening on port {machine.port}; it printed:\n" + self.tail(machine)
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", machine.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        await self.stop(machine)
        raise MachineError(
            f"machine {machine.id} did not listen on port {machine.port} within "
            f"{self.ready_timeout:.0f}s; it printed:\n" + self.tail(machine)
        )

    def tail(self, machine: Machine, lines: int = 15) -> str:
        return "\n".join(list(machine.output)[-lines:]) or "(nothing)"

    async def stop(self, machine: Machine, *, hard: bool = False) -> None:
        """Stop the machine's process group: SIGTERM (or SIGKILL when ``hard``), then wait."""
        process = machine.process
        if machine.state in ("starting", "started"):
            machine.state = "stopped"
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL if hard else signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        if machine._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(machine._pump, 2)

    async def kill(self, machine: Machine) -> None:
        """A crash: SIGKILL, memory gone, id kept (``restart`` brings it back)."""
        await self.stop(machine, hard=True)

    async def restart(self, machine: Machine) -> None:
        await self.stop(machine)
        await self.start(machine)

    async def destroy(self, machine: Machine) -> None:
        await self.stop(machine, hard=True)
        machine.state = "destroyed"

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(m) for m in self.machines), return_exceptions=True)
