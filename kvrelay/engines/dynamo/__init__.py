"""NVIDIA Dynamo integration: kvrelay-backed engines as workers of Dynamo's runtime, behind
``python -m dynamo.frontend``, with prefill and decode disaggregated through a kvrelay store.

Reading path (each file has one job):
  env.py        the DYN_* environment: file discovery, loopback listeners, the event broker's address
  broker.py     `kvrelay dynamo-broker`: the event plane's XSUB/XPUB proxy on 127.0.0.1
  model_dir.py  what Dynamo's frontend reads from a model directory (tokenizer, chat template, EOS);
                `kvrelay dynamo-checkpoint` writes a seeded checkpoint with them
  flags.py      `kvrelay dynamo-worker`'s flags, their common checks, Dynamo's WorkerConfig from them
  common.py     what both engines share: role -> DisaggregationMode, the params key, sampling options
  engine.py     the reference engine as a Dynamo `LLMEngine`; the P/D handoff (disaggregated_params)
  remote.py     a kvrelay-backed OpenAI server (vLLM + KVRelayConnector) as a Dynamo `LLMEngine`, over HTTP
  worker.py     `kvrelay dynamo-worker`: picks the engine (in-process reference engine, or --engine-url)
  frontend.py   `kvrelay dynamo-frontend`: Dynamo's own frontend, launched with that environment
  vllm_protocol.py  KVRelayConnector's P/D protocol registered into Dynamo's own vLLM worker (dynamo.vllm)

Importing this package (or flags.py) does not import Dynamo; common.py, engine.py, remote.py and
worker.py's `parse` need ``ai-dynamo``
(``pip install ai-dynamo-runtime==1.6.1 && pip install --no-deps ai-dynamo==1.6.1``).
"""
