"""`kvrelay engine`: the reference engine's OpenAI-compatible HTTP server (aiohttp, 127.0.0.1).

Routes: POST /v1/completions, POST /v1/chat/completions (both with ``stream``: SSE), GET /v1/models,
/metrics, /healthz, /readyz.  Roles (``--role``): ``colocated`` (no kvrelay), ``prefill`` (every request
computes its prompt, publishes its KV layer by layer and answers with the first token and
``kv_transfer_params``), ``decode`` (a request carrying ``kv_transfer_params`` pulls its prompt's KV;
one without is computed locally).  Owns: HTTP, argument parsing, process wiring.  Must not touch: the
engine's internals (it talks to it through `Engine.add`/`abort` and token callbacks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

import msgspec
from aiohttp import web

from kvrelay import security
from kvrelay.security import params as signed_params
from kvrelay.security.http import protect
from kvrelay.connector import PublishPhase, transfer_params
from kvrelay.engines.reference import api, register
from kvrelay.engines.reference.config import FAILURE_POLICIES, ROLES, EngineConfig, ModelConfig
from kvrelay.engines.reference.engine import Engine
from kvrelay.engines.reference.loader import load_model
from kvrelay.engines.reference.sequence import Sequence
from kvrelay.params import KVTransferParams
from kvrelay.security import check_loopback
from kvrelay.serving import serve_until_signal
from kvrelay.tokenizer import Tokenizer

log = logging.getLogger("kvrelay.engine")


class EngineServer:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str) -> None:
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.app = web.Application(client_max_size=64 << 20)
        self.keys = security.current()
        protect(self.app, self.keys)  # with keys: Authorization: Bearer <token> on all but /healthz, /readyz
        self.app.add_routes([
            web.post("/v1/completions", self.completions), web.post("/v1/chat/completions", self.chat),
            web.get("/v1/models", self.models), web.get("/metrics", self.metrics),
            web.get("/healthz", self.healthz), web.get("/readyz", self.readyz),
        ])

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "owned_by": "kvrelay", "root": self.model_name,
             "max_model_len": self.engine.cfg.max_model_len, "role": self.engine.cfg.role,
             "compat_hash": self.engine.compat_hash}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.engine.metrics.render(), content_type="text/plain")

    async def healthz(self, request: web.Request) -> web.Response:
        alive = self.engine._thread is not None and self.engine._thread.is_alive()
        return web.json_response({"status": "ok" if alive else "dead"}, status=200 if alive else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        ok = self.engine.ready.is_set()
        return web.json_response({"ready": ok, "role": self.engine.cfg.role}, status=200 if ok else 503)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        model = body.get("model") if isinstance(body, dict) else None
        if model not in (None, self.model_name):
            return _error(404, f"model {model!r} is not served here; this server serves {self.model_name!r}")
        if self.keys is not None and isinstance(body, dict) and "kv_transfer_params" in body:
            try:  # only the router may set them, signed for this request (kvrelay/security/params.py)
                body = {**body, "kv_transfer_params": signed_params.verify(
                    self.keys, body["kv_transfer_params"], str(body.get("request_id") or ""), request.remote or "")}
            except signed_params.ParamsRefused as exc:
                return _error(403, str(exc))
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        try:
            req = api.parse(body, self.tok, chat)
            prefix = False
            if req.kv_params is None and api.wants_remote_prefill(body):
                req.kv_params = self._remote_prefill_params(req, body)
            elif req.kv_params is None and (hint := api.prefix_hint(body)) is not None:
                req.kv_params = self._prefix_params(req, *hint)
                prefix = req.kv_params is not None
            seq = Sequence(req.prompt, req.params, request_id=req.request_id, kv_params=req.kv_params,
                           prefix_load=prefix, cache_salt=req.cache_salt, publish=self.engine.cfg.role == "prefill",
                           on_token=lambda s, t, fin: _put_threadsafe(loop, q, (t, fin)))
            self.engine.add(seq)
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        try:
            if req.stream:
                try:
                    return await self._stream(request, req, seq, q)
                except ConnectionResetError:  # the client went away mid-stream
                    self.engine.abort(seq.request_id)
                    raise
            tokens: list[int] = []
            while True:
                tok, fin = await q.get()
                if tok >= 0:
                    tokens.append(tok)
                if fin:
                    break
            if seq.error:
                return _error(500 if seq.error != "aborted" else 499, seq.error)
            return web.json_response(api.response(req, self.model_name, self.tok.decode(tokens), tokens,
                                                  seq.finish_reason, len(req.prompt), self._extra(seq)))
        except asyncio.CancelledError:
            self.engine.abort(seq.request_id)  # the client went away
            raise

    async def _stream(self, request: web.Request, req: api.ParsedRequest, seq: Sequence,
                      q: asyncio.Queue) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        tokens: list[int] = []
        sent = ""
        while True:
            tok, fin = await q.get()
            if seq.error:
                await resp.write(b"data: " + json.dumps({"error": {"message": seq.error}}).encode() + b"\n\n")
                break
            if tok >= 0:
                tokens.append(tok)
            text = self.tok.decode(tokens)
            delta = text[len(sent):] if not text.endswith("\ufffd") or fin else ""
            sent += delta
            chunk = api.stream_chunk(req, self.model_name, delta, [tok] if tok >= 0 else [],
                                     seq.finish_reason if fin else None, self._extra(seq) if fin else None)
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if fin:
                break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _remote_prefill_params(self, req: api.ParsedRequest, body: dict) -> KVTransferParams:
        """Decode leg sent at the same time as its prefill leg (``kv_transfer_params:
        {"do_remote_prefill": true}`` and the prefill's ``request_id``): derive the chunk addresses
        from this engine's own tokenization, model and layout, the same way the prefill publishes them,
        and pull the first token from the store."""
        puller = self.engine.puller
        if self.engine.cfg.role != "decode" or puller is None:
            raise ValueError("do_remote_prefill needs a decode worker (--role decode with --store)")
        layout = self.engine.layout
        # the store the prefill publishes into, when the router named it (a store per host); else this engine's
        store = api.remote_store(body) or puller.store_address
        puller.check_store(store)  # a store it does not know: refused here (400), not pulled from
        return transfer_params(req.prompt, req.request_id, self.engine.model_cfg.model_id, self.engine.compat_hash,
                               self.engine.cfg.chunk_tokens, layout.num_layers, layout.head_start, layout.head_end,
                               store, puller.transport, cache_salt=req.cache_salt)

    def _prefix_params(self, req: api.ParsedRequest, store: str, tokens: int) -> KVTransferParams | None:
        """A router's hint that ``store`` ("": this engine's own) holds the prompt's first ``tokens``: the params of
        the whole chunks among them (never the last prompt token: its logits are computed here), or None where
        nothing is to be loaded (no puller, or less than a chunk)."""
        puller = self.engine.puller
        if self.engine.cfg.role != "decode" or puller is None:
            return None  # a colocated or prefill engine computes it (the hint is only a saving)
        store = store or puller.store_address
        puller.check_store(store)  # a store it does not know: refused here (400), not pulled from
        chunk = self.engine.cfg.chunk_tokens
        n = min(tokens, len(req.prompt) - 1) // chunk * chunk
        if n <= 0:
            return None
        layout = self.engine.layout
        return transfer_params(req.prompt[:n], req.request_id, self.engine.model_cfg.model_id, self.engine.compat_hash,
                               chunk, layout.num_layers, layout.head_start, layout.head_end, store, puller.transport,
                               cache_salt=req.cache_salt)

    def _extra(self, seq: Sequence) -> dict | None:
        out: dict = {}
        state = seq.publish_state
        if state is not None and state.phase is not PublishPhase.REFUSED:
            out["kv_transfer_params"] = msgspec.to_builtins(state.params)
        if seq.recomputed is not None:
            out["kvrelay"] = {"recomputed": str(seq.recomputed)}
        return out or None


def _put_threadsafe(loop: asyncio.AbstractEventLoop, q: asyncio.Queue, item: tuple[int, bool]) -> None:
    loop.call_soon_threadsafe(q.put_nowait, item)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                        else "server_error", "code": status}}, status=status)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless --keys)")
    p.add_argument("--port", type=int, default=8100, help="HTTP port (0 picks a free one)")
    p.add_argument("--ready-file", default="", help="write {port, pid} here once serving")
    p.add_argument("--role", choices=ROLES, default="colocated")
    p.add_argument("--checkpoint", default=None, help="local Llama/Qwen2 safetensors checkpoint directory")
    p.add_argument("--model-id", default=None, help="model name (default: from the checkpoint or config)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (no --checkpoint)")
    p.add_argument("--num-layers", type=int, default=None, help="random model: layers (default 8)")
    p.add_argument("--vocab-size", type=int, default=None, help="random model: vocabulary (default 32000)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--store", default="", help="store control address, e.g. tcp://127.0.0.1:5600 (prefill/decode)")
    p.add_argument("--transport", default="shm", help="data path to the store: shm, tcp, nixl")
    p.add_argument("--peer-store", action="append", default=[], metavar="ADDR",
                   help="decode, a store on every host: another host's store a request may name (its prefill's), "
                        "pulled from over --remote-transport (repeatable); any other store is refused")
    p.add_argument("--remote-transport", default="tcp", help="data path to the --peer-store stores: tcp or nixl")
    p.add_argument("--keep-remote-prefix", action="store_true",
                   help="decode, a store on every host: keep a prefix loaded from another host's store in this "
                        "host's store too (announced in its events; the next load reads it over shm)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per published chunk")
    p.add_argument("--failure-policy", choices=FAILURE_POLICIES, default="recompute")
    p.add_argument("--pull-timeout", type=float, default=30.0, help="decode: deadline (s) for a request's pull")
    p.add_argument("--no-layerwise", action="store_true", help="prefill: publish after the whole forward pass")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--events", default="", metavar="ENDPOINT",
                   help="publish KV events of the paged cache (vLLM's format, medium GPU) on this ZMQ PUB "
                        "endpoint, e.g. tcp://127.0.0.1:0; the addresses go to the ready file")
    p.add_argument("--events-replay", default="", metavar="ENDPOINT", help="their replay socket (default: a free port)")
    p.add_argument("--events-block-size", type=int, default=0,
                   help="event block size: the consumer's, dividing --block-size (default: --block-size)")
    p.add_argument("--log-level", default=os.environ.get("KVRELAY_LOG_LEVEL", "INFO"))
    register.add_arguments(p)
    security.add_argument(p)
    return p


def build_engine(args: argparse.Namespace) -> tuple[Engine, Tokenizer]:
    mcfg = None
    if args.checkpoint is None:
        mcfg = ModelConfig(seed=args.seed)
        if args.num_layers:
            mcfg.num_layers = args.num_layers
        if args.vocab_size:
            mcfg.vocab_size = args.vocab_size
        mcfg.model_id = f"kvrelay-ref-{mcfg.num_layers}l-{mcfg.hidden_size}-v{mcfg.vocab_size}-seed{args.seed}"
        mcfg.__post_init__()
    mcfg, weights, tok = load_model(args.checkpoint, mcfg, args.model_id)
    ecfg = EngineConfig(block_size=args.block_size, num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                        role=args.role, failure_policy=args.failure_policy, pull_timeout_s=args.pull_timeout,
                        chunk_tokens=args.chunk_tokens)
    publisher = puller = None
    if args.role != "colocated":
        if not args.store:
            raise ValueError(f"--role {args.role} needs --store tcp://127.0.0.1:PORT (a running `kvrelay store`)")
        from kvrelay.engines.reference.kv_connector import make_hooks
        publisher, puller = make_hooks(args.role, mcfg, ecfg, args.store, args.transport,
                                       layerwise=not args.no_layerwise, peers=args.peer_store,
                                       remote_transport=args.remote_transport,
                                       keep_copies=args.keep_remote_prefix)
    return Engine(mcfg, ecfg, weights, publisher=publisher, puller=puller), tok


async def _serve(args: argparse.Namespace) -> None:
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    check_loopback(args.host, "engine")
    engine, tok = build_engine(args)
    events = None
    if args.events:  # before the engine thread starts: it is the only caller of the block manager's hooks
        from kvrelay.events.engine import DeviceEvents
        events = engine.blocks.events = DeviceEvents(
            engine.cfg.block_size, engine.compat_hash, block_size=args.events_block_size or None,
            endpoint=args.events, replay_endpoint=args.events_replay or args.events.rsplit(":", 1)[0] + ":0")
    engine.start()
    server = EngineServer(engine, tok, engine.model_cfg.model_id)
    try:
        await serve_until_signal(server.app, args.host, args.port, args.ready_file,
                                 f"kvrelay engine ({args.role}, {engine.model_cfg.model_id})", log,
                                 extra=events.addresses() if events is not None else None,
                                 bound=register.registrar(args, {"model": engine.model_cfg.model_id,
                                                                 "store": args.store, "transport": args.transport}))
    finally:
        engine.stop()
        if events is not None:
            events.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from kvrelay.store.control import StoreError
    try:
        check_args(args)
        asyncio.run(_serve(args))
    except (ValueError, StoreError) as exc:  # bad flags, checkpoint or store: one line, before serving
        print(f"kvrelay engine: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kvrelay engine: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


def check_args(args: argparse.Namespace) -> None:
    """The flags that can be checked before the model is loaded (seconds): ValueError naming the bad one."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is outside 0..65535 (0 picks a free port)")
    register.check(args)
    security.configure(args.keys)
    check_loopback(args.host, "engine")
    if args.role != "colocated":
        from kvrelay.transfer import available_transports, check_store_transport
        usable = available_transports()
        check_store_transport(args.transport, "--transport")
        if usable[args.transport] is not None:
            raise ValueError(f"--transport {args.transport!r} is not usable here: {usable[args.transport]}")
        if args.peer_store:
            if args.remote_transport not in ("tcp", "nixl"):
                raise ValueError(f"--remote-transport {args.remote_transport!r}: another host's store is reached "
                                 f"over tcp or nixl")
            if usable[args.remote_transport] is not None:
                raise ValueError(f"--remote-transport {args.remote_transport!r} is not usable here: "
                                 f"{usable[args.remote_transport]}")
            for peer in args.peer_store:
                if not peer.startswith("tcp://"):
                    raise ValueError(f"--peer-store {peer!r}: give a store's control address, e.g. "
                                     f"tcp://198.18.0.2:5600")


if __name__ == "__main__":
    sys.exit(main())
