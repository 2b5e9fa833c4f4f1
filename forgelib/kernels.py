"""The kernel manager the notebook runs use: its client polls the kernel's replies in short slices.

Twice on a loaded machine a display cell's reply sat unread for the whole 600 s cell timeout (``DISPLAY_CELL_TIMEOUT_S``
in ``forgelib.notebooks``): the kernel had answered at once, and papermill's client read the answer only when its
one long ``poll`` of the shell socket timed out (that last poll found the message ready). jupyter_client's asyncio
channel waits on the socket's descriptor, which signals edges: a wake-up that is missed is not repeated. A new
``poll`` call checks the socket's pending events first, so polling in slices of ``POLL_SLICE_S`` bounds such a stall
to that slice; the total timeout, and ``Empty`` when it passes with nothing, are unchanged.
"""
from __future__ import annotations

import time
from queue import Empty
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from traitlets import DottedObjectName, Type

POLL_SLICE_S = 1.0
"""Longest single wait on a kernel socket (seconds)."""


class SlicedChannel(AsyncZMQSocketChannel):
    """An asyncio kernel channel whose ``get_msg(timeout)`` polls at most ``POLL_SLICE_S`` at a time."""

    async def get_msg(self, timeout: float | None = None) -> dict[str, Any]:  # type: ignore[override]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = POLL_SLICE_S if left is None else min(POLL_SLICE_S, left)
            if await self.socket.poll(int(step * 1000)):
                return await self._recv()
            if deadline is not None and time.monotonic() >= deadline:
                raise Empty


class SlicedClient(AsyncKernelClient):
    """A kernel client whose shell and iopub channels are :class:`SlicedChannel`."""

    shell_channel_class = Type(SlicedChannel)  # type: ignore[assignment]
    iopub_channel_class = Type(SlicedChannel)  # type: ignore[assignment]


class SlicedKernelManager(AsyncKernelManager):
    """papermill's kernel manager with :class:`SlicedClient` as its client."""

    client_class = DottedObjectName("forgelib.kernels.SlicedClient")
    client_factory = Type(SlicedClient, klass=AsyncKernelClient)  # what client() builds (not from client_class)
