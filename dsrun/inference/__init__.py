"""Deploying what dsrun trained: load weights for inference (load), render chats (chat), one engine that batches
requests continuously over a slot KV cache (engine, slots, sampling) under the console (generate) and the
OpenAI-compatible HTTP server (api, server, metrics), measure both (bench), or hand a folder to vLLM (vllm)."""
