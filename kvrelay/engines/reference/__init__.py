"""The reference engine: a small Llama-style model in torch with a paged KV cache, serving as a
colocated, prefill or decode worker on CPU (`kvrelay engine --role ...`).

Reading path (each file has one job):
  config.py         ModelConfig (HF config.json) and EngineConfig, validated on construction
  weights.py        seeded random weights; safetensors checkpoints in Llama/Qwen2 naming
  loader.py         checkpoint dir or seeded config -> (config, weights, tokenizer)
  (kvrelay/tokenizer.py, in the base layer: tokenizer.json or byte-level; the chat template)
  ops.py            batch-invariant numerics (why P/D output equals colocated output bit for bit)
  model.py          the forward pass over the paged cache (KVLayout NHD fused), per-layer hook
  block_manager.py  blocks, ref counts, prefix hashing
  sequence.py       per-request state;  scheduler.py  continuous batching;  sampler.py  sampling
  engine.py         the step loop and the P/D hook points (hooks.py: KVPublisher, KVPuller)
  inbox.py          messages to the engine thread
  kv_connector.py   wiring of the store client and kvrelay.connector's LayerPublisher / LayerPuller
                    (layer-wise publishing and pulling live there, shared with every engine)
  api.py, server.py OpenAI-compatible HTTP (aiohttp), metrics, health;  metrics.py  Prometheus

Numerics: float32 weights, activations and KV cache by default (exact reproducibility on CPU).
"""
