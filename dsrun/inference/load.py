"""One loader for inference: a run folder, an exported or Hugging Face folder, or the model option (random init).

Returns the model in eval mode on its device(s), its tokenizer and the context it can hold. `quant` and `precision`
apply; a model larger than the card is placed across GPU and CPU RAM within budgets (accelerate's max_memory).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from dsrun.data import has_tokenizer, load_tokenizer
from dsrun.errors import UserError
from dsrun.hardware import emulate_memory, gpu_catalog, host_memory_gib
from dsrun.model import NO_HUB_KERNELS, architecture, build_model, freeze, merged_model
from dsrun.parallelize import decoder_blocks
from dsrun.precision import PRECISIONS
from dsrun.quantize import bnb_config, quantize_linears
from dsrun.run.folder import read_lock

if TYPE_CHECKING:
    from dsrun.schema import RunConfig
    from dsrun.families import ModelConfig



@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    name: str  # what /v1/models lists and the console prints
    context: int  # positions the model holds (prompt + output)
    device: torch.device  # where inputs go (the first layer's device)
    kind: str  # run | run-adapter | folder | option


def compute_dtype(precision_mode: str) -> torch.dtype:
    """Inference runs in the training precision's compute dtype: fp32, or bf16/fp16 weights for mixed modes."""
    return getattr(torch, PRECISIONS[precision_mode].compute)


def describe(source: str | None) -> str:
    """What kind of source this is, checked before anything is built: run | folder | option."""
    if source is None:
        return "option"
    folder = Path(source).expanduser()
    if (folder / "config.yaml").is_file() and (folder / ".hydra").is_dir():
        if not (folder / "model").is_dir():
            raise UserError(f"task.source={source}: this run folder has no model/ (the run did not finish); "
                            f"finish it with `dsrun resume {source}`, then try again")
        return "run"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "folder"
    raise UserError(f"task.source={source}: not a run folder (config.yaml + model/) nor a model folder (config.json + "
                    "*.safetensors); pass a folder `dsrun train` wrote, one `dsrun export` wrote, or a Hugging Face "
                    "model folder")


def load(cfg: RunConfig) -> Loaded:
    """The model and tokenizer of cfg.task.source (or of cfg.model when it is null), ready to generate."""
    source = cfg.task.source
    kind = describe(source)
    device = torch.device("cuda" if cfg.hardware.accelerator == "cuda" else "cpu")
    dtype = compute_dtype(cfg.precision.mode)
    if device.type == "cuda":
        # hardware.emulate / memory_cap_gib: prove a small card's recipe on a big one
        emulate_memory(cfg.hardware, device)
    if kind == "option":
        model = _build(cfg.model, seed=cfg.train.seed, dtype=dtype, build_device=_build_device(cfg, device, dtype))
        tokenizer_folder, name = None, cfg.model.name
        model_cfg = cfg.model
    elif kind == "folder":
        assert source is not None  # describe(None) is "option"
        folder = Path(source).expanduser()
        model = _from_folder(folder, cfg, dtype, device)
        tokenizer_folder, name, model_cfg = folder, folder.name, cfg.model
    else:
        assert source is not None  # describe(None) is "option"
        run = Path(source).expanduser()
        model, model_cfg, kind = _from_run(run, cfg, dtype, device)
        tokenizer_folder, name = run / "model", run.name
    if getattr(model, "hf_device_map", None) is None:  # from_pretrained placed (and quantized) it already
        model = place(model, cfg, device)
    if device.type == "cpu":
        keep_4bit_layout(model)
    model.eval()
    model.config.use_cache = True
    tokenizer = _tokenizer(tokenizer_folder, model_cfg)
    context = int(getattr(model.config, "max_position_embeddings", 0) or model_cfg.max_seq_len)
    first = next(model.parameters()).device
    print(f"dsrun: loaded {name} ({kind}) on {first}, {dtype}, quant={cfg.quant.method}, context {context:,}",
          file=sys.stderr)
    return Loaded(model, tokenizer, cfg.serve.model_name or name, context, first, kind)


def keep_4bit_layout(model: Any) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its own kernel at the first forward in eval
    mode, and the repacking fails on weights narrower than a quantization block (the tiny models' 32-wide
    projections: `generate quant=nf4` stopped with a reshape error). The plain 4-bit path serves every shape."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _build(model_cfg: ModelConfig, seed: int, dtype: torch.dtype, build_device: torch.device | None) -> Any:
    """The model option, built as training builds it (dsrun.model), on the device it will run on when it fits."""
    arch = architecture(model_cfg)
    with torch.device(build_device or "cpu"):
        return build_model(model_cfg, arch, seed=seed, dtype=dtype)


