"""The notebook runs' kernel client polls in slices (forgelib.kernels): a reply is read as soon as it is there, the
total timeout still holds, and papermill is given that client."""
import asyncio
import threading
import time
from queue import Empty

import pytest
import zmq
import zmq.asyncio
from jupyter_client.session import Session

from forgelib.kernels import POLL_SLICE_S, SlicedChannel, SlicedClient, SlicedKernelManager


@pytest.fixture
def pair():
    sync, aio = zmq.Context(), zmq.asyncio.Context()
    sender = sync.socket(zmq.PAIR)
    port = sender.bind_to_random_port("tcp://127.0.0.1")
    receiver = aio.socket(zmq.PAIR)
    receiver.connect(f"tcp://127.0.0.1:{port}")
    yield sender, receiver
    sender.close(0)
    receiver.close(0)


def test_a_message_sent_during_a_long_wait_is_read_at_once_and_the_timeout_still_holds(pair):
    sender, receiver = pair
    session = Session()
    channel = SlicedChannel(receiver, session)

    async def scenario():
        started = time.monotonic()
        with pytest.raises(Empty):
            await channel.get_msg(timeout=0.3)  # nothing comes: Empty after the whole timeout, not a slice
        waited = time.monotonic() - started
        timer = threading.Timer(POLL_SLICE_S * 1.5, lambda: session.send(sender, "status",
                                                                        {"execution_state": "idle"}))
        timer.start()
        started = time.monotonic()
        msg = await channel.get_msg(timeout=60)  # a long wait, across slices
        return waited, time.monotonic() - started, msg

    waited, took, msg = asyncio.run(scenario())
    assert 0.25 <= waited < 0.3 + POLL_SLICE_S
    assert msg["header"]["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
    assert POLL_SLICE_S * 1.4 <= took < POLL_SLICE_S * 1.5 + 2.0  # one slice after the send (+ a loaded machine)


def test_papermill_runs_get_the_sliced_client(tmp_path, monkeypatch):
    """A real notebook run (forgelib.notebooks.execute) reads the kernel's replies through SlicedChannel."""
    import nbformat

    from forgelib import notebooks

    assert SlicedKernelManager(kernel_name="python3").client_factory is SlicedClient
    assert SlicedClient.shell_channel_class.default_value is SlicedChannel
    calls = []
    real = SlicedChannel.get_msg

    async def counted(self, timeout=None):
        calls.append(timeout)
        return await real(self, timeout)

    monkeypatch.setattr(SlicedChannel, "get_msg", counted)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 6 * 7\nprint(x)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = tmp_path / "tiny.ipynb"
    nbformat.write(nb, source)
    out = notebooks.execute(source, tmp_path / "out.ipynb", cwd=tmp_path)
    assert "42" in "".join(o.get("text", "") for o in nbformat.read(out, 4).cells[0].outputs)
    assert calls, "the run read its replies through SlicedChannel"
