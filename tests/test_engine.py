"""The inference engine (dsrun/inference/engine.py) in process, on CPU, with the tiny models: Qwen2's grouped-query
cache and DeepSeek-V3's MLA latent cache go through the same slots. Greedy tokens equal transformers' `generate`
for each prompt alone while other requests join and leave; sampled tokens depend on the request's own seed only;
a cancelled request frees its slot; the compiled decode step does not recompile after warm-up."""

from __future__ import annotations

import time

import pytest
import torch

from tests.conftest import model_cfg


def tiny(name: str) -> torch.nn.Module:
    from dsrun.model import architecture, build_model

    cfg = model_cfg(name)
    arch = architecture(cfg)
    arch.use_cache = True
    return build_model(cfg, arch, seed=0).eval()


def engine_for(model, **overrides):
    from dsrun.inference.engine import Engine
    from dsrun.inference.metrics import ServerMetrics

    settings = {"slots": 4, "max_len": 128, "metrics": ServerMetrics(), "max_queue": 16, "seed": 0,
                "compile": False, "prefill_tokens": 32} | overrides
    return Engine(model, **settings)


def request(ids, new_tokens, **sampling):
    from dsrun.inference.engine import Request

    return Request(ids=ids, max_new_tokens=new_tokens, temperature=sampling.pop("temperature", 0.0),
                   top_p=sampling.pop("top_p", 1.0), stop=sampling.pop("stop", []), **sampling)


def collect(req, timeout: float = 120) -> tuple[list[int], str]:
    tokens = []
    while True:
        kind, value = req.events.get(timeout=timeout)
        if kind == "tokens":
            tokens += value
        elif kind == "done":
            return tokens, value
        else:
            raise AssertionError(f"engine error: {value}")


def greedy_alone(model, ids: list[int], new_tokens: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny"])  # grouped-query heads; DeepSeek-V3 MLA + MoE
def test_greedy_tokens_equal_transformers_alone_while_requests_join_and_leave(name):
    model = tiny(name)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    # six requests, four slots, prompts longer than a prefill chunk (32): slots are reused, chunks interleave
    lengths, new = (5, 37, 12, 80, 3, 20), (9, 14, 5, 11, 7, 16)
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
    engine = engine_for(model)
    requests = []
    for i, (ids, n) in enumerate(zip(prompts, new)):
        requests.append(request(ids, n))
        engine.submit(requests[-1])
        if i == 2:
            time.sleep(0.05)  # the rest join while the first three decode
    outputs = [collect(r) for r in requests]
    engine.stop(5)
    for ids, n, (tokens, reason) in zip(prompts, new, outputs):
        assert reason == "length" and tokens == greedy_alone(model, ids, n)
    assert max(engine.batch_sizes) == 4 and min(engine.batch_sizes) == 1, engine.batch_sizes


def test_a_sampled_request_depends_on_its_seed_not_on_its_neighbours():
    model = tiny("tiny_qwen2")
    engine = engine_for(model)
    settings = {"temperature": 0.9, "top_p": 0.9, "top_k": 50}
    alone = request([3, 4, 5], 10, seed=7, **settings)
    engine.submit(alone)
    alone_tokens, _ = collect(alone)
    crowd = [request([9, 9, 9, 9, 9], 12, seed=1, **settings), request([11] * 40, 6, seed=2, **settings),
             request([3, 4, 5], 10, seed=7, **settings), request([3, 4, 5], 10, seed=8, **settings)]
    for r in crowd:
        engine.submit(r)
    crowd_tokens = [collect(r)[0] for r in crowd]
    engine.stop(5)
    assert crowd_tokens[2] == alone_tokens, "the same seed gives the same tokens in another slot, beside others"
    assert crowd_tokens[3] != alone_tokens, "another seed samples other tokens"
    assert len(set(alone_tokens)) > 1


def test_sampling_rules_on_the_device():
    from dsrun.inference.sampling import sample

    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    top = logits.argmax(-1)
    seeds, positions = torch.arange(4), torch.full((4,), 9)
    ones = torch.ones(4)
    # temperature 0, top-k 1 and a top-p below the first token's mass all leave only the top token
    assert torch.equal(sample(logits, torch.zeros(4), ones, torch.zeros(4, dtype=torch.long), seeds, positions), top)
    assert torch.equal(sample(logits, ones, ones, torch.ones(4, dtype=torch.long), seeds, positions), top)
    assert torch.equal(sample(logits, ones, torch.full((4,), 1e-6), torch.zeros(4, dtype=torch.long), seeds,
                              positions), top)
    # top-k 5: every draw is among the five best
    best = logits.topk(5, -1).indices
    for position in range(50):
        drawn = sample(logits, ones * 2, ones, torch.full((4,), 5), seeds, torch.full((4,), position))
        assert (best == drawn[:, None]).any(-1).all()


def test_draws_follow_the_probabilities_and_depend_on_seed_and_position_only():
    """Inverse-transform sampling: over many seeds each token comes up as often as its probability says (top-p's
    cut renormalised); a row's token does not depend on the rows beside it; with nothing cut, the truncating path
    draws what the plain one does; the same under torch.compile."""
    from dsrun.inference.sampling import sample, uniform

    rows = 20_000
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0]).repeat(rows, 1)
    ones, none = torch.ones(rows), torch.zeros(rows, dtype=torch.long)
    seeds, positions = torch.arange(rows), torch.full((rows,), 3)
    plain = sample(logits, ones, ones, none, seeds, positions, truncate=False)
    assert torch.allclose(torch.bincount(plain, minlength=4) / rows, logits[0].softmax(-1), atol=0.015)
    assert torch.equal(sample(logits, ones, ones, none, seeds, positions), plain)
    cut = sample(logits, ones, torch.full((rows,), 0.7), none, seeds, positions)  # keeps tokens 3 (0.64) and 2
    kept = logits[0, 2:].softmax(-1)
    assert torch.allclose(torch.bincount(cut, minlength=4) / rows, torch.cat([torch.zeros(2), kept]), atol=0.015)
    assert torch.equal(sample(logits[:7], ones[:7], ones[:7], none[:7], seeds[5:12], positions[:7], False), plain[5:12])
    assert not torch.equal(sample(logits, ones, ones, none, seeds, positions + 1, False), plain)
    drawn = uniform(torch.tensor([0, 1, 2**40 + 7, 2**62]), torch.tensor([0, 5, 2**31, 3]))
    assert 0 < drawn.min() and drawn.max() < 1 and len(set(drawn.tolist())) == 4
    big = torch.randn(3, 5003, generator=torch.Generator().manual_seed(0))
    args = (big, torch.ones(3), torch.ones(3), torch.zeros(3, dtype=torch.long), torch.arange(3), torch.zeros(3,
            dtype=torch.long), False)
    assert torch.equal(torch.compile(sample, fullgraph=True)(*args), sample(*args))


