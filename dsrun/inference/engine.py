"""The one inference engine under `dsrun generate`, `dsrun serve` and `task=bench_infer`: requests in, token ids
out, continuously batched over a fixed set of slots (dsrun/inference/slots.py).

One thread owns the model. Each turn it admits waiting requests into free slots, runs one prefill chunk of the
newcomers (at most `prefill_tokens` prompt tokens, so a long prompt never stalls the running streams for more than
a chunk), then one decode step of every occupied slot. The decode step — the model's forward for one token per
slot and the sampling of every slot's next token (dsrun/inference/sampling.py) — is compiled on CUDA and replayed as
a CUDA graph (torch.compile's reduce-overhead mode; one graph per slot-count bucket and cache-length bucket). Its
tokens stay on the device as the next step's input; a copy goes to the host without waiting, and the host reads it
after the next step is queued, so the host's work (stop checks, streaming out) overlaps the GPU's. A slot that
finishes has one extra token computed that nobody reads.

On CPU the same engine runs eagerly: every test here goes through the code users run on a GPU."""

from __future__ import annotations

import heapq
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch._dynamo

from dsrun.errors import UserError
from dsrun.inference.metrics import ServerMetrics
from dsrun.inference.sampling import sample
from dsrun.inference.slots import SlotCache, row_mask, use_slot_attention

if TYPE_CHECKING:
    from dsrun.schema import ServeConfig

KV_BUCKET_MIN = 256  # decode reads the cache up to a power of two >= the longest sequence, at least this
# decode runs at least two rows: a size-1 dimension would be specialized by the compiler, a second compile (a
# minute for a 7B); the idle row costs next to nothing where the weights' reads set the step's time (2 % on an H100).
# Not so for bitsandbytes' 4-bit layers: their fused GEMV serves one row only, two rows dequantize every weight
# first — there one row runs alone (fused_single_row), at the price of that second compile.
MIN_ROWS = 2


class QueueFull(Exception):
    pass


class CompileFailed(UserError):
    """The decode step did not compile: one line, and the setting that runs without compiling."""


@dataclass
class Request:
    ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[int]
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None  # None: one drawn from the engine's own generator (serve.seed)
    # ("tokens", [ids]) | ("error", message) | ("done", reason): put on `events`, or handed to `listener` when one is
    # set (the engine's thread calls it: an async server hands the event over to its event loop there)
    events: "queue.Queue[tuple[str, Any]]" = field(default_factory=queue.Queue)
    listener: Callable[[tuple[str, Any]], None] | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generated: int = 0
    request_id: str = ""


def fused_single_row(model: Any) -> bool:
    """Whether the model's matmuls have a kernel for one row that more rows lose (bitsandbytes' 4-bit GEMV)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return False
    return any(isinstance(m, Linear4bit) for m in model.modules())


def truncates(request: Request) -> bool:
    """Whether sampling cuts this request's vocabulary (top-p, top-k): the sort that needs is skipped otherwise."""
    return request.top_p < 1.0 or request.top_k > 0


def emit(request: Request, event: tuple[str, Any]) -> None:
    if request.listener is not None:
        request.listener(event)
    else:
        request.events.put(event)


@dataclass
class Slot:
    request: Request
    fed: int = 0  # prompt tokens in the cache so far
    position: int = 0  # position of the next token the slot decodes (host mirror of the device's)

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.request.ids)


def _cause(failure: BaseException | None) -> str:
    """The compiler's own error in one line, without torch's advice on logging that follows it."""
    if failure is None:
        return "the engine's thread ended"
    cause = getattr(failure, "inner_exception", None) or failure.__cause__ or failure
    lines = [line for line in str(cause).splitlines() if line.strip() and "TORCHDYNAMO_VERBOSE" not in line
             and "TORCH_LOGS" not in line]
    return f"{type(cause).__name__}: {' '.join(lines)[:300]}"


def pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(n - 1, 0).bit_length())


def compile_wanted(setting: Any, device: torch.device) -> bool:
    """serve.compile / generate.compile: auto compiles (and graphs) the decode step on CUDA only — on CPU the
    compile takes longer than the tests it would speed up."""
    value = str(setting).lower()
    return device.type == "cuda" if value == "auto" else value == "true"


