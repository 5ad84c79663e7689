"""NVIDIA Dynamo integration: kvrelay-backed engines as workers of Dynamo's runtime, behind
``python -m dynamo.frontend``, with prefill and decode disaggregated through a kvrelay store.

Reading path (each file has one job):
  env.py        the DYN_* environment: file discovery, loopback listeners, the event broker's address
  broker.py     `kvrelay dynamo-broker`: the event plane's XSUB/XPUB proxy on 127.0.0.1
  model_dir.py  what Dynamo's frontend reads from a model directory (tokenizer, chat template, EOS);
                `kvrelay dynamo-checkpoint` writes a seeded checkpoint with them
  engine.py     the reference engine as a Dynamo `LLMEngine`; the P/D handoff (disaggregated_params)
  remote.py     a kvrelay-backed OpenAI server (vLLM + KVRelayConnector) as a Dynamo `LLMEngine`, over HTTP
  worker.py     `kvrelay dynamo-worker`: flags and wiring (in-process reference engine, or --engine-url)
  frontend.py   `kvrelay dynamo-frontend`: Dynamo's own frontend, launched with that environment
  vllm_protocol.py  KVRelayConnector's P/D protocol registered into Dynamo's own vLLM worker (dynamo.vllm)

Importing this package does not import Dynamo; engine.py and worker.py's `parse` need ``ai-dynamo``
(``pip install ai-dynamo-runtime==1.6.1 && pip install --no-deps ai-dynamo==1.6.1``).
"""