def test_cancel_frees_the_slot_and_the_gauges():
    model = tiny("tiny_qwen2")
    engine = engine_for(model, slots=1)
    long = request([1, 2, 3], 100)
    engine.submit(long)
    assert long.events.get(timeout=60)[0] == "tokens"
    waiting = request([4, 5], 3)
    engine.submit(waiting)  # the only slot is taken: it waits
    engine.cancel(long)
    tokens, reason = collect(long)
    assert reason == "cancelled" and len(tokens) < 99
    assert collect(waiting)[1] == "length", "the freed slot took the waiting request"
    engine.stop(5)
    metrics = engine.metrics
    assert metrics.running._value.get() == 0 and metrics.queue_depth._value.get() == 0
    assert engine.free == [0] and not engine.active


def test_the_compiled_decode_step_is_one_graph_for_every_bucket(capsys):
    """torch.compile with dynamic shapes: one graph for every row count and cache length, the full length included
    (a second compile of a 7B costs its user a minute), and none after warm-up (the `eager` backend stands in for
    inductor on CPU: dynamo traces and guards the same frames). A long warm-up says how far it got."""
    from torch._dynamo.utils import counters

    model = tiny("tiny_qwen2")  # two key/value heads: the row count 2 must not be guarded equal to them
    before = counters["stats"]["unique_graphs"]
    engine = engine_for(model, compile=True, backend="eager", max_len=1024)
    assert engine.buckets() == ([2, 4], [256, 512, 1024])
    engine.heartbeat_s = 0.0  # every wait, not every 30 s
    engine.warm_up(*engine.buckets())
    assert "dsrun: compiling the decode step: 0 of 6 shapes recorded" in capsys.readouterr().err
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before == 1, f"{graphs - before} graphs for the decode step's buckets"
    requests = [request(list(range(2, 2 + n)), 6) for n in (300, 7, 40)]
    for r in requests:
        engine.submit(r)
    outputs = [collect(r)[0] for r in requests]
    engine.stop(5)
    assert counters["stats"]["unique_graphs"] == graphs, "a decode shape recompiled after warm-up"
    assert outputs[1] == greedy_alone(model, requests[1].ids, 6)


