"""`KVRelayConnector`: kvrelay inside vLLM (``KVConnectorBase_V1``), loaded with

    --kv-transfer-config '{"kv_connector": "KVRelayConnector", "kv_connector_module_path": "kvrelay.engines.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"store": "tcp://127.0.0.1:5600"}}'

vLLM builds one instance per process and role: the SCHEDULER instance (EngineCore process) delegates to
`SchedulerSide`, the WORKER instance (each Worker process) to `WorkerSide`; they talk only through the
`StepMeta` the scheduler builds each step.  A hook called on the other role's instance is a bug (in vLLM
or a wrapper such as MultiConnector): it raises `ConnectorRoleError` naming the hook and both roles, as
vLLM's own connectors assert the role, rather than answering a quiet default.  Hooks, by process and
when vLLM calls them:

  scheduler  bind_kv_cache_manager        once: the cache manager whose blocks saves are read from
             get_num_new_matched_tokens   a waiting request: tokens the store provides (async load)
             update_state_after_alloc     its blocks are allocated: remember the load
             build_connector_meta         each step: loads to start, saves (prompts completed this step)
             update_connector_output      the workers' report: loads that failed are not offered again
             request_finished             (delay_free while publishing, kv_transfer_params of a prefill leg)
  worker     register_kv_caches           read the cache layout (CPU or GPU), open the store
             handle_preemptions           wait for the publisher before preempted blocks are reused
             bind_connector_metadata      reserve this step's saves
             start_load_kv                start this step's loads (pulled layer by layer on threads)
             wait_for_layer_load          nothing: loads are asynchronous, their requests wait
             save_kv_layer                hand the layer to the publisher thread; returns at once
             wait_for_save                the publisher settles the step's requests after their last layer
             get_finished                 settled loads; finished requests whose publish settled
             get_block_ids_with_load_errors  blocks of failed loads: vLLM recomputes them
  both       get_kv_connector_stats, shutdown

Owns: the mapping of vLLM's hooks and objects onto SchedulerSide / WorkerSide.  Must not touch: anything
the two sides own.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Callable

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole)

from kvrelay.connector import EngineCache, TransferMetrics
from kvrelay.connector.heads import HeadSlices, default_slices, rank_heads
from kvrelay.engines.vllm.config import ConfigError, RelayConfig
from kvrelay.engines.vllm.layout import cpu_isa, layout_of, ordered_layers
from kvrelay.engines.vllm.meta import StepMeta
from kvrelay.engines.vllm.scheduler import SchedulerSide
from kvrelay.engines.vllm.stats import KVRelayPromMetrics, KVRelayStats
from kvrelay.engines.vllm.worker import WorkerSide
from kvrelay.kernels.layout import KVLayout, Order

log = logging.getLogger("kvrelay.vllm")


def _log_like_vllm() -> None:
    """kvrelay's loggers write where vLLM's do (vLLM configures only its own logger tree)."""
    root = logging.getLogger("kvrelay")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("(kvrelay pid=%(process)d) %(levelname)s %(asctime)s %(name)s: "
                                               "%(message)s", "%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


class KVRelayMetadata(KVConnectorMetadata, StepMeta):
    """The step's `StepMeta`, as the connector metadata vLLM pickles to the workers."""


class ConnectorRoleError(RuntimeError):
    """A hook reached the instance of the role that does not serve it (or before that role is set up)."""


class KVRelayConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _log_like_vllm()
        ktc = vllm_config.kv_transfer_config
        mc, cc = vllm_config.model_config, vllm_config.cache_config
        self.block_size = int(cc.block_size)
        self.cfg = RelayConfig.parse(ktc.kv_role, ktc.kv_connector_extra_config,
                                     str(getattr(ktc, "kv_load_failure_policy", "fail")), str(mc.model),
                                     self.block_size)
        self.num_layers = int(mc.get_num_layers(vllm_config.parallel_config))
        # MLA (DeepSeek-style): one latent vector per token per layer (kv_lora_rank + qk_rope_head_dim, what
        # vLLM's get_head_size answers), no K/V split and no heads: one "head" in the MLA layout
        self.use_mla = bool(getattr(mc, "use_mla", False))
        self.total_kv_heads = 1 if self.use_mla else int(mc.get_total_num_kv_heads())
        self.head_dim = int(mc.get_head_size())
        self.tp_size = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)
        self.heads = _head_slices(self.cfg.head_slices, self.total_kv_heads, self.tp_size, self.use_mla)
        self.cache_dtype = str(cc.cache_dtype)
        self.model_dtype = mc.dtype
        dtype = self.model_dtype if self.cache_dtype == "auto" else _cache_torch_dtype(self.cache_dtype)
        self.compat_hash = KVLayout(num_layers=self.num_layers, num_blocks=1, block_size=self.block_size,
                                    num_kv_heads=self.total_kv_heads, head_dim=self.head_dim, dtype=dtype,
                                    order=Order.MLA if self.use_mla else Order.NHD).compat_hash(self.cfg.model_id)
        self.sched: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self._blocks_of: Callable[[str], list[int]] | None = None  # from bind_kv_cache_manager
        self._layer_index: dict[str, int] = {}
        if role == KVConnectorRole.SCHEDULER:
            self.sched = SchedulerSide(self.cfg, self.compat_hash, self.num_layers, self.total_kv_heads,
                                       self.block_size, lambda: self._client("scheduler"), self.heads.slices)
        log.info("KVRelayConnector %s: role %s, store %s over %s, chunks of %d tokens, TP %d, %d KV heads in %d "
                 "slice(s), compat %s", role.name, self.cfg.role, self.cfg.store, self.cfg.transport,
                 self.cfg.chunk_tokens, self.tp_size, self.total_kv_heads, self.heads.slices, self.compat_hash)

    # ==== roles =================================================================================================
    def _scheduler(self, hook: str) -> SchedulerSide:
        """The scheduler side, for a scheduler-side hook; raises if this is the worker's instance."""
        if self.sched is None:
            raise ConnectorRoleError(f"KVRelayConnector.{hook} is a scheduler-side hook, but it was called on the "
                                     f"{self.role.name} instance (vLLM calls it on the SCHEDULER one only)")
        return self.sched

    def _worker(self, hook: str) -> WorkerSide:
        """The worker side, for a worker-side hook; raises on the scheduler's instance, or on the worker's
        before vLLM registered its KV caches (register_kv_caches comes first)."""
        if self.role != KVConnectorRole.WORKER:
            raise ConnectorRoleError(f"KVRelayConnector.{hook} is a worker-side hook, but it was called on the "
                                     f"{self.role.name} instance (vLLM calls it on the WORKER one only)")
        if self.worker is None:
            raise ConnectorRoleError(f"KVRelayConnector.{hook} was called before register_kv_caches (or after "
                                     f"shutdown): the worker side has no KV caches to move")
        return self.worker

    def _client(self, what: str) -> Any:
        from kvrelay.store.client import StoreClient
        return StoreClient(self.cfg.store, transport=self.cfg.transport, compat_hash=self.compat_hash,
                           name=f"vllm-{what}-{os.getpid()}", timeout=self.cfg.store_timeout_s, staging_bytes=64 << 20)

    def _peer_client(self, address: str) -> Any:
        """A client of another host's store (a store on every host: a decode pulls from its prefill's)."""
        from kvrelay.store.client import StoreClient
        return StoreClient(address, transport=self.cfg.remote_transport, compat_hash=self.compat_hash,
                           name=f"vllm-peer-{os.getpid()}", timeout=self.cfg.store_timeout_s, staging_bytes=64 << 20)

    # ==== worker side ============================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.role != KVConnectorRole.WORKER:
            raise ConnectorRoleError(f"KVRelayConnector.register_kv_caches is a worker-side hook, but it was "
                                     f"called on the {self.role.name} instance")
        layers = ordered_layers(kv_caches)
        if len(layers) != self.num_layers:
            raise ValueError(f"vLLM registered {len(layers)} KV caches, the model has {self.num_layers} layers")
        self._layer_index = {name: i for i, (name, _) in enumerate(layers)}
        tensors = [t for _, t in layers]
        rank = 0
        if self.tp_size > 1:
            from vllm.distributed import get_tensor_model_parallel_rank
            rank = int(get_tensor_model_parallel_rank())
        head_start, head_end, publishes = rank_heads(self.total_kv_heads, self.tp_size, rank)
        isa = None
        if tensors[0].device.type == "cpu" and not self.use_mla:
            isa = cpu_isa(self.model_dtype, self.block_size, self.head_dim, self.cache_dtype)
            if isa == "amx" and not torch.cpu._init_amx():
                raise RuntimeError("vLLM chose AMX attention but the kernel refused AMX to this process")
        layout, layer_tensors, codec = layout_of(tensors, head_start=head_start, total_kv_heads=self.total_kv_heads,
                                                 cpu_isa_name=isa, mla=self.use_mla)
        compat = layout.compat_hash(self.cfg.model_id)
        if compat != self.compat_hash:
            raise ValueError(f"the registered KV caches ({layout.dtype}, head dim {layout.head_dim}, "
                             f"{layout.total_kv_heads} KV heads, {layout.num_layers} layers: compat {compat}) do "
                             f"not match the model config (compat {self.compat_hash})")
        epoch = uuid.uuid4().hex

        def cache_factory(metrics: TransferMetrics) -> EngineCache:
            return EngineCache(layout, layer_tensors, self.cfg.model_id, self.compat_hash, epoch, metrics, codec)

        if (layout.head_start, layout.head_end) != (head_start, head_end) and not self.use_mla:
            raise ValueError(f"TP rank {rank} of {self.tp_size} registered KV caches of heads [{layout.head_start}, "
                             f"{layout.head_end}); vLLM gives it heads [{head_start}, {head_end}) of "
                             f"{self.total_kv_heads}")
        self.worker = WorkerSide(self.cfg, cache_factory, lambda: self._client("worker"), self._peer_client,
                                 heads=self.heads, publishes_heads=publishes, counts_requests=rank == 0)
        log.info("kvrelay: TP rank %d: %d layers of %s blocks (block size %d, KV heads [%d, %d) of %d, %s, isa %s)",
                 rank, layout.num_layers, layout.num_blocks, layout.block_size, layout.head_start, layout.head_end,
                 layout.total_kv_heads, "publishes them" if publishes else "another rank publishes them", isa or "-")

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        self._worker("handle_preemptions").preempted(_step_meta(kv_connector_metadata).preempted)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        worker = self._worker("bind_connector_metadata")
        super().bind_connector_metadata(connector_metadata)
        worker.bind(_step_meta(connector_metadata))

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._worker("start_load_kv").start_loads()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: their requests are not scheduled until reported in get_finished

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        worker = self._worker("save_kv_layer")
        index = self._layer_index.get(layer_name)
        if index is not None:  # (a layer without KV to move, e.g. a draft model's)
            worker.save_layer(index)

    def wait_for_save(self) -> None:
        self._worker("wait_for_save").end_step()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, recving = self._worker("get_finished").finished(finished_req_ids)
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker("get_block_ids_with_load_errors").load_errors()

    def get_kv_connector_stats(self) -> KVRelayStats | None:
        counts: dict[str, int] = {}
        if self.worker is not None:
            counts = self.worker.take_counts()
        elif self.sched is not None:
            counts = self.sched.take_counts()
        stats = KVRelayStats(data=dict(counts))
        return None if stats.is_empty() else stats

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self.sched is not None:
            self.sched.close()

    # ==== scheduler side =========================================================================================
    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        """vLLM's public binding hook (once, after its scheduler built the cache manager): saves read a
        request's block ids from it."""
        self._scheduler("bind_kv_cache_manager")
        super().bind_kv_cache_manager(kv_cache_manager)
        self._blocks_of = lambda rid: list(kv_cache_manager.get_blocks(rid).get_block_ids()[0])

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler("get_num_new_matched_tokens").matched_tokens(request.request_id, request.prompt_token_ids or [],
                                         request.kv_transfer_params, num_computed_tokens,
                                         getattr(request, "cache_salt", None) or "")

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        sched = self._scheduler("update_state_after_alloc")
        if num_external_tokens > 0:
            sched.after_alloc(request.request_id, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        sched = self._scheduler("build_connector_meta")
        meta = KVRelayMetadata()
        so = scheduler_output
        n_new = so.num_scheduled_tokens
        scheduled = [(r.req_id, r.num_computed_tokens, n_new.get(r.req_id, 0)) for r in so.scheduled_new_reqs]
        cached = so.scheduled_cached_reqs
        scheduled += [(rid, computed, n_new.get(rid, 0))
                      for rid, computed in zip(cached.req_ids, cached.num_computed_tokens, strict=True)]
        if self._blocks_of is None:
            raise ConnectorRoleError("vLLM did not bind its KV cache manager to the connector before its first "
                                     "step (bind_kv_cache_manager): saves cannot read their block ids")
        step = sched.build_meta(scheduled, self._blocks_of)
        meta.loads, meta.saves = step.loads, step.saves
        meta.preempted = sorted(so.preempted_req_ids or ())
        meta.aborted = step.aborted
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        self._scheduler("update_connector_output").load_failed(set(connector_output.finished_recving or ()),
                                                               set(connector_output.invalid_block_ids or ()))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        aborted = getattr(getattr(request, "status", None), "name", "") == "FINISHED_ABORTED"  # RequestStatus
        return self._scheduler("request_finished").finished(request.request_id, aborted)

    # ==== stats ==================================================================================================
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVRelayStats | None:
        return KVRelayStats(data=dict(data)) if data is not None else KVRelayStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVRelayPromMetrics:
        return KVRelayPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _step_meta(meta: Any) -> StepMeta:
    """vLLM hands the worker the metadata our scheduler side built: anything else is a wiring bug."""
    if not isinstance(meta, StepMeta):
        raise ConnectorRoleError(f"KVRelayConnector got connector metadata of type {type(meta).__name__}, not the "
                                 f"KVRelayMetadata its scheduler side builds (is another connector's scheduler "
                                 f"paired with this worker?)")
    return meta


def _head_slices(configured: int, total: int, tp_size: int, mla: bool) -> HeadSlices:
    """The head slices this engine publishes and looks up (kvrelay.connector.heads): ``configured`` (the
    cluster's ``head_slices``) or one per rank; ConfigError where they cannot serve this model at this TP size."""
    shape = f"{'an MLA latent cache (1 head)' if mla else f'{total} KV heads'} at tensor-parallel size {tp_size}"
    slices = configured or default_slices(total, tp_size)
    what = f"head_slices {slices}" if configured else f"head_slices (default {slices}, one per rank)"
    try:
        ranks = [rank_heads(total, tp_size, rank) for rank in range(tp_size)]
        heads = HeadSlices(total, slices)
        for start, end, publishes in ranks:
            if publishes:
                heads.inside(start, end)
    except ValueError as exc:
        raise ConfigError(f"--kv-transfer-config: kv_connector_extra_config.{what} cannot serve {shape}: {exc}") from None
    return heads


def _cache_torch_dtype(name: str) -> torch.dtype:
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16, "float": torch.float32,
             "float32": torch.float32}
    if name not in table:
        raise ValueError(f"kvrelay does not move {name!r} KV caches (supported: auto, {', '.join(table)})")
    return table[name]
