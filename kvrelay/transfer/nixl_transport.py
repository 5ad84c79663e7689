"""`nixl`: transport over a NIXL 1.5.1 agent with the UCX backend (DRAM on CPU, VRAM on GPU).

Owns: the NIXL agent of this endpoint (held by `NixlMover`, the transport's data mover: mover.py), memory
registration with it, and the mapping of our descriptors onto NIXL transfer requests.  Agent metadata
travels through our handshake (control_plane.py); NIXL's own listener and ETCD are not used.
Must not touch: the control plane, chunk contents.

Progress: NIXL's Python wrapper runs its progress thread with a 0 us delay, which spins a core even
when idle (on a 2-core host that halves throughput).  We create the agent with the progress thread
and a non-zero delay (``progress_delay_us``, default 1000: an idle agent wakes 1000 times a second
and uses a few percent of a core).  A transfer's completion is read with `check_xfer_state`, which
the waiting thread calls (its handle's ``progress`` driver: checks without sleeping for the first SPIN_S of
a transfer, then with a growing sleep).
Dead peers: the UCX backend runs in ``ucx_error_handling_mode=peer`` so a transfer to a dead peer
errors out instead of hanging, and the endpoint's pidfd watch fails in-flight handles at once.
Exit crash: the UCX bundled with NIXL 1.5.1 loads its InfiniBand modules, whose libnl-route crashes
in its destructor at interpreter exit (SIGSEGV in rtnl_tc_unregister, even after every agent is
gone).  On hosts without InfiniBand devices we set ``UCX_MODULES=^ib`` (unless the user set
UCX_MODULES) before UCX loads, which avoids it.
Device memory (VRAM): NIXL is not stream-ordered: it posts from the host and moves bytes as soon as the
request is posted.  So before posting a transfer whose local side is on a GPU, the caller's current stream
of that GPU is synchronised (an event recorded there, then waited on by the host; cuda_ipc.host_wait_for_stream):
a pack kernel has then written the source of a WRITE, and an unpack still reading the destination of a
READ has finished.  Completion is observed by the host (check_xfer_state), so kernels the caller queues
after `wait()` returns see the bytes.  The peer's side is the peer's business: it must not touch its
region while a transfer into it may run (the same rule as for host memory).
"""

from __future__ import annotations

import os
import threading
import time

import msgspec

from kvrelay.transfer.base import XferState
from kvrelay.transfer.buffers import LocalRegion, buffer_address, byte_view
from kvrelay.transfer.control import PeerConn
from kvrelay.transfer.endpoint import Endpoint
from kvrelay.transfer.handle import Handle
from kvrelay.transfer.mover import DataMover, Transfer

_construct_lock = threading.Lock()
# A waiter checks a young transfer without sleeping for this long: a 4 KiB read over UCX's tcp across a veth
# takes about 100 us, and the handle's generic 50 us spin then 20, 40, 80 us sleeps doubled its round trip
# (`kvrelay bench hosts`: 203 -> 115 us p50 against a bare NIXL pair's 90-100 us); larger transfers then sleep.
SPIN_S = 400e-6
MAX_SLEEP_S = 1e-3


def _avoid_ib_exit_crash() -> None:
    try:
        has_ib = bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        has_ib = False
    if not has_ib:
        os.environ.setdefault("UCX_MODULES", "^ib")


class _RegionMeta(msgspec.Struct, array_like=True):
    address: int
    device_id: int
    mem_type: str  # "DRAM" | "VRAM"


_enc = msgspec.msgpack.Encoder()
_meta_dec = msgspec.msgpack.Decoder(_RegionMeta)