def test_a_first_compile_at_every_row_serves_fewer_rows_without_another():
    """GRPO warms the full row count only; rows that finish leave fewer. A first compile where the step's inputs were
    their whole buffers was guarded on that (`tokens._base.size()[0] == tokens.size()[0]`) and compiled again for
    fewer rows: four minutes on an H100 (call 32e)."""
    from torch._dynamo.utils import counters

    engine = engine_for(tiny("tiny_qwen2"), compile=True, backend="eager", max_len=256, slots=8)
    before = counters["stats"]["unique_graphs"]
    engine.warm_up([8], [256])
    engine.warm_up([2, 4], [256])
    engine.stop(1)
    assert counters["stats"]["unique_graphs"] - before == 1


def test_the_decode_step_is_traced_once():
    """Python floats are constants to the compiler: left symbolic, nn.Embedding's norm_type was specialized only
    after the whole model was traced, and the trace began again — twice the time of every compile of the step
    (`python bench/compile_probe.py`: 18.8 -> 10.1 s on this CPU). AOT autograd, which inductor runs, is where the
    restart came from: `aot_eager` stands in for inductor here."""
    import logging

    restarts: list[str] = []

    class Restarts(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Restarting analysis" in record.getMessage():
                restarts.append(record.getMessage())

    handler = Restarts()
    torch._logging.set_logs(dynamo=logging.INFO)
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        engine = engine_for(tiny("tiny_qwen2"), compile=True, backend="aot_eager", max_len=256)
        engine.warm_up([4], [256])
        engine.stop(1)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        torch._logging.set_logs()
    assert not restarts, restarts


def test_the_warm_up_covers_only_the_lengths_asked_for():
    """GRPO warms the buckets its rollouts reach (prompt + completion budget), not the engine's odd full length."""
    engine = engine_for(tiny("tiny_qwen2"), max_len=1025, slots=8)
    try:
        assert engine.buckets() == ([2, 4, 8], [256, 512, 1024, 1025])
        assert engine.buckets(longest=20 + 768) == ([2, 4, 8], [256, 512, 1024])
        assert engine.buckets(longest=4096) == engine.buckets()
    finally:
        engine.stop(1)


def test_checkpointed_blocks_compile_as_one_graph_for_the_rollouts():
    """A model trained with parallel.activation_checkpointing (GRPO's recipes) decodes its rollouts through the same
    one graph: the checkpoint is skipped without autograd, not traced as a graph break at every block."""
    from torch._dynamo.utils import counters

    from dsrun.parallelize import apply_activation_checkpointing, decoder_blocks

    model = tiny("tiny_qwen2")
    apply_activation_checkpointing(model, decoder_blocks(model))
    assert type(model.model.layers[0]).__name__ == "CheckpointWrapper"
    before = dict(counters["graph_break"]), counters["stats"]["unique_graphs"]
    engine = engine_for(model, compile=True, backend="eager", max_len=256)
    engine.warm_up(*engine.buckets())
    engine.stop(1)
    assert dict(counters["graph_break"]) == before[0], "the decode step broke its graph"
    assert counters["stats"]["unique_graphs"] - before[1] == 1


def test_a_decode_step_that_fails_to_compile_is_one_line_naming_the_setting():
    """A compile failure in the engine's thread (an inductor bug on a GPU, say) reaches the caller of warm_up as
    one line naming the setting that runs uncompiled, and stops the engine; before, the thread died and the
    server said it was serving."""
    from dsrun.inference.engine import CompileFailed

    def broken(gm, example_inputs):
        raise RuntimeError("codegen failed\nfor this graph")

    engine = engine_for(tiny("tiny_qwen2"), compile=True, backend=broken)
    with pytest.raises(CompileFailed, match=r"compiling the decode step failed \(RuntimeError: codegen failed for this graph\); "
                                            r"set serve.compile=false"):
        engine.warm_up([2], [128], setting="serve.compile")
    assert not engine.thread.is_alive()
