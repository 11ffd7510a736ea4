"""What makes a 7B QLoRA fit an 8 GB card, checked on the tiny models in process: the chunked loss equals the plain
one, a quantized base is built block by block and stays 16-bit where it is not quantized, only adapters get
gradients, and offloaded checkpointing gives the same gradients as plain checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dsrun import loss as loss_module
from dsrun.adapters import AdapterConfig
from dsrun.parallelize import ParallelConfig
from dsrun.quantize import QuantConfig
from dsrun.errors import UserError
from dsrun.loss import IGNORE_INDEX, attach_chunked_loss, chunked_cross_entropy, label_rows
from dsrun.adapters import add_adapters
from dsrun.model import architecture, build_model, weight_dtype
from dsrun.parallelize import decoder_blocks
from tests.conftest import FAST, dsrun, model_cfg, read_metrics


@pytest.mark.parametrize("masked", ["every_fifth", "none", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients(dtype, masked, monkeypatch):
    # 8 tokens a chunk under a frozen head, 16 (the hidden size) where the head trains: 3 chunks, the last short
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 50 * 8)
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[{"every_fifth": slice(None, None, 5), "none": slice(0, 0), "all": slice(None)}[masked]] = IGNORE_INDEX
    head_rows = []  # the rows whose logits the head computed: only the labelled ones
    elementwise = loss_module.chunk_elementwise
    monkeypatch.setattr(loss_module, "chunk_elementwise", lambda device, want_grad: (
        lambda logits, chunk_labels: head_rows.append(len(logits)) or elementwise(device, want_grad)(
            logits, chunk_labels)))
    grads = []
    rows = label_rows(labels)  # as dsrun/model_inputs.py passes them: None where every row has a label
    assert (rows is None) == (masked == "none")
    for fn in (lambda: chunked_cross_entropy(hidden, weight, labels, rows),
               lambda: F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX,
                                       reduction="sum")):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            value = fn()
        (0.5 * value).backward()
        grads.append((value.detach(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    (loss_a, gh_a, gw_a), (loss_b, gh_b, gw_b) = grads
    assert sum(head_rows) == int((labels != IGNORE_INDEX).sum())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gh_a, gh_b, rtol=tol, atol=tol)
    torch.testing.assert_close(gw_a, gw_b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["eager", "broken"])
def test_the_compiled_chunk_loss_equals_the_eager_one_and_a_compiler_failure_falls_back(backend, monkeypatch,
                                                                                       capsys):
    """The CUDA path traces `_loss_and_grad` with torch.compile (here through dynamo with the `eager` backend: the
    trace, not inductor's kernels); a backend that fails leaves a warning and the eager result."""
    def broken(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(loss_module, "COMPILE_BACKEND", "eager" if backend == "eager" else broken)
    monkeypatch.setattr(loss_module, "_fused", None)
    torch.manual_seed(0)
    logits = torch.randn(9, 50, dtype=torch.bfloat16)
    labels = torch.randint(0, 50, (9,))
    labels[::4] = IGNORE_INDEX
    for want_grad in (True, False):
        reference = loss_module.chunk_elementwise(torch.device("cpu"), want_grad)(logits.clone(), labels)
        got = loss_module.chunk_elementwise(torch.device("cuda"), want_grad)(logits.clone(), labels)
        torch.testing.assert_close(got[0], reference[0])
        if want_grad:
            torch.testing.assert_close(got[1], reference[1])
            assert got[1].dtype == torch.bfloat16
        else:
            assert got[1] is None
    warned = "did not compile" in capsys.readouterr().err
    assert warned == (backend == "broken")


def test_a_trained_head_gets_chunks_of_at_least_its_hidden_size():
    """Each chunk reads and writes the head's fp32 gradient once: 110-token chunks of a 152k vocabulary made the
    1.5B full fine-tune step 1.5x slower on an H200. A frozen head keeps the small chunks (the 8 GB cards' QLoRA)."""
    assert loss_module.chunk_tokens(152_064, 1536, trains_head=True) >= 1536
    assert loss_module.chunk_tokens(152_064, 3584, trains_head=False) == loss_module.CHUNK_ELEMENTS // 152_064


def _qlora_tiny(name: str, precision: str, method: str = "nf4"):
    cfg = model_cfg(name)
    model = build_model(cfg, architecture(cfg), seed=0, dtype=weight_dtype(precision, frozen=True),
                        quant_cfg=QuantConfig(name=method, method=method),
                        compute_dtype=weight_dtype(precision, frozen=True), device="cpu")
    return add_adapters(attach_chunked_loss(model), AdapterConfig(method="lora", r=4, alpha=8))


@pytest.mark.parametrize("name", ["tiny", "tiny_qwen2"])
def test_quantized_base_is_16_bit_where_not_quantized_and_only_adapters_learn(name):
    import bitsandbytes as bnb

    model = _qlora_tiny(name, "bf16-mixed")
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for n, p in base.named_parameters() if "norm" in n)
    blocks = decoder_blocks(base)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in blocks[0].modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    ids = torch.randint(0, 1000, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, count = model(input_ids=ids, labels=ids)
    assert int(count) == 32 and torch.isfinite(total)
    (total / count).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable


def test_random_quantized_build_is_seeded():
    a, b = (_qlora_tiny("tiny_qwen2", "bf16-mixed") for _ in range(2))
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(a(input_ids=ids, labels=ids)[0], b(input_ids=ids, labels=ids)[0])


@pytest.mark.parametrize("name", ["tiny", "tiny_qwen2"])
def test_offloaded_checkpointing_gives_the_gradients_of_plain_checkpointing(name):
    from dsrun.parallelize import parallelize

    grads = []
    for offload in (False, True):
        cfg = model_cfg(name)
        torch.manual_seed(0)
        model = add_adapters(attach_chunked_loss(build_model(cfg, architecture(cfg), seed=0)),  # dropout: RNG replayed
                             AdapterConfig(method="lora", r=4, alpha=8, dropout=0.1 if name == "tiny_qwen2" else 0.0))
        run = OmegaConf.structured({"parallel": ParallelConfig(activation_checkpointing=True,
                                                               offload_activations=offload),
                                    "precision": {"mode": "32-true"}, "train": {"compile": False}})
        parallelize(model, parallel=run.parallel, precision=run.precision, compile=False)
        model.train()
        ids = torch.randint(0, 1000, (2, 16))
        torch.manual_seed(1)  # the same dropout draws
        total, count = model(input_ids=ids, labels=ids)
        (total / count).backward()
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_plain_checkpointing_saves_only_block_inputs_under_autograd_and_nothing_without():
    """parallel.activation_checkpointing: a training forward keeps far fewer tensors for backward than the plain
    model; under no_grad (rollouts, eval) the block runs as is and keeps none."""
    from dsrun.parallelize import apply_activation_checkpointing, decoder_blocks

    def saved(model, grad: bool) -> int:
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        ids = torch.randint(0, 1000, (2, 16))
        with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids)
        return count[0]

    cfg = model_cfg("tiny_qwen2")
    plain = build_model(cfg, architecture(cfg), seed=0).train()
    checkpointed = build_model(cfg, architecture(cfg), seed=0).train()
    apply_activation_checkpointing(checkpointed, decoder_blocks(checkpointed))
    assert saved(checkpointed, grad=True) < saved(plain, grad=True) / 2
    assert saved(checkpointed, grad=False) == 0


def test_lora_targets_missing_from_the_model_are_named_with_the_real_layers():
    cfg = model_cfg("tiny_qwen2")
    model = build_model(cfg, architecture(cfg), seed=0)
    with pytest.raises(UserError) as err:
        add_adapters(model, AdapterConfig(method="lora", target_modules=["q_proj", "qkv_proj"]))
    message = str(err.value)
    assert "qkv_proj" in message and "q_proj" in message.split("linear layers are")[1] and "down_proj" in message


def test_an_embedding_kept_in_host_memory_trains_and_evaluates_exactly_as_on_the_device(tmp_path):
    """parallel.offload_embedding: the frozen table leaves the model (its rows travel with each batch) and the
    losses, eval losses and gradient norms are those of the same LoRA run with the table on the device."""
    rows = {}
    for offload in ("false", "true"):
        run_dir = tmp_path / offload
        proc = dsrun(*FAST, "adapter=lora", "train.max_steps=3", "data.eval_split=0.05", "train.eval_every=3",
                     f"parallel.offload_embedding={offload}", run_dir=run_dir)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows[offload] = [(r["loss"], r["grad_norm"], r.get("eval_loss")) for r in read_metrics(run_dir)]
    # equal to float32 rounding: the two placements sum in different orders (seen 2e-7 apart under load)
    assert len(rows["true"]) == len(rows["false"]) and rows["true"][-1][2] is not None, rows
    for on_host, on_device in zip(rows["true"], rows["false"]):
        assert [v is None for v in on_host] == [v is None for v in on_device], rows
        assert [v for v in on_host if v is not None] == pytest.approx([v for v in on_device if v is not None],
                                                                      rel=1e-5), rows


def test_a_model_folder_that_ties_its_embedding_to_the_head_cannot_offload_it():
    """validate() refuses tied fields up front; a pretrained folder's config.json is only read at build time, where
    offload_embedding refuses it (ConfigError: one line)."""
    from dsrun.errors import ConfigError
    from dsrun.model_inputs import offload_embedding

    cfg = model_cfg("tiny_qwen2")
    cfg.fields.tie_word_embeddings = True
    model = build_model(cfg, architecture(cfg), seed=0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with pytest.raises(ConfigError, match="ties its input embedding"):
        offload_embedding(model)


def test_model_inputs_name_the_labelled_rows_only_where_some_are_masked():
    """The loss skips unlabelled rows by positions counted on the host, where the batch is built (on the device the
    count would be a host sync every micro-batch)."""
    from dsrun.model_inputs import model_inputs

    ids = torch.zeros(2, 3, dtype=torch.long)
    masked = model_inputs(ids, torch.tensor([[IGNORE_INDEX, 5, 6], [7, IGNORE_INDEX, 8]]), None, torch.device("cpu"))
    assert masked["label_rows"].tolist() == [1, 2, 3, 5]
    assert "label_rows" not in model_inputs(ids, torch.ones(2, 3, dtype=torch.long), None, torch.device("cpu"))