def make_agent(name: str, delay_us: int):
    """A nixl_agent with the UCX progress thread sleeping ``delay_us`` between rounds (not 0)."""
    import types

    _avoid_ib_exit_crash()
    from nixl import _api

    real = _api.nixlBind

    class _Config:
        cfg: object  # nixlBind.nixlAgentConfig, whose attributes are set through this shim

        def __init__(self) -> None:
            object.__setattr__(self, "cfg", real.nixlAgentConfig())

        def __setattr__(self, key: str, value) -> None:
            setattr(self.cfg, key, delay_us if key == "pthrDelay" else value)

    shim = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    shim.nixlAgentConfig = _Config
    shim.nixlAgent = lambda agent_name, config: real.nixlAgent(agent_name, config.cfg)
    conf = _api.nixl_agent_config(enable_prog_thread=delay_us > 0, backends=[],
                                  sync_mode=_api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    with _construct_lock:
        _api.nixlBind = shim
        try:
            return _api.nixl_agent(name, conf)
        finally:
            _api.nixlBind = real


class NixlTransport(Endpoint):
    name = "nixl"

    def __init__(self, agent_name: str, compat_hash: str, host: str = "127.0.0.1", port: int = 0,
                 progress_delay_us: int = 1000, error_handling_mode: str = "peer",
                 backend_options: dict[str, str] | None = None) -> None:
        if progress_delay_us <= 0:
            raise ValueError(f"progress_delay_us must be > 0 (0 makes an idle agent spin a core), "
                             f"got {progress_delay_us}")
        import uuid
        self._nixl_name = f"{agent_name}-{uuid.uuid4().hex[:8]}"
        agent = make_agent(self._nixl_name, progress_delay_us)
        opts = {"ucx_error_handling_mode": error_handling_mode, **(backend_options or {})}
        agent.create_backend("UCX", opts)
        self._nixl = NixlMover(agent)
        super().__init__(agent_name, compat_hash, host, port)

    def _data_mover(self) -> DataMover:
        self._nixl.regions = self._regions
        return self._nixl

    def _agent_meta(self) -> bytes:
        return self._nixl.agent.get_agent_metadata()

    # -- regions ---------------------------------------------------------------------------------
    def _make_region(self, region_id: int, buf) -> LocalRegion:
        device_obj = None
        if getattr(buf, "is_cuda", False):
            if not buf.is_contiguous():
                raise ValueError("cannot register a non-contiguous CUDA tensor: call .contiguous() first")
            address, nbytes, dev, mem = buf.data_ptr(), buf.numel() * buf.element_size(), buf.device.index or 0, "VRAM"
            view, device, device_obj = memoryview(b""), f"cuda:{dev}", buf
        else:
            view = byte_view(buf)
            address, nbytes, dev, mem, device = buffer_address(view), view.nbytes, 0, "DRAM", "cpu"
        if nbytes == 0:
            raise ValueError("cannot register an empty buffer")
        self._nixl.register(region_id, address, nbytes, dev, mem)
        meta = _enc.encode(_RegionMeta(address, dev, mem))
        return LocalRegion(region_id, view, nbytes, device=device, meta=meta, keep=[buf], address=address,
                           device_obj=device_obj)

    def _drop_region(self, region: LocalRegion) -> None:
        self._nixl.deregister(region.region_id)


class NixlMover(DataMover):
    """The NIXL agent: memory registrations with it, peers' agents, and transfers posted to it (a handle's
    driver polls ``check_xfer_state``)."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.regions: dict[int, LocalRegion] = {}  # the endpoint's local regions (read only)
        self._reg: dict[int, object] = {}
        self._closed = False

    def register(self, region_id: int, address: int, nbytes: int, dev: int, mem: str) -> None:
        self._reg[region_id] = self.agent.register_memory([(address, nbytes, dev, "")], mem)

    def deregister(self, region_id: int) -> None:
        reg = self._reg.pop(region_id, None)
        if reg is not None:
            self.agent.deregister_memory(reg)

    # -- peers -----------------------------------------------------------------------------------
    def peer_added(self, conn: PeerConn) -> None:
        name = self.agent.add_remote_agent(conn.peer.info.meta)
        conn.extra["nixl_name"] = name.decode() if isinstance(name, bytes) else name

    def peer_lost(self, conn: PeerConn) -> None:
        name = conn.extra.pop("nixl_name", None)
        if name is not None and not self._closed:
            try:
                self.agent.remove_remote_agent(name)
            except Exception:  # noqa: BLE001 - already gone on NIXL's side
                pass

    # -- transfers -------------------------------------------------------------------------------
    def start(self, xfer: Transfer) -> Handle:
        conn, op = xfer.conn, xfer.op
        local, remote = [], []
        l_mem = r_mem = "DRAM"
        gpus: set[str] = set()
        for d in xfer.descs:
            lr = self.regions[d.local_region]
            rm = _meta_dec.decode(conn.peer.region(d.remote_region).meta)
            l_mem = "VRAM" if lr.device != "cpu" else "DRAM"
            if l_mem == "VRAM":
                gpus.add(lr.device)
            r_mem = rm.mem_type
            local.append((lr.address + d.local_offset, d.length, int(lr.device.split(":")[1]) if ":" in lr.device else 0))
            remote.append((rm.address + d.remote_offset, d.length, rm.device_id))
        agent = self.agent
        try:
            req = agent.initialize_xfer(op.upper(), agent.get_xfer_descs(local, l_mem),
                                        agent.get_xfer_descs(remote, r_mem), conn.extra["nixl_name"])
        except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
            handle = xfer.open()
            handle.fail(f"NIXL could not create the {op} to peer {conn.peer.name!r}: {exc}")
            return handle
        lock = threading.RLock()  # poll() may fail the handle, whose abort frees under the same lock
        released: list[bool] = []

        def free() -> None:
            with lock:
                if released:
                    return
                released.append(True)
            try:
                req.release()
            except Exception:  # noqa: BLE001 - an aborted request NIXL already dropped
                pass

        def poll() -> None:
            with lock:
                if handle.done or released:
                    return
                try:
                    state = agent.check_xfer_state(req)
                except Exception as exc:  # noqa: BLE001 - e.g. nixlRemoteDisconnectError
                    handle.fail(f"NIXL {op} with peer {conn.peer.name!r} failed: {type(exc).__name__}: {exc}")
                    return
            if state == "DONE":
                handle.finish(XferState.DONE)
            elif state == "ERR":
                handle.fail(f"NIXL reported an error for the {op} with peer {conn.peer.name!r} (peer dead or "
                            f"unreachable)")

        backoff = [0.0]

        def progress(t: float) -> None:
            """The waiting thread's driver (Handle.wait; `state` passes 0): check the transfer, and while it is
            younger than SPIN_S check again at once, then sleep between checks, doubling up to MAX_SLEEP_S."""
            poll()
            if handle.done or t <= 0:
                return
            spin_until = handle.started_at + SPIN_S
            while time.monotonic() < spin_until and not handle.done:
                poll()
            if not handle.done:
                backoff[0] = min(MAX_SLEEP_S, max(20e-6, backoff[0] * 2), t)
                time.sleep(backoff[0])

        handle = xfer.open(progress=progress, free=free, abort=lambda state: free())
        handle.set_transferring()
        try:
            if gpus:
                _sync_producers(gpus)
            status = agent.transfer(req)
        except Exception as exc:  # noqa: BLE001 - e.g. nixlRemoteDisconnectError
            handle.fail(f"NIXL could not post the {op} to peer {conn.peer.name!r}: {type(exc).__name__}: {exc}")
            return handle
        if status == "DONE":
            handle.finish(XferState.DONE)
        elif status == "ERR":
            handle.fail(f"NIXL refused to post the {op} to peer {conn.peer.name!r}")
        return handle

    def close(self) -> None:
        self._closed = True
        for reg in self._reg.values():
            try:
                self.agent.deregister_memory(reg)
            except Exception:  # noqa: BLE001
                pass
        self._reg.clear()
        self.agent = None


def _sync_producers(devices: set[str]) -> None:
    """Wait (host side) for the work queued on the caller's current stream of each GPU (see the docstring)."""
    import torch

    from kvrelay.transfer.cuda_ipc import host_wait_for_stream
    for dev in sorted(devices):
        host_wait_for_stream(torch.cuda, torch.device(dev))
