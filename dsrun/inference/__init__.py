"""Deploying what dsrun trained: load weights for inference (load), render chats (chat), generate on the console
(generate, fast), serve over HTTP with continuous batching (engine, server, metrics), measure it (bench), or hand a
folder to vLLM (vllm)."""
