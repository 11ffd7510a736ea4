"""Serving engines: requests in, token ids out, batched.

`ContinuousBatching` runs transformers' continuous-batching manager (paged KV cache, a scheduler that adds and
removes sequences at every forward pass: transformers/generation/continuous_batching/). Its paged cache holds the
usual key/value heads (Qwen2, Llama: the R1-Distill models) but not DeepSeek's MLA latent cache, so MLA models
(deepseek_v2/v3 architectures) get `StaticBatching`: waiting requests are grouped into one `generate` call with a
KV cache; a request arriving mid-batch waits for the next. Both record the size of every batch they decode.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dsrun.inference.metrics import ServerMetrics

GREEDY_TEMPERATURE = 1e-5  # the continuous batcher samples; this temperature makes sampling pick the top token
PAGED_ARCHS_REFUSED = ("deepseek_v2", "deepseek_v3")  # MLA: the paged cache cannot hold its latent key/values


class QueueFull(Exception):
    pass


@dataclass
class Request:
    ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[int]
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None  # None: the engine's own random stream
    # ("tokens", [ids]) | ("error", message) | ("done", reason): put on `events`, or handed to `listener` when one is
    # set (the engine's thread calls it: an async server hands the event over to its event loop there)
    events: "queue.Queue[tuple[str, Any]]" = field(default_factory=queue.Queue)
    listener: Callable[[tuple[str, Any]], None] | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generated: int = 0
    request_id: str = ""


def emit(request: Request, event: tuple[str, Any]) -> None:
    if request.listener is not None:
        request.listener(event)
    else:
        request.events.put(event)


class Engine:
    """What the server needs: submit, cancel, stop; metrics and the batch-size record are kept here."""

    def __init__(self, metrics: ServerMetrics, max_queue: int):
        self.metrics, self.max_queue = metrics, max_queue
        self.lock = threading.Lock()
        self.active: dict[str, Request] = {}
        self.counter = 0
        self.batch_sizes: list[int] = []  # every forward pass's batch (kept short: the last 10,000)

    def submit(self, request: Request) -> None:
        with self.lock:
            if len(self.active) >= self.max_queue:
                raise QueueFull(f"{len(self.active)} requests are waiting or running (serve.max_queue="
                                f"{self.max_queue}); retry later")
            self.counter += 1
            request.request_id = f"req-{self.counter}"
            self.active[request.request_id] = request
        self.metrics.queue_depth.inc()
        self.metrics.prompt_tokens.inc(len(request.ids))
        self._enqueue(request)

    def _tokens(self, request: Request, new: list[int]) -> None:
        if not new:
            return
        now = time.perf_counter()
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.ttft.observe(now - request.arrived)
            self.metrics.queue_depth.dec()
            self.metrics.running.inc()
        request.generated += len(new)
        self.metrics.tokens.inc(len(new))
        emit(request, ("tokens", new))

    def _finish(self, request: Request, reason: str) -> None:
        with self.lock:
            if self.active.pop(request.request_id, None) is None:
                return
        if request.first_token_at is None:
            self.metrics.queue_depth.dec()
        else:
            self.metrics.running.dec()
            elapsed = time.perf_counter() - request.first_token_at
            if request.generated > 1 and elapsed > 0:
                self.metrics.decode_rate.observe((request.generated - 1) / elapsed)
        self.metrics.requests.labels(outcome=reason).inc()
        emit(request, ("done", reason))

    def _record_batch(self, size: int) -> None:
        self.batch_sizes.append(size)
        del self.batch_sizes[:-10_000]
        self.metrics.batch(size)

    def _enqueue(self, request: Request) -> None:
        raise NotImplementedError

    def cancel(self, request: Request) -> None:
        raise NotImplementedError

    def stop(self, timeout: float) -> None:
        """Finish what is running (up to timeout seconds), then stop; what is left is ended as cancelled."""
        raise NotImplementedError


def build_engine(model: Any, serve_cfg: Any, metrics: ServerMetrics) -> Engine:
    if model.config.model_type in PAGED_ARCHS_REFUSED:
        return StaticBatching(model, serve_cfg, metrics)
    return ContinuousBatching(model, serve_cfg, metrics)


class ContinuousBatching(Engine):
    def __init__(self, model: Any, serve_cfg: Any, metrics: ServerMetrics):
        from transformers import ContinuousBatchingConfig, GenerationConfig
        from transformers.generation.continuous_batching.continuous_api import OutputRouter

        super().__init__(metrics, serve_cfg.max_queue)
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # per-request chatter
        # temperature and top-p processors exist only when the defaults are not neutral; each request sets its own
        generation = GenerationConfig(do_sample=True, temperature=0.5, top_p=0.5, max_new_tokens=serve_cfg.max_tokens,
                                      eos_token_id=-1, pad_token_id=0)
        on_cuda = model.device.type == "cuda"
        page = 256 if on_cuda else 32
        batching = ContinuousBatchingConfig(
            page_size=page, num_blocks=max(serve_cfg.kv_cache_tokens // page, 2),
            max_batch_tokens=None if on_cuda else 512, max_requests_per_batch=serve_cfg.max_batch,
            per_request_processors=True, seed=serve_cfg.seed, allow_block_sharing=False)
        self.manager = model.init_continuous_batching(generation_config=generation,
                                                      continuous_batching_config=batching)
        engine = self

        class Router(OutputRouter):
            """Outputs of one forward pass arrive together: their number is the batch that was decoded."""

            def deliver(self, output: Any) -> None:
                engine._outputs([output])

            def deliver_batch(self, outputs: list[Any]) -> None:
                engine._record_batch(len(outputs))
                engine._outputs(outputs)

        self.manager.output_router = Router()  # read by the batch processor the manager's thread creates
        if on_cuda:
            self.manager.warmup()  # captures the CUDA graphs before the first request
        self.manager.start()

    def _enqueue(self, request: Request) -> None:
        temperature = request.temperature if request.temperature > 0 else GREEDY_TEMPERATURE
        self.manager.add_request(request.ids, request_id=request.request_id, max_new_tokens=request.max_new_tokens,
                                 streaming=True, eos_token_id=request.stop, temperature=float(temperature),
                                 top_p=float(request.top_p if request.temperature > 0 else 1.0))

    def _outputs(self, outputs: list[Any]) -> None:
        for output in outputs:
            request = self.active.get(output.request_id)
            if request is None:
                continue
            self._tokens(request, output.generated_tokens[request.generated:])
            if output.error is not None:
                self._finish(request, "error")
            elif output.is_finished():
                last = output.generated_tokens[-1] if output.generated_tokens else None
                self._finish(request, "stop" if last in request.stop else "length")

    def cancel(self, request: Request) -> None:
        self.manager.cancel_request(request.request_id)
        self._finish(request, "cancelled")

    def stop(self, timeout: float) -> None:
        self.manager.stop(block=True, timeout=timeout)
        for request in list(self.active.values()):
            self._finish(request, "cancelled")


class StaticBatching(Engine):
    """Requests waiting when a batch starts run together in one `generate` (left-padded, per-row lengths and stop
    tokens); those with different sampling settings wait for a batch of their own."""

    def __init__(self, model: Any, serve_cfg: Any, metrics: ServerMetrics):
        super().__init__(metrics, serve_cfg.max_queue)
        self.model, self.max_batch, self.seed = model, serve_cfg.max_batch, serve_cfg.seed
        self.waiting: "queue.Queue[Request | None]" = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="dsrun-static-batching", daemon=True)
        self.thread.start()

    def _enqueue(self, request: Request) -> None:
        self.waiting.put(request)

    def cancel(self, request: Request) -> None:
        self._finish(request, "cancelled")  # a running row keeps computing until its batch ends; nobody reads it

    def stop(self, timeout: float) -> None:
        self.stopping.set()
        self.waiting.put(None)
        self.thread.join(timeout)
        for request in list(self.active.values()):
            self._finish(request, "cancelled")

    def _loop(self) -> None:
        held: list[Request] = []
        while not self.stopping.is_set() or held or not self.waiting.empty():
            batch = held or [r for r in [self.waiting.get()] if r is not None]
            held = []
            while len(batch) < self.max_batch:
                try:
                    nxt = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if nxt is not None:
                    batch.append(nxt)
            if not batch:
                continue
            key = (batch[0].temperature, batch[0].top_p)
            held = [r for r in batch if (r.temperature, r.top_p) != key]
            batch = [r for r in batch if (r.temperature, r.top_p) == key and r.request_id in self.active]
            if batch:
                self._run(batch)

    def _run(self, batch: list[Request]) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        device = next(self.model.parameters()).device
        width = max(len(r.ids) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):  # left padding: every row's next token lands in the last column
            ids[row, width - len(r.ids):] = torch.tensor(r.ids)
            mask[row, width - len(r.ids):] = 1
        done = [False] * len(batch)
        engine = self

        class Rows(BaseStreamer):
            first = True

            def put(self, value: torch.Tensor) -> None:
                if self.first:  # the prompt
                    self.first = False
                    return
                tokens = value.flatten().tolist()
                engine._record_batch(sum(not d for d in done))
                for row, (r, token) in enumerate(zip(batch, tokens)):
                    if done[row]:
                        continue
                    engine._tokens(r, [token])
                    if token in r.stop or r.generated >= r.max_new_tokens:
                        done[row] = True
                        engine._finish(r, "stop" if token in r.stop else "length")

            def end(self) -> None:
                for row, r in enumerate(batch):
                    if not done[row]:
                        engine._finish(r, "length")

        class RowsDone(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                return torch.tensor(done, device=input_ids.device)

        first = batch[0]
        sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p} \
            if first.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        torch.manual_seed(self.seed)
        try:
            with torch.inference_mode():
                self.model.generate(ids.to(device), attention_mask=mask.to(device),
                                    max_new_tokens=max(r.max_new_tokens for r in batch),
                                    stopping_criteria=StoppingCriteriaList([RowsDone()]), streamer=Rows(),
                                    pad_token_id=0, eos_token_id=None, **sampling)
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the server
            for r in batch:
                emit(r, ("error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
                self._finish(r, "error")
