"""The one-host plan of `kvrelay up` without a cluster file, generated from its flags.

Everything runs on 127.0.0.1 on ports picked at start-up, so the engines name the store, and the router
the engines, by a `Ref` to their ready files (hostplan.py).  `--engine reference` plans kvrelay's
reference engines, `--engine vllm` vLLM servers with the kvrelay connector, each on its own core, each
publishing vLLM's own KV events on a unix socket in the work dir (``ipc://WORKDIR/NAME.kv``), which the router
follows (``--events URL=PUB,REPLAY``); `--demo` adds a colocated engine (the demo compares against it; the
router does not route to it).

Owns: which processes a single host runs with which flags.  Must not touch: checking the flags (launcher.py
does it before planning), starting anything (launcher.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kvrelay.hostplan import Arg, HostPlan, Join, Launch, Ref, VllmSpec

STORE_ADDRESS = Ref("store", "address")


def local_plan(args: argparse.Namespace, pool_name: str, workdir: Path, keys: list[str]) -> HostPlan:
    """The plan of `kvrelay up` ``args`` (checked): store, engines (and the demo's colocated one), router.
    ``keys``: ``--keys DIR`` for every kvrelay process, or nothing."""
    store: list[Arg] = ["store", *keys, "--port", "0", "--metrics-port", "0", "--pool-size", args.pool_size,
                        "--pool-name", pool_name, "--transports", ",".join(sorted({"shm", args.transport}))]
    ssd_dir = "" if args.ssd_dir == "none" else args.ssd_dir or str(workdir / "ssd")
    if ssd_dir:
        store += ["--ssd-dir", ssd_dir]
    store += ["--events", "tcp://127.0.0.1:0", "--events-block-size", str(args.events_block_size)]
    roles = [(f"prefill{i}", "prefill") for i in range(args.num_prefill)]
    roles += [(f"decode{i}", "decode") for i in range(args.num_decode)]
    roles += [("colocated", "colocated")] if args.demo else []
    engines = _vllm(args, roles, workdir) if args.engine == "vllm" else _reference(args, roles, keys)
    router: list[Arg] = ["router", *keys, "--port", str(0 if args.demo else args.port), "--store", STORE_ADDRESS]
    for name, role in roles:
        if role != "colocated":
            router += [f"--{role}", Ref(name, "url")]
    for name, launch in engines:
        if isinstance(launch, VllmSpec) and launch.kv_events is not None:
            router += ["--events", events_arg(name)]
    return HostPlan([("store", store), *engines, ("router", router)], env={}, store_address=STORE_ADDRESS,
                    remote_store=False, labels=dict(roles), detailed=True)


def _reference(args: argparse.Namespace, roles: list[tuple[str, str]], keys: list[str]) -> list[tuple[str, Launch]]:
    model = ["--checkpoint", args.checkpoint] if args.checkpoint else []
    common: list[Arg] = [*model, *keys, "--port", "0", "--store", STORE_ADDRESS, "--transport", args.transport]
    block_size = {"prefill": args.prefill_block_size or 16, "decode": args.decode_block_size or 32}
    out: list[tuple[str, Launch]] = []
    for name, role in roles:
        if role == "colocated":
            out.append((name, ["engine", "--role", "colocated", *model, *keys, "--port", "0"]))
        else:
            out.append((name, ["engine", "--role", role, *common, "--block-size", str(block_size[role])]))
    return out


def events_arg(name: str) -> Join:
    """The router's ``--events URL=PUB,REPLAY`` of the vLLM server ``name`` of this host (from its ready info)."""
    return Join((Ref(name, "url"), "=", Ref(name, "events"), ",", Ref(name, "events_replay")))


def _vllm(args: argparse.Namespace, roles: list[tuple[str, str]], workdir: Path) -> list[tuple[str, Launch]]:
    """A vLLM server per role, each on its own core (round robin over this process's CPUs) for its OpenMP
    threads, publishing its KV events in the work dir; the colocated one without a connector or events."""
    connector = None if args.vllm_connector.lower() == "none" else args.vllm_connector
    cores = sorted(os.sched_getaffinity(0))
    name = served_name(args.checkpoint)
    out: list[tuple[str, Launch]] = []
    for i, (label, role) in enumerate(roles):
        bs = args.prefill_block_size if role == "prefill" else args.decode_block_size
        # where cores run out, the colocated baseline takes the last one (a decode's: roles list prefills first),
        # not a prefill's: a decode waiting for KV keeps its core busy, and a prefill there would wait with it
        core = cores[-1] if role == "colocated" and i >= len(cores) else cores[i % len(cores)]
        out.append((label, VllmSpec(args.checkpoint, name, bs or 32, args.vllm_kv_cache_gib, core,
                                    None if role == "colocated" else connector, args.transport,
                                    args.vllm_start_timeout,
                                    kv_events=None if role == "colocated" else
                                    f"ipc://{workdir.resolve()}/{label}.kv")))
    return out


def served_name(checkpoint: str) -> str:
    """One model name for every server of the cluster (the router forwards the client's ``model``)."""
    return Path(checkpoint).resolve().name
