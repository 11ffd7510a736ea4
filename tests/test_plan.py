"""The planner (task=plan): hand-computed bytes, exact parameter counts, activations measured on CPU, the GPU
measurements of ../shared/anchors, re-planned suggestions, every model option, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from dsrun.config import validate
from dsrun.schema import register_configs
from dsrun.errors import ConfigError
from dsrun.hardware import gpu_catalog
from dsrun.plan import plan
from dsrun.plan.assumptions import GIB
from dsrun.plan.memory import Dtypes, block_activations, bytes_per_param, kv_bytes_per_token_layer
from dsrun.plan.overrides import apply_overrides
from dsrun.plan.search import with_suggestions
from dsrun.plan.shape import model_shape
from dsrun.resolve import resolve
from tests.conftest import REPO, assert_user_error, dsrun

CONF = REPO / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
LLAMA2_13B = ["model=r1_distill_llama_8b", "model.fields.hidden_size=5120", "model.fields.num_hidden_layers=40",
              "model.fields.num_attention_heads=40", "model.fields.num_key_value_heads=40",
              "model.fields.intermediate_size=13824", "model.fields.vocab_size=32000"]


def planned(*overrides: str, suggest: bool = False):
    """(config, plan) of `task=plan overrides`, composed, resolved and validated as the CLI does."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task=plan", *overrides])
    resolve(cfg)
    validate(cfg, gpu_catalog())
    return cfg, (with_suggestions if suggest else plan)(cfg)


# --- hand-computed cases ----------------------------------------------------------------------------------------

def test_bytes_per_parameter_by_precision_and_strategy():
    cfg, _ = planned("model=tiny", "hardware=1xh100", "precision=bf16")
    assert sum(bytes_per_param(cfg).values()) == 16  # mixed-precision Adam: fp32 weights, grads, 2 moments
    assert sum(bytes_per_param(apply_overrides(cfg, ["parallel=zero2"])).values()) == 16  # 2 + 2 + 12 (ZeRO)
    assert bytes_per_param(apply_overrides(cfg, ["parallel=zero2"]))["optimizer"] == 12
    assert sum(bytes_per_param(apply_overrides(cfg, ["precision=bf16_true"])).values()) == 8
    assert sum(bytes_per_param(apply_overrides(cfg, ["precision=fp32", "optim=sgd"])).values()) == 12


def test_fp32_weights_are_four_bytes_per_parameter():
    _, p = planned("model=r1_distill_qwen_7b", "hardware=1xh100", "precision=fp32")
    total = p.parameters["total"]
    assert p.components["weights"] * GIB == 4 * total  # 7.6 B x 4 bytes
    assert p.components["optimizer_states"] * GIB == 8 * total
    assert p.components["compute_copy"] == 0


def test_zero3_over_four_gpus_divides_weights_gradients_and_states_by_four():
    _, p = planned("model=r1_distill_qwen_7b", "hardware=8xh100", "hardware.devices=4", "precision=bf16",
                   "parallel=zero3")
    _, z2 = planned("model=r1_distill_qwen_7b", "hardware=8xh100", "hardware.devices=4", "precision=bf16",
                    "parallel=zero2")
    total = p.parameters["total"]
    assert p.components["weights"] * GIB == pytest.approx(2 * total / 4)
    assert p.components["gradients"] * GIB == pytest.approx(2 * total / 4)
    assert p.components["optimizer_states"] * GIB == pytest.approx(12 * total / 4)
    assert z2.components["weights"] * GIB == pytest.approx(2 * total)  # ZeRO-2 keeps whole weights
    assert z2.components["optimizer_states"] == pytest.approx(p.components["optimizer_states"])
    assert p.components["gathered"] > 0 and z2.components["gathered"] == 0


def test_seed_004_thirteen_billion_parameters_in_fp16_and_4_bit():
    """Seed 004: a 13B model takes 26 GB in fp16 and 6.5 GB in 4-bit (plus the quantization constants)."""
    _, fp16 = planned(*LLAMA2_13B, "hardware=1xh100", "precision=bf16", "plan=inference")
    assert fp16.parameters["total"] == 13_015_864_320  # Llama-2-13B's published count
    assert fp16.components["weights"] * GIB / 1e9 == pytest.approx(26.0, rel=0.01)
    _, nf4 = planned(*LLAMA2_13B, "hardware=1xh100", "precision=bf16", "plan=inference", "quant=nf4")
    matmul = nf4.parameters["total"] - 2 * 32000 * 5120 - (2 * 40 + 1) * 5120  # embedding, head, norms
    assert nf4.components["weights"] * GIB == pytest.approx(matmul * 0.5 + (fp16.parameters["total"] - matmul) * 2)
    assert matmul * 0.5 / 1e9 == pytest.approx(6.4, abs=0.1)
    assert nf4.components["quant_constants"] * GIB == pytest.approx(matmul * (1 / 64 + 4 / (64 * 256)))  # 0.127 bit