def _from_folder(folder: Path, cfg: RunConfig, dtype: torch.dtype, device: torch.device) -> Any:
    """A Hugging Face folder (an exported one is one): transformers loads, quantizes and places it as it reads."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True,
                              "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.quant.method != "none":
        kwargs["quantization_config"] = bnb_config(cfg.quant, dtype)
    if device.type == "cuda":
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = max_memory(cfg)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **NO_HUB_KERNELS, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"task.source={folder}: cannot load it: {str(exc).splitlines()[0]}") from None


def _from_run(run: Path, cfg: RunConfig, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, str]:
    """A run folder: model/ holds full weights, or a LoRA adapter over the base the run built (rebuilt the same
    way: dsrun.model with the run's seed, dtype and device, which random init depends on), merged for speed."""
    from omegaconf import OmegaConf

    read_lock(run)
    snap = OmegaConf.load(run / "config.yaml")
    model_cfg = snap.model
    model_cfg.experts_implementation = cfg.model.experts_implementation  # kernels of this machine, not the run's
    weights = run / "model"
    if (weights / "adapter_config.json").is_file():
        return merged_model(run, dtype)[0], model_cfg, "run-adapter"
    if not (weights / "config.json").is_file():
        raise UserError(f"task.source={run}: model/ holds neither full weights (config.json) nor a LoRA adapter "
                        "(adapter_config.json); the run did not save its weights")
    return _from_folder(weights, cfg, dtype, device), model_cfg, "run"


def max_memory(cfg: RunConfig) -> dict[Any, str]:
    """Budgets for accelerate: the GPU(s) up to the hardware profile's memory (or the card), the rest in host RAM."""
    hw = cfg.hardware
    budgets: dict[Any, str] = {}
    for index in range(torch.cuda.device_count()):
        card = torch.cuda.get_device_properties(index).total_memory / 2**30
        cap = hw.memory_cap_gib or (gpu_catalog()[hw.gpu]["vram_gib"] if hw.emulate and hw.gpu else None)
        budgets[index] = f"{0.9 * min(card, cap or card):.2f}GiB"  # headroom for the KV cache and activations
    budgets["cpu"] = f"{0.8 * host_memory_gib():.2f}GiB"
    return budgets


def _build_device(cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> torch.device:
    """Build on the GPU when the 16-bit weights fit its budget (fast); else on the CPU, and place() moves them."""
    if device.type != "cuda":
        return device

    arch = architecture(cfg.model)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(arch).parameters()) * dtype.itemsize
    budget = float(max_memory(cfg)[0].removesuffix("GiB")) * 2**30
    return device if size < budget else torch.device("cpu")


def place(model: Any, cfg: RunConfig, device: torch.device) -> Any:
    """Quantize (cfg.quant) and put the model on the device. Quantized: block by block, each quantized as it lands
    on the GPU (the 16-bit model is never whole there). Not quantized and larger than the card: across GPU(s) and
    CPU RAM within max_memory (accelerate's device map)."""
    if cfg.quant.method != "none":  # 4/8-bit weights are placed whole on the GPU (a quarter/half the size)
        for block in decoder_blocks(model):
            block.to(device)
            quantize_linears(block, cfg.quant, compute_dtype(cfg.precision.mode))
        return freeze(model.to(device))
    if device.type != "cuda":
        return model
    from accelerate import dispatch_model, infer_auto_device_map

    no_split = list({name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())})
    device_map = infer_auto_device_map(model, max_memory=max_memory(cfg), no_split_module_classes=no_split)
    if set(device_map.values()) <= {0, "cuda:0"}:
        return model.to(device)
    print(f"dsrun: the weights do not fit on the GPU: placing them across {sorted(set(map(str, device_map.values())))}",
          file=sys.stderr)
    return dispatch_model(model, device_map=device_map)


def _tokenizer(folder: Path | None, model_cfg: ModelConfig) -> Any:
    """The folder's own tokenizer when it has one, else the model option's (dsrun.data.load_tokenizer)."""
    if has_tokenizer(folder):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    if model_cfg.tokenizer == "model" and not model_cfg.path:
        from omegaconf import OmegaConf

        model_cfg = cast("ModelConfig", OmegaConf.merge(model_cfg, {"tokenizer": "deepseek"}))
    return load_tokenizer(model_cfg)