class Engine:
    """Requests, slots and the thread that decodes them. `submit`, `cancel` and `stop` are safe from any thread."""

    def __init__(self, model: Any, *, slots: int, max_len: int, metrics: ServerMetrics, max_queue: int, seed: int,
                 compile: bool, prefill_tokens: int = 2048, backend: str = "inductor"):
        self.model, self.metrics, self.max_queue, self.max_len = model, metrics, max_queue, max_len
        self.device = next(model.parameters()).device
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        use_slot_attention(model)
        # (CUDA only: on a CPU bitsandbytes repacks a weight for its one-row path, and fails on small shapes)
        self.min_rows = 1 if self.device.type == "cuda" and fused_single_row(model) else MIN_ROWS
        rows = max(slots, self.min_rows)
        self.cache = SlotCache(rows, max_len)
        self.prefill_tokens = prefill_tokens
        self.seeds = torch.Generator().manual_seed(seed)
        # the device's per-row state: the decode step's inputs. One spare row: the step's inputs are then always
        # views of a longer tensor; a first compile at every row (the view as long as its base) was guarded on
        # that equality, and fewer rows compiled again (four minutes for GRPO's 1.5B on an H100)
        on = {"device": self.device}
        self.tokens = torch.zeros(rows + 1, dtype=torch.long, **on)
        self.positions = torch.zeros(rows + 1, dtype=torch.long, **on)
        self.temperature = torch.zeros(rows, **on)
        self.top_p = torch.ones(rows, **on)
        self.top_k = torch.zeros(rows, dtype=torch.long, **on)
        self.seed = torch.zeros(rows, dtype=torch.long, **on)
        # two host buffers: the step queued after this one copies into the other while this one is read
        self.host_tokens = [torch.zeros(rows, dtype=torch.long, pin_memory=self.device.type == "cuda")
                            for _ in range(2)]
        self.steps = 0
        self.heartbeat_s = 30.0  # a warm-up's progress line this often
        self.slots: list[Slot | None] = [None] * slots
        self.free = list(range(slots))  # a heap: the lowest free slot first, so the occupied ones stay few
        self.waiting: deque[Request] = deque()
        self.commands: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self.lock = threading.Lock()
        self.active: dict[str, Request] = {}
        self.counter = 0
        self.batch_sizes: list[int] = []  # every decode step's occupied slots (the last 10,000)
        self.draining = threading.Event()
        self._allocate_cache()
        self.step: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] = self._decode
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # dynamic: one compile for every row count and cache length; CUDA graphs are still recorded per shape,
            # which costs one step, not a compile
            mode: dict[str, Any] = {"mode": "reduce-overhead"} if self.device.type == "cuda" and backend == "inductor" else {}
            compiled = torch.compile(self._decode, dynamic=True, fullgraph=False, backend=backend, **mode)
            # Python floats as constants: left symbolic, the first one a kernel needs as a number (nn.Embedding's
            # norm_type) restarted the whole trace once it was done (bench/compile_probe.py: tracing a 4-layer 1.5B
            # shape with LoRA took 18.8 s instead of 10.1 on a 2-core CPU)
            self.step = torch._dynamo.config.patch(specialize_float=True)(compiled)
        self.thread = threading.Thread(target=self._loop, name="dsrun-engine", daemon=True)
        self.thread.start()

    # -- the API ------------------------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        if len(request.ids) + request.max_new_tokens > self.max_len:
            raise ValueError(f"{len(request.ids)} prompt tokens + {request.max_new_tokens} new tokens exceed the "
                             f"engine's {self.max_len} positions per sequence")
        with self.lock:
            if self.draining.is_set():
                raise QueueFull("the server is stopping")
            if len(self.active) >= self.max_queue:
                raise QueueFull(f"{len(self.active)} requests are waiting or running (serve.max_queue="
                                f"{self.max_queue}); retry later")
            self.counter += 1
            request.request_id = f"req-{self.counter}"
            self.active[request.request_id] = request
        self.metrics.queue_depth.inc()
        self.metrics.prompt_tokens.inc(len(request.ids))
        self.commands.put(("submit", request))

    def cancel(self, request: Request) -> None:
        """End a request (a client that left): its slot is freed before the next step."""
        self.commands.put(("cancel", request))

    def stop(self, timeout: float) -> None:
        """Refuse new requests, let running and waiting ones finish for up to `timeout` seconds, then end the rest
        as cancelled and stop the thread."""
        self.draining.set()
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.05)
        self.commands.put(("stop", None))
        self.thread.join(max(deadline - time.monotonic(), 5.0))

    def buckets(self, shortest: int = 1, longest: int | None = None) -> tuple[list[int], list[int]]:
        """The row counts and cache lengths the decode step can run with, for sequences of `shortest` to `longest`
        positions (at most the engine's): what a warm-up records."""
        longest = min(longest or self.max_len, self.max_len)
        counts = sorted({self._rows(n) for n in range(1, len(self.slots) + 1)})
        lengths = sorted({min(pow2_at_least(n, KV_BUCKET_MIN), self.max_len) for n in range(shortest, longest + 1)})
        return counts, lengths

    def warm_up(self, slot_counts: list[int], kv_lens: list[int], setting: str = "the compile setting") -> None:
        """Compile (and on CUDA record) the decode step for these slot counts and cache lengths before anything is
        timed or served. It runs on the engine's thread (CUDA graph trees are per thread) and returns when done;
        a compile that fails stops the engine and is raised here, naming `setting` as the way around it."""
        if self.step == self._decode:  # not compiled (a bound method is a new object each time: ==, not is)
            return
        started = time.perf_counter()
        print(f"dsrun: compiling the decode step for {slot_counts} slots x {kv_lens} positions", file=sys.stderr,
              flush=True)
        done: list[BaseException | None] = []
        shapes = [0]  # recorded so far, counted by the engine's thread
        self.commands.put(("warm_up", (slot_counts, kv_lens, done, shapes)))
        said = started
        while not done and self.thread.is_alive():
            time.sleep(0.05)
            if time.perf_counter() - said >= self.heartbeat_s:  # minutes on a large model: show it is alive
                said = time.perf_counter()
                print(f"dsrun: compiling the decode step: {shapes[0]} of {len(slot_counts) * len(kv_lens)} shapes "
                      f"recorded, {said - started:.0f} s", file=sys.stderr, flush=True)
        if not done or done[0] is not None:
            failure = done[0] if done else None
            self.stop(0)
            raise CompileFailed(f"compiling the decode step failed ({_cause(failure)}); set {setting}=false to run "
                                "it uncompiled")
        print(f"dsrun: compiled the decode step in {time.perf_counter() - started:.0f} s", file=sys.stderr,
              flush=True)

    def _warm_up(self, slot_counts: list[int], kv_lens: list[int], done: list[BaseException | None],
                 shapes: list[int]) -> None:
        failure = None
        try:
            for rows in slot_counts:
                for kv_len in kv_lens:
                    for _ in range(3):  # compile, record, replay
                        if self.device.type == "cuda":
                            torch.compiler.cudagraph_mark_step_begin()
                        self.step(*self._step_inputs(rows), min(kv_len, self.max_len))
                    shapes[0] += 1
            self.positions.fill_(self.max_len - 1)  # where unoccupied slots write their junk (see _admit)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting warm_up, which raises it
            failure = exc
        finally:
            done.append(failure)

    def _allocate_cache(self) -> None:
        """Every layer's slots, allocated by one eager forward of one token (each layer allocates what it writes),
        before anything is compiled; marked as static addresses so CUDA graphs write into them in place."""
        last = torch.tensor([[self.max_len - 1]], device=self.device)
        self.cache.target(torch.tensor([0], device=self.device), last, self.max_len)
        with torch.inference_mode():
            self.decoder(input_ids=torch.zeros_like(last), attention_mask=row_mask(last, self.max_len, self.dtype),
                         position_ids=last, cache=self.cache, use_cache=True)
        for pair in self.cache.layers.values():
            for tensor in pair:
                torch._dynamo.mark_static_address(tensor)
                # fixed sizes: a dynamic head count equal to the row count would be guarded equal (duck sizing),
                # a recompile when the rows change
                torch._dynamo.mark_static(tensor)
        self.positions.fill_(self.max_len - 1)

    # -- the thread ---------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        pending: tuple[list[tuple[int, Request]], Any] | None = None
        stopping = False
        with torch.inference_mode():
            while not stopping or pending is not None:
                idle = pending is None and not self.waiting and not any(self.slots)
                stopping = self._take_commands(block=idle and not stopping) or stopping
                if stopping:
                    self._end_all("cancelled")
                self._admit()
                try:
                    if any(s is not None and not s.decoding for s in self.slots):
                        self._prefill()
                    queued = self._queue_decode() if any(s is not None and s.decoding for s in self.slots) \
                        else None
                    if pending is not None:
                        self._deliver(*pending)
                    pending = queued
                except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the server
                    pending = None
                    self._fail_all(exc)

    def _take_commands(self, block: bool) -> bool:
        """Apply what other threads asked; True when asked to stop."""
        stop = False
        while True:
            try:
                kind, request = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
            except queue.Empty:
                return stop
            block = False
            if kind == "stop":
                stop = True
            elif kind == "submit":
                self.waiting.append(request)
            elif kind == "warm_up":
                self._warm_up(*request)
            elif kind == "cancel" and request is not None:
                self._cancel(request)

    def _cancel(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        for index, slot in enumerate(self.slots):
            if slot is not None and slot.request is request:
                self._release(index)
        self._finish(request, "cancelled")

    def _admit(self) -> None:
        while self.waiting and self.free:
            request = self.waiting.popleft()
            if request.request_id not in self.active:  # cancelled while waiting
                continue
            index = heapq.heappop(self.free)
            self.slots[index] = Slot(request)
            seed = request.seed if request.seed is not None else int(
                torch.randint(0, 2**31 - 1, (), generator=self.seeds))
            self.temperature[index] = request.temperature
            self.top_p[index] = request.top_p
            self.top_k[index] = request.top_k
            self.seed[index] = seed
            # until its prompt is in, the slot is in the decode step's rows: it writes its junk at the last position,
            # which its own tokens overwrite before they read it
            self.positions[index] = self.max_len - 1

    def _release(self, index: int) -> None:
        self.slots[index] = None
        heapq.heappush(self.free, index)

    def _prefill(self) -> None:
        """One chunk of the prompts not yet in the cache: rows of newcomers, right-padded to the longest chunk (a
        padded query writes past its row's end, where the row's own later tokens overwrite it before it is read)."""
        budget, rows = self.prefill_tokens, []
        for index, slot in enumerate(self.slots):
            if slot is not None and not slot.decoding and budget > 0:
                take = min(len(slot.request.ids) - slot.fed, budget)
                rows.append((index, slot, take))
                budget -= take
        width = max(take for _, _, take in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        for row, (_, slot, take) in enumerate(rows):
            ids[row, :take] = torch.tensor(slot.request.ids[slot.fed:slot.fed + take])
            positions[row] = torch.arange(slot.fed, slot.fed + width).clamp_max(self.max_len - 1)
        kv_len = min(pow2_at_least(int(positions.max()) + 1, KV_BUCKET_MIN), self.max_len)
        slots = torch.tensor([index for index, _, _ in rows], device=self.device)
        positions = positions.to(self.device)
        self.cache.target(slots, positions, kv_len)
        hidden = self.decoder(input_ids=ids.to(self.device), attention_mask=row_mask(positions, kv_len, self.dtype),
                              position_ids=positions, cache=self.cache, use_cache=True).last_hidden_state
        done = [(row, index, slot, take) for row, (index, slot, take) in enumerate(rows)
                if slot.fed + take == len(slot.request.ids)]
        for _, slot, take in rows:
            slot.fed += take
        if not done:
            return
        last = hidden[[row for row, *_ in done], [take - 1 for *_, take in done]]
        where = torch.tensor([index for _, index, _, _ in done], device=self.device)
        first_positions = torch.tensor([len(slot.request.ids) for _, _, slot, _ in done], device=self.device)
        logits = self.head(last)
        first = sample(logits, self.temperature[where], self.top_p[where], self.top_k[where], self.seed[where],
                       first_positions, any(truncates(slot.request) for _, _, slot, _ in done))
        self.tokens[where] = first
        self.positions[where] = first_positions
        for (_, index, slot, _), token in zip(done, first.tolist()):
            slot.position = len(slot.request.ids)
            self._accept(index, slot, token)

    def _rows(self, leading: int) -> int:
        """The decode step's row count when the highest occupied slot is `leading` - 1: a power of two (a bucket),
        at least `min_rows`, at most the cache's rows."""
        return min(max(pow2_at_least(leading), self.min_rows), self.cache.slots)

    def _step_inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[:rows], self.positions[:rows]

    def _next_tokens(self, logits: torch.Tensor, rows: int, sampled: bool, truncate: bool) -> torch.Tensor:
        if not sampled:
            return logits.argmax(-1)
        return sample(logits, self.temperature[:rows], self.top_p[:rows], self.top_k[:rows], self.seed[:rows],
                      self.positions[:rows] + 1, truncate)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor,
                kv_len: int) -> torch.Tensor:
        """The next-token logits of each of the leading `len(tokens)` slots: what is compiled and graphed, one graph
        for every bucket. Sampling stays outside it (inductor's scan over a 152k vocabulary with a dynamic row
        count failed to generate code on an H100 with torch 2.11); greedy steps, what a benchmark times, then
        add one argmax kernel."""
        self.cache.target(tokens.shape[0], positions[:, None], kv_len)
        hidden = self.decoder(input_ids=tokens[:, None], attention_mask=row_mask(positions[:, None], kv_len,
                                                                                   self.dtype),
                              position_ids=positions[:, None], cache=self.cache, use_cache=True).last_hidden_state
        return self.head(hidden[:, -1])

    def _queue_decode(self) -> tuple[list[tuple[int, Request]], Any]:
        """Queue one decode step of every decoding slot; returns what `_deliver` needs once its tokens are here."""
        decoding = [(i, s) for i, s in enumerate(self.slots) if s is not None and s.decoding]
        rows = self._rows(decoding[-1][0] + 1)
        kv_len = min(pow2_at_least(max(s.position for _, s in decoding) + 1, KV_BUCKET_MIN), self.max_len)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        sampled = any(s.request.temperature > 0 for _, s in decoding)
        new = self._next_tokens(self.step(*self._step_inputs(rows), kv_len), rows, sampled,
                                any(truncates(s.request) for _, s in decoding))
        self.tokens[:rows].copy_(new)  # the graph's output is overwritten by its next replay
        self.positions[:rows].add_(1).clamp_(max=self.max_len - 1)
        host = self.host_tokens[self.steps % 2]
        self.steps += 1
        host[:rows].copy_(new, non_blocking=True)
        ready = torch.cuda.Event() if self.device.type == "cuda" else None
        if ready is not None:
            ready.record()
        for _, slot in decoding:
            slot.position += 1
        self._record_batch(len(decoding))
        return [(i, s.request) for i, s in decoding], (host, ready)

    def _deliver(self, decoded: list[tuple[int, Request]], copied: tuple[torch.Tensor, Any]) -> None:
        host, ready = copied
        if ready is not None:
            ready.synchronize()
        tokens = host.tolist()
        for index, request in decoded:
            slot = self.slots[index]
            if slot is not None and slot.request is request:
                self._accept(index, slot, tokens[index])

    def _accept(self, index: int, slot: Slot, token: int) -> None:
        """A slot's new token: streamed out; the request ends on a stop token, at its length, or when its slot's
        cache is full."""
        request = slot.request
        self._tokens(request, [token])
        reason = "stop" if token in request.stop else "length" if (
            request.generated >= request.max_new_tokens or slot.position >= self.max_len - 1) else None
        if reason is not None:
            self._release(index)
            self._finish(request, reason)

    def _end_all(self, reason: str) -> None:
        for index, slot in enumerate(self.slots):
            if slot is not None:
                self._release(index)
                self._finish(slot.request, reason)
        while self.waiting:
            self._finish(self.waiting.popleft(), reason)

    def _fail_all(self, exc: Exception) -> None:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"dsrun: engine step failed: {type(exc).__name__}: {message[:300]}", file=sys.stderr)
        for index, slot in enumerate(self.slots):
            if slot is not None:
                emit(slot.request, ("error", message))
                self._release(index)
                self._finish(slot.request, "error")

    # -- per-request bookkeeping (metrics) ----------------------------------------------------------------------

    def _tokens(self, request: Request, new: list[int]) -> None:
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


def build_engine(model: Any, serve_cfg: ServeConfig, metrics: ServerMetrics, context: int) -> Engine:
    """The engine `dsrun serve` runs: serve.max_batch slots of serve.max_prompt_tokens + serve.max_tokens
    positions each (at most the model's context); when compiled, warmed up for every slot count and cache length
    bucket before the first request."""
    max_len = min(context, serve_cfg.max_prompt_tokens + serve_cfg.max_tokens)
    device = next(model.parameters()).device
    engine = Engine(model, slots=serve_cfg.max_batch, max_len=max_len, metrics=metrics,
                    max_queue=serve_cfg.max_queue, seed=serve_cfg.seed,
                    compile=compile_wanted(serve_cfg.compile, device), prefill_tokens=serve_cfg.prefill_tokens)
    engine.warm_up(*engine.buckets(), setting="serve.compile")
    return engine