# --- the models, counted exactly ---------------------------------------------------------------------------------

PUBLISHED = {"r1_distill_qwen_7b": 7.6e9, "r1_distill_qwen_14b": 14.8e9, "r1_distill_qwen_32b": 32.8e9,
             "r1_distill_llama_8b": 8.0e9, "deepseek_v2_lite": 15.7e9, "deepseek_r1": 671e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(name):
    _, p = planned(f"model={name}", "hardware=cpu")
    assert p.parameters["total"] == pytest.approx(PUBLISHED[name], rel=0.01)


def test_exact_count_and_active_parameters_of_moe_models():
    _, small = planned("model=r1_distill_qwen_1_5b", "hardware=cpu")
    assert small.parameters["total"] == 1_777_088_000  # measured, ../shared/models.md
    # DeepSeek's "activated" counts leave out the input embedding (a lookup), as active_matmul_params does
    _, r1 = planned("model=deepseek_r1", "hardware=cpu")
    assert r1.parameters["active"] / 1e9 == pytest.approx(37, rel=0.03)
    _, lite = planned("model=deepseek_v2_lite", "hardware=cpu")
    assert lite.parameters["active"] / 1e9 == pytest.approx(2.4, rel=0.03)


# --- activations: the formula against tensors really saved for backward on CPU ---------------------------------

class _FusedAttention(torch.autograd.Function):
    """What a fused GPU attention kernel keeps for backward: q, k, v and the output (CPU's math path keeps the
    whole score matrix, which no GPU run does)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        with torch.no_grad():
            repeat = q.shape[1] // k.shape[1]
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1),
                                                 is_causal=True, scale=scale)
        ctx.save_for_backward(q, k, v, out)
        return out


def _fused_attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
    if torch.is_autocast_enabled("cpu"):  # SDPA is an autocast op: it saves low-precision casts
        q, k, v = (t.to(torch.get_autocast_dtype("cpu")) for t in (q, k, v))
    return _FusedAttention.apply(q, k, v, scaling).transpose(1, 2), None


def _saved_bytes_per_token(arch: str, fields: dict, mode: str, layer: int) -> float:
    """Bytes block `layer` saves for backward per token: the difference between 400 and 200 tokens, so weights
    (and their autocast copies) cancel out."""
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

    AttentionInterface.register("fused_test", _fused_attention)
    config = AutoConfig.for_model(arch, **fields)
    config._attn_implementation = "fused_test"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if mode == "bf16-true":
        model = model.to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved(tokens: int) -> int:
        storages: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, config.vocab_size, (1, tokens))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-mixed"):
            x = model.model.embed_tokens(ids)
            model.model.layers[layer](x, position_embeddings=model.model.rotary_emb(x, torch.arange(tokens)[None]),
                                      attention_mask=None)
        return sum(storages.values())

    return (saved(400) - saved(200)) / 200


QWEN = dict(vocab_size=1000, hidden_size=512, intermediate_size=1408, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=2)
V3 = dict(vocab_size=1000, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256, num_hidden_layers=2,
          num_attention_heads=8, num_key_value_heads=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
          first_k_dense_replace=1, q_lora_rank=192, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64,
          v_head_dim=64, n_group=1, topk_group=1)
V2 = dict(V3, q_lora_rank=None, n_shared_experts=2, topk_method="greedy")
DTYPES = {"32-true": Dtypes(4, 4, False), "bf16-mixed": Dtypes(2, 4, True), "bf16-true": Dtypes(2, 2, False)}
CASES = [("qwen2", QWEN, mode, 0) for mode in DTYPES] + \
        [(arch, f, mode, layer) for arch, f in (("deepseek_v3", V3), ("deepseek_v2", V2))
         for mode in DTYPES for layer in (0, 1)]


@pytest.mark.parametrize("arch,fields,mode,layer", CASES, ids=[f"{c[0]}-{c[2]}-layer{c[3]}" for c in CASES])
def test_block_activations_match_what_autograd_saves(arch, fields, mode, layer):
    from transformers import AutoConfig

    measured = _saved_bytes_per_token(arch, fields, mode, layer)
    config = AutoConfig.for_model(arch, **fields)
    replicated, split = block_activations(config, moe=layer >= fields.get("first_k_dense_replace", 99), d=DTYPES[mode])
    assert replicated + split == pytest.approx(measured, rel=0.06)


# --- the GPU measurements of ../shared/anchors (one H100 80 GB) --------------------------------------------------

def _allocated_gib(p) -> float:
    """What torch.cuda.max_memory_allocated counts: neither the CUDA context nor the allocator's cache."""
    return p.total_gib - p.components["cuda_context"] - p.components["allocator"]


def test_dense_training_anchor_memory_and_speed():
    """dense_hf.py: R1-Distill-Qwen-1.5B shape, bf16 autocast, fused AdamW, micro-batch 4 x 2048 tokens:
    62 GiB allocated, 30,312 tokens/s eager."""
    _, p = planned("model=r1_distill_qwen_1_5b", "hardware=1xh100", "precision=bf16", "train.micro_batch=4",
                   "train.seq_len=2048")
    # the anchor's loss holds whole logits (fp32 copy, log-softmax, fp32 gradient: 12 bytes x vocabulary per token
    # once its bf16 logits are dropped); dsrun's chunked loss holds one chunk (dsrun/loss.py)
    anchor_loss = 4 * 2048 * 151_936 * 12 / GIB
    assert _allocated_gib(p) - p.components["logits_loss"] + anchor_loss == pytest.approx(62.0, rel=0.05)
    assert p.tokens_per_s == pytest.approx(30_312, rel=0.2)


@pytest.mark.parametrize("quant,batch,measured_gib", [("none", 1, 14.3), ("none", 8, 15.0), ("int8", 1, 8.6),
                                                      ("nf4", 1, 5.4), ("nf4", 8, 6.0)])
def test_inference_anchor_memory(quant, batch, measured_gib):
    """infer_hf.py: R1-Distill-Qwen-7B shape, 512-token prompts + 256 new tokens."""
    _, p = planned("model=r1_distill_qwen_7b", "hardware=1xh100", "precision=bf16", "plan=inference",
                   f"quant={quant}", "plan.context=768", f"plan.batch={batch}")
    assert _allocated_gib(p) == pytest.approx(measured_gib, rel=0.08)


def test_inference_kv_cache_holds_the_mla_latent():
    cfg, p = planned("model=deepseek_r1", "hardware=8xh100", "precision=bf16", "plan=inference", "plan.context=8192",
                     "plan.batch=2")
    config = model_shape(cfg.model).model.config
    assert kv_bytes_per_token_layer(config, 2) == (512 + 64) * 2  # kv_lora_rank + qk_rope_head_dim, bf16
    assert p.components["kv_cache"] * GIB == pytest.approx(2 * 8192 * 61 * 1152 / 8)
    cfg7, _ = planned("model=r1_distill_qwen_7b", "hardware=cpu")
    assert kv_bytes_per_token_layer(model_shape(cfg7.model).model.config, 2) == 2 * 4 * 128 * 2  # k and v, GQA


# --- plans, suggestions, the API --------------------------------------------------------------------------------

def test_plan_is_json_and_its_components_sum_to_the_total():
    _, p = planned("model=r1_distill_qwen_1_5b", "hardware=4x4090", "parallel=fsdp", "precision=bf16",
                   "train.seq_len=128")  # the model's default 2048 at micro-batch 4 does not fit a 4090
    assert sum(p.components.values()) == pytest.approx(p.total_gib)
    data = json.loads(json.dumps(p.to_dict()))
    assert data["fits"] is True and data["vram_gib"] == 24 and data["tokens_per_s"] > 0
    assert data["usd_per_million_tokens"] > 0 and data["suggestions"] == []


def test_each_suggestion_is_the_plan_of_its_overrides():
    cfg, p = planned("model=r1_distill_qwen_7b", "hardware=4x4090", "parallel=fsdp", "precision=bf16",
                     "train.micro_batch=8", suggest=True)
    assert not p.fits and p.suggestions
    assert any(s.fits and not s.hardware_usd for s in p.suggestions)  # a software fix exists
    assert any(s.fits and s.hardware_usd for s in p.suggestions)  # and a hardware one
    for s in p.suggestions:
        keys = [o.split("=", 1)[0] for o in s.overrides]
        assert len(keys) == len(set(keys)), f"a key given twice: {s.overrides}"  # copied to a command line as is
        again = plan(apply_overrides(cfg, s.overrides))
        assert (again.fits, again.total_gib) == (s.fits, pytest.approx(s.total_gib)), s.overrides
        if any(o.startswith("train.micro_batch") for o in s.overrides) and not s.hardware_usd:
            assert again.recipe["global_batch"] == p.recipe["global_batch"]  # same global batch


def test_activation_checkpointing_and_smaller_micro_batches_save_activation_memory():
    _, full = planned("model=r1_distill_qwen_7b", "hardware=1xh100", "precision=bf16", "train.seq_len=2048")
    _, ckpt = planned("model=r1_distill_qwen_7b", "hardware=1xh100", "precision=bf16", "train.seq_len=2048",
                      "parallel.activation_checkpointing=true")
    _, small = planned("model=r1_distill_qwen_7b", "hardware=1xh100", "precision=bf16", "train.seq_len=2048",
                       "train.micro_batch=1", "train.accumulation=4")
    assert ckpt.components["activations"] < full.components["activations"] / 10
    assert small.components["activations"] == pytest.approx(full.components["activations"] / 4)
    assert ckpt.tokens_per_s < full.tokens_per_s  # the recomputed forward costs time


def test_offload_moves_states_to_host_ram_and_costs_time():
    _, fsdp = planned("model=r1_distill_qwen_7b", "hardware=4x4090", "parallel=fsdp", "precision=bf16")
    _, off = planned("model=r1_distill_qwen_7b", "hardware=4x4090", "parallel=fsdp", "precision=bf16",
                     "parallel.offload=true")
    assert off.components["optimizer_states"] == 0 and off.total_gib < fsdp.total_gib
    assert off.host_gib == pytest.approx(4 * 16 * off.parameters["total"] / 4 / GIB)  # 4 ranks' shards
    assert off.tokens_per_s < fsdp.tokens_per_s


@pytest.mark.parametrize("model", MODELS)
def test_every_model_plans_on_every_kind_of_hardware(model):
    for hardware in ("cpu", "1x3060", "4x4090", "2node_4060", "8xh100"):
        for mode in ("train", "inference"):
            _, p = planned(f"model={model}", f"hardware={hardware}", f"plan.mode={mode}",
                           suggest=hardware == "1x3060" and mode == "train")
            assert p.total_gib > 0 and p.tokens_per_s > 0 and p.verdict
            assert p.fits == (p.total_gib <= p.vram_gib)
            if not p.fits and hardware == "1x3060" and mode == "train":
                assert p.suggestions, model


def test_cpu_plans_host_ram():
    _, p = planned("model=tiny", "hardware=cpu")
    assert p.fits and "host RAM" in p.verdict and "cuda_context" not in p.components
    assert p.usd_per_million_tokens is None


def test_tensor_parallel_splits_the_projections():
    _, fsdp = planned("model=r1_distill_qwen_7b", "hardware=4x4090", "parallel=fsdp", "precision=bf16")
    _, tp = planned("model=r1_distill_qwen_7b", "hardware=4x4090", "parallel=tp", "precision=bf16")
    # same number of pieces in all; the embedding and head are split 2 ways under TP 2 x FSDP 2, not 4
    assert fsdp.components["weights"] < tp.components["weights"] < 2 * fsdp.components["weights"]
    assert tp.components["activations"] < fsdp.components["activations"]


# --- the command line ------------------------------------------------------------------------------------------

def test_r1_on_a_3060_says_plainly_what_it_needs(tmp_path):
    proc = dsrun("task=plan", "model=deepseek_r1", "hardware=1x3060", "quant=nf4", "adapter=lora",
                 "train.seq_len=128", run_dir=tmp_path / "run", timeout=120)  # short rows: some cluster holds it
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "does not fit: needs" in out and "RTX 3060 12GB has 12.0 GiB" in out
    assert "no change of settings makes it fit on this hardware" in out
    assert "holds it:" in out and "H200" in out
    assert "offload (parallel=zero3_offload" in out and "GiB of host RAM per node; does not fit either" in out


def test_json_output_for_sweeps(tmp_path):
    proc = dsrun("task=plan", "model=deepseek_r1", "hardware=1x3060", "quant=nf4", "adapter=lora", "plan.json=true",
                 run_dir=tmp_path / "run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert json.loads((tmp_path / "run" / "plan.json").read_text()) == data  # kept in the run folder too
    assert data["fits"] is False and data["total_gib"] > 300 and data["vram_gib"] == 12
    holds = [s for s in data["suggestions"] if s["fits"]]
    assert holds and all(s["hardware_usd"] > 0 and s["total_gib"] <= s["vram_gib"] for s in holds)
    offload = [s for s in data["suggestions"] if "parallel=zero3_offload" in s["overrides"]]
    assert offload and offload[0]["host_gib"] > 300 and not offload[0]["fits"]


@pytest.mark.parametrize("overrides,fragments", [
    (["hardware=1x3060", "hardware.gpu=rtx9090"], ["hardware.gpu=rtx9090", "known:", "rtx4090"]),
    (["hardware=4x4090", "hardware.devices=0"], ["hardware.devices=0", ">= 1"]),
    (["train.micro_batch=-1"], ["train.micro_batch=-1"]),
    (["plan.mode=inference", "plan.batch=0"], ["plan.batch=0"]),
    (["plan.mode=fly"], ["plan.mode=fly", "train, dpo, grpo, inference"]),
], ids=["unknown gpu", "zero devices", "negative micro-batch", "zero batch", "bad mode"])
def test_bad_input_is_one_line_exit_2(overrides, fragments, tmp_path):
    proc = dsrun("task=plan", *overrides, run_dir=tmp_path / "run", timeout=60)
    assert_user_error(proc, *fragments)
    assert len(proc.stderr.strip().splitlines()) == 1


def test_plan_settings_are_validated():
    with pytest.raises(ConfigError) as exc:
        planned("plan.mfu=1.5", "plan.lifetime_years=0", "hardware.num_nodes=-2")
    assert [p.split(":")[0] for p in exc.value.problems] == ["hardware.num_nodes=-2", "plan.lifetime_years=0.0",
                                                              "plan.mfu=1.5"]


def test_small_steps_are_host_bound_and_the_optimizer_streams_its_state():
    from dsrun.plan.assumptions import HOST_AUTOCAST_FACTOR, HOST_BLOCK_FORWARD_S, STEP_BANDWIDTH_EFFICIENCY
    from dsrun.plan.speed import host_time, optimizer_time

    base = ["model=r1_distill_qwen_1_5b", "hardware=1xh100", "precision=bf16", "train.micro_batch=1"]
    cfg, short = planned(*base, "train.seq_len=128")
    _, longer = planned(*base, "train.seq_len=256")
    assert longer.step_time_s == pytest.approx(short.step_time_s, rel=0.02)  # the host issues the same ops
    shape = model_shape(cfg.model)
    assert host_time(cfg, shape, gpu_catalog()["h100_sxm"]) == pytest.approx(
        28 * HOST_BLOCK_FORWARD_S * HOST_AUTOCAST_FACTOR)
    # fused AdamW on fp32 weights and moments, clipping inside it, + the norm's read of fp32 gradients: 32 bytes
    # per parameter; 40 under fp16, whose scaler leaves clipping a pass of its own
    seconds = optimizer_time(cfg, shape, gpu_catalog()["h100_sxm"], {})
    assert seconds == pytest.approx(shape.total * 32 / (3350e9 * STEP_BANDWIDTH_EFFICIENCY), rel=0.01)
    fp16, _ = planned(*base, "train.seq_len=128", "precision=fp16")
    seconds = optimizer_time(fp16, shape, gpu_catalog()["h100_sxm"], {})
    assert seconds == pytest.approx(shape.total * 40 / (3350e9 * STEP_BANDWIDTH_EFFICIENCY), rel=0.01)
    _, big = planned(*base, "train.seq_len=2048", "train.micro_batch=4")  # here the GPU decides
    assert big.step_time_s > 1.5 * longer.step_time_s


def test_inference_plan_with_offload_keeps_what_does_not_fit_in_host_ram():
    # an FSDP-offload term copied into the inference planner once named a variable it does not have
    _, p = planned("model=r1_distill_qwen_7b", "hardware=1x3060", "plan.mode=inference", "parallel.offload=true")
    assert p.host_components["weights"] > 0 and p.total_gib <= p.vram_gib


def test_fast_exit_loses_no_output(tmp_path):
    """`python -m dsrun` leaves through os._exit (no module teardown): with stdout a block-buffered pipe, as under
    `| jq`, the whole JSON must still arrive, and a user error must still exit 2."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    argv = [sys.executable, "-m", "dsrun", "task=plan", "model=deepseek_r1", "hardware=1x3060", "plan.json=true",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads((tmp_path / "run" / "plan.json").read_text())
    bad = subprocess.run([*argv, "plan.mode=fly"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert_user_error(bad, "plan.mode=fly")


def test_the_plan_matrix_tool_plans_every_recipe(tmp_path):
    """bench/plan_matrix.py, the before/after check of refactors that must not change the planner (issue #29)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "bench/plan_matrix.py", "--out", str(tmp_path / "plans.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdicts = json.loads((tmp_path / "plans.json").read_text())
    recipes = {f"+recipe={p.stem}" for p in (REPO / "recipes").glob("*.yaml")}
    assert set(verdicts) == recipes and all(v["fits"] for v in verdicts.values()), proc.stdout
