"""The bad-input catalog (docs/bad-inputs.md): each case stops with one line per problem naming the key or file and
the fix, exit 2, no traceback, and nothing saved before is lost."""

from __future__ import annotations

import contextlib

import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, assert_user_error, dsrun

VERBS = ("resume", "replay", "runs", "rollback", "diff", "export", "doctor", "generate", "report")
ROWS = [
    # id, category, arguments ({tmp}, {ckpt}, {run} and {clone} are filled in), fragments the message names;
    # a row that starts with a verb runs `dsrun <verb> ...` as given, any other gets BASE in front
    ("unknown-option", "config", ["hardware=4x409"], ["hardware=4x409", "did you mean hardware=4x4090"]),
    ("typo-key", "config", ["train.max_step=5"], ["train.max_step", "did you mean train.max_steps"]),
    ("dpo-beta-not-positive", "config", ["task=dpo", "task.beta=0"], ["task.beta=0", "> 0"]),
    ("dpo-unknown-loss", "config", ["task=dpo", "task.loss=kto"], ["task.loss=kto", "sigmoid, ipo"]),
    ("preference-without-rejected", "data", ["task=dpo", "data=jsonl", "data.path={tmp}/norejected.jsonl"],
     ["norejected.jsonl:1", "needs `chosen` and `rejected`"]),
    ("typo-group", "config", ["trian.max_steps=5"], ["trian.max_steps", "did you mean train.max_steps?"]),
    ("wrong-type", "config", ["train.max_steps=many"], ["train.max_steps=many", "Integer"]),
    ("zero-micro-batch", "config", ["train.micro_batch=0"], ["train.micro_batch=0", ">= 1"]),
    ("negative-seq-len", "config", ["train.seq_len=-8"], ["train.seq_len=-8"]),
    ("zero-devices", "config", ["hardware.devices=0"], ["hardware.devices=0"]),
    ("negative-lr", "config", ["train.lr=-1"], ["train.lr=-1"]),
    ("profile-longer-than-run", "config", ["train.profile_steps=4", "train.max_steps=5"],
     ["train.profile_steps=4", "train.max_steps >= 6"]),
    ("seq-len-above-model-max", "config", ["train.seq_len=4096"], ["train.seq_len=4096", "maximum of 2048"]),
    ("deepspeed-on-cpu", "config", ["parallel=zero3"], ["DeepSpeed needs CUDA"]),
    ("fp16-on-cpu", "config", ["precision=fp16"], ["precision=fp16", "bf16"]),
    ("fp8-without-fp8-gpu", "config", ["hardware=1x3060", "precision=fp8"], ["no FP8"]),
    ("single-with-two-processes", "config", ["hardware.devices=2", "parallel=single"], ["parallel=ddp"]),
    ("quant-without-adapter", "config", ["quant=nf4"], ["adapter=lora"]),
    ("quantized-base-sharded", "config", ["quant=nf4", "adapter=lora", "parallel=fsdp"], ["parallel=ddp"]),
    ("export-without-out", "config", ["task=export", "task.source=outputs"], ["task=export needs", "task.out"]),
    ("out-outside-export", "config", ["task.out=/tmp/x"], ["task.out", "only export"]),
    ("8bit-optimizer-sharded", "config", ["optim=adamw8bit", "parallel=fsdp", "hardware.devices=2"],
     ["optim=adamw8bit with parallel=fsdp", "parallel=single or ddp"]),
    ("offload-embedding-that-trains", "config", ["parallel.offload_embedding=true"],
     ["parallel.offload_embedding=true", "adapter=lora"]),
    ("offload-embedding-tied-to-head", "config", ["parallel.offload_embedding=true", "adapter=lora",
                                                  "model.fields.tie_word_embeddings=true"],
     ["ties its input embedding", "parallel.offload_embedding=false"]),
    ("bf16-reduce-outside-fsdp", "config", ["parallel.reduce_dtype=bf16"],
     ["parallel.reduce_dtype=bf16 with parallel=single", "parallel.reduce_dtype=fp32"]),
    ("jsonl-without-path", "config", ["data=jsonl"], ["data.path"]),
    ("unknown-gpu", "config", ["hardware.gpu=rtx9090"], ["rtx9090", "rtx4090"]),
    ("doctor-sizes-reversed", "config", ["task=doctor", "doctor.min_bytes=64", "doctor.max_bytes=4"],
     ["doctor.max_bytes=4", "doctor.min_bytes (64)"]),
    ("pretrained-without-path", "config", ["model.init=pretrained"], ["model.path"]),
    ("unknown-task", "config", ["task.name=fly"], ["task.name=fly"]),
    ("bench-quant-named-twice", "config", ["task=bench_infer", "quant=int8", "bench_infer.quants=[none]"],
     ["quant=int8 and bench_infer.quants=['none']", "name the quant options once"]),
    ("unknown-serve-reasoning", "config", ["task=serve", "serve.reasoning=hide"],
     ["serve.reasoning=hide", "choose one of split, inline"]),
    ("tp-not-dividing-heads", "config", ["model=tiny_qwen2", "hardware.devices=3", "parallel=tp",
                                         "parallel.tensor_parallel_size=3"], ["tensor_parallel_size=3", "4 attention"]),
    ("tensor-parallel-size-without-tp", "config", ["model=tiny_qwen2", "hardware.devices=2", "parallel=fsdp",
                                                  "parallel.tensor_parallel_size=2"],
     ["parallel.tensor_parallel_size=2 with parallel=fsdp", "use parallel=tp"]),
    ("emulate-without-gpu", "config", ["hardware.emulate=true"], ["hardware.emulate=true", "GPU hardware option"]),
    ("eval-split-outside-0-1", "config", ["data.eval_split=1.5"], ["data.eval_split=1.5", "between 0 and 1"]),
    ("epochs-and-max-steps", "config", ["train.epochs=2"], ["train.epochs=2 with train.max_steps=2",
                                                             "train.max_steps=null"]),
    ("bad-architecture-field", "config", ["model.fields.hidden_size=abc"], ["model.fields", "hidden_size"]),
    ("nan-lr", "config", ["train.lr=nan"], ["train.lr=nan", "finite"]),
    ("infinite-lr", "config", ["train.lr=inf"], ["train.lr=inf", "finite"]),
    ("fractional-micro-batch", "config", ["train.micro_batch=1.5"], ["train.micro_batch=1.5", "whole number"]),
    ("list-micro-batch", "config", ["train.micro_batch=[1,2]", "train.global_batch=8"],
     ["train.micro_batch=[1, 2]", "whole number"]),
    ("fractional-layer-count", "config", ["model.fields.num_hidden_layers=2.5"],
     ["model.fields.num_hidden_layers=2.5", "whole number"]),
    ("negative-model-dimension", "config", ["model.fields.hidden_size=-8"], ["model.fields.hidden_size=-8"]),
    ("beta-out-of-range", "config", ["optim.betas=[0.9,1.5]"], ["optim.betas", "[0, 1)"]),
    ("one-beta", "config", ["optim.betas=[0.9]"], ["optim.betas=[0.9]", "two numbers"]),
    ("negative-eps", "config", ["optim.eps=-1"], ["optim.eps=-1.0", "> 0"]),
    ("negative-weight-decay", "config", ["optim.weight_decay=-0.1"], ["optim.weight_decay=-0.1", ">= 0"]),
    ("negative-grad-clip", "config", ["optim.grad_clip=-1"], ["optim.grad_clip=-1.0"]),
    ("sgd-momentum-out-of-range", "config", ["optim=sgd", "optim.momentum=1.5"], ["optim.momentum=1.5", "[0, 1)"]),
    ("momentum-under-adamw", "config", ["optim.momentum=0.5"], ["optim.momentum", "optim=sgd"]),
    ("router-bias-rate-without-v3-routers", "config", ["model=tiny_qwen2", "optim.router_bias_rate=0.01"],
     ["optim.router_bias_rate", "model.arch=qwen2 does not use it"]),
    ("betas-under-sgd", "config", ["optim=sgd", "optim.betas=[0.9,0.9]"], ["optim.betas", "optim=adamw"]),
    ("seed-too-large", "config", ["train.seed=99999999999999999999"], ["train.seed=", "4294967295"]),
    ("negative-data-seed", "config", ["data.seed=-5"], ["data.seed=-5"]),
    ("nan-memory-cap", "config", ["hardware.memory_cap_gib=nan"], ["hardware.memory_cap_gib=nan", "finite"]),
    ("lora-rank-zero", "config", ["adapter=lora", "adapter.r=0"], ["adapter.r=0"]),
    ("lora-dropout-above-one", "config", ["adapter=lora", "adapter.dropout=1.5"], ["adapter.dropout=1.5"]),
    ("lora-dropout-on-moe-experts", "config", ["adapter=lora", "adapter.dropout=0.1"],
     ["adapter.dropout=0.1 with model=tiny", "adapter.dropout=0"]),
    ("port-out-of-range", "config", ["monitor=prometheus", "monitor.prometheus.port=70000"],
     ["monitor.prometheus.port=70000", "65535"]),
    ("broken-interpolation", "config", ["train.seq_len=${{nope}}"], ["train.seq_len", "${...}"]),
    ("unset-environment-variable", "config", ["train.seq_len=${{oc.env:DSRUN_NO_SUCH_VARIABLE}}"],
     ["train.seq_len", "DSRUN_NO_SUCH_VARIABLE"]),
    ("added-key-nothing-reads", "config", ["+train.epoch=1"], ["+train.epoch", "did you mean train.epochs?"]),
    ("warmup-longer-than-run", "config", ["optim.warmup_steps=5"], ["optim.warmup_steps=5", "below 2"]),
    ("data-path-without-jsonl", "config", ["data.path={tmp}/x.jsonl"], ["data.path", "data=jsonl"]),
    ("missing-eval-file", "data", ["data.eval_path={tmp}/missing.jsonl"], ["data.eval_path=", "no such file"]),
    ("empty-sweep", "config", ["-m", "train.seed=range(5,5)", "hydra.sweep.dir={tmp}/sweep"], ["no trials"]),
    ("missing-jsonl", "data", ["data=jsonl", "data.path={tmp}/missing.jsonl"], ["no such file"]),
    ("empty-jsonl", "data", ["data=jsonl", "data.path={tmp}/empty.jsonl"], ["empty"]),
    ("malformed-jsonl", "data", ["data=jsonl", "data.path={tmp}/malformed.jsonl"], ["malformed.jsonl:2", "JSON"]),
    ("non-utf8-line", "data", ["data=jsonl", "data.path={tmp}/latin1.jsonl"], ["latin1.jsonl:2", "UTF-8"]),
    ("chat-missing-role", "data", ["data=jsonl", "data.path={tmp}/norole.jsonl"], ["norole.jsonl:1", "role"]),
    ("record-without-text", "data", ["data=jsonl", "data.path={tmp}/nofield.jsonl"], ["nofield.jsonl:1", "text"]),
    ("data-smaller-than-a-block", "data", ["data=jsonl", "data.path={tmp}/tiny.jsonl"],
     ["packs into 1 rows", "fewer than one global micro-batch"]),
    ("chat-without-assistant-turn", "data", ["data=jsonl", "data.path={tmp}/noassistant.jsonl"],
     ["noassistant.jsonl:1", "no assistant turn"]),
    ("eval-set-too-small", "data", ["data.eval_path={tmp}/tiny.jsonl"], ["eval set", "fewer than one batch"]),
    ("data-path-is-a-folder", "data", ["data=jsonl", "data.path={tmp}"], ["a directory, not a regular file"]),
    ("data-path-is-dev-null", "data", ["data=jsonl", "data.path=/dev/null"], ["a device, not a regular file"]),
    ("data-path-is-a-fifo", "data", ["data=jsonl", "data.path={tmp}/fifo"], ["named pipe"]),
    ("gzip-data", "data", ["data=jsonl", "data.path={tmp}/data.jsonl.gz"], ["gzip-compressed", "gunzip"]),
    ("tokenizer-model-vocab-mismatch", "data", ["model=r1_distill_llama_8b"], ["outside the model's vocabulary"]),
    ("folder-without-tokenizer", "data", ["model.tokenizer={tmp}/noconfig"],
     ["cannot load a tokenizer from", "tokenizer.json", "model.tokenizer=deepseek"]),
    ("missing-model-folder", "model", ["model.init=pretrained", "model.path={tmp}/nope"], ["no such folder"]),
    ("model-folder-without-config", "model", ["model.init=pretrained", "model.path={tmp}/noconfig"],
     ["no config.json"]),
    ("pickle-weights-only", "model", ["model.init=pretrained", "model.path={tmp}/binonly"], ["no *.safetensors"]),
    ("remote-code-not-allowed", "model", ["model.init=pretrained", "model.path={tmp}/remote"],
     ["trust_remote_code=true"]),
    ("source-not-a-model-folder", "model", ["task=generate", "task.source={tmp}", "generate.prompt=hi"],
     ["not a run folder", "dsrun export"]),
    ("prompt-longer-than-context", "model", ["task=generate", "model=tiny_qwen2",
                                             "model.fields.max_position_embeddings=32", "generate.prompt=hi"],
     ["exceeds the 32 positions generate holds", "generate.max_new_tokens"]),
    ("invalid-config-json", "model", ["model.init=pretrained", "model.path={tmp}/badjson"],
     ["badjson/config.json", "not JSON"]),
    ("garbage-safetensors", "model", ["model.init=pretrained", "model.path={tmp}/garbageweights"],
     ["model.safetensors", "damaged safetensors"]),
    ("truncated-safetensors", "model", ["model.init=pretrained", "model.path={tmp}/cutweights"],
     ["model.safetensors", "truncated safetensors"]),
    ("checkpoint-of-another-model", "checkpoint", ["model=tiny_qwen2", "train.resume={ckpt}"],
     ["cannot load it", "train.resume=<its path>"]),
    ("truncated-checkpoint", "checkpoint", ["resume", "{clone}"], ["cannot load it", "damaged"]),
    ("resume-from-non-checkpoint", "checkpoint", ["train.resume={tmp}"], ["not a complete dsrun checkpoint"]),
    ("garbage-latest-pointer", "checkpoint", ["resume", "{clone}"], ["checkpoints/latest: ", "step-00000002"]),
    ("latest-points-nowhere", "checkpoint", ["resume", "{clone}"], ["step-00000099", "not a complete checkpoint"]),
    ("truncated-rng-file", "checkpoint", ["resume", "{clone}"], ["rng-rank0.pt", "damaged"]),
    ("corrupt-snapshot", "checkpoint", ["resume", "{clone}"], [".hydra/config.yaml", "corrupted snapshot"]),
    ("corrupt-resolved-config", "checkpoint", ["resume", "{clone}"], ["/config.yaml: damaged, not YAML"]),
    ("other-config-in-run-folder", "checkpoint", ["model=tiny_qwen2", "hydra.run.dir={run}"],
     ["holds a run with another config", "model.name: tiny -> tiny_qwen2", "new hydra.run.dir"]),
    ("start-over-on-checkpoints", "checkpoint", ["train.resume=never", "hydra.run.dir={run}"],
     ["train.resume=never", "step-00000002", "train.overwrite=true", "dsrun resume"]),
    ("resume-changes-a-fixed-key", "checkpoint", ["resume", "{run}", "train.seq_len=32"],
     ["train.seq_len: 64 -> 32", "may change only"]),
    ("resume-changes-the-global-batch", "checkpoint", ["resume", "{run}", "train.micro_batch=1"],
     ["global batch 1", "trained with 2"]),
    ("resume-wrong-type", "checkpoint", ["resume", "{run}", "train.max_steps=abc"],
     ["train.max_steps", "abc", "Integer"]),
    ("resume-with-a-group-option", "checkpoint", ["resume", "{run}", "hardware=cpu"],
     ["config groups are already keys", "hardware.<key>=", "python -m dsrun"]),
    ("replay-with-a-group-option", "checkpoint", ["replay", "{run}", "model=tiny_qwen2"],
     ["config groups are already keys", "model=tiny_qwen2"]),
    ("run-folder-in-use", "checkpoint", ["resume", "{run}"], ["is in use by pid", "wait for that run to end"]),
    ("diverged-without-checkpoint", "checkpoint",
     ["optim=sgd", "train.lr=1e30", "optim.warmup_steps=0", "train.max_steps=20", "train.max_nonfinite_steps=2",
      "train.seq_len=32"], ["not finite for 2 steps", "no checkpoint was saved", "starts over at step 0"]),
    # issue #28: keys, values and commands a tired user types
    ("sweep-value-without-multirun", "config", ["train.lr=0.1,0.2"], ["Ambiguous value", "--multirun"]),
    ("unknown-optimizer", "config", ["optim.name=adamx"], ["optim.name=adamx", "choose one of adamw"]),
    ("zero-log-every", "config", ["train.log_every=0"], ["train.log_every=0", ">= 1"]),
    ("checkpoint-every-below-minus-one", "config", ["train.checkpoint_every=-2"], ["train.checkpoint_every=-2"]),
    ("negative-keep-checkpoints", "config", ["train.keep_checkpoints=-1"], ["train.keep_checkpoints=-1"]),
    ("zero-accumulation", "config", ["train.accumulation=0"], ["train.accumulation=0", ">= 1"]),
    ("negative-max-steps", "config", ["train.max_steps=-5"], ["train.max_steps=-5", ">= 1"]),
    ("negative-eval-every", "config", ["train.eval_every=-1"], ["train.eval_every=-1"]),
    ("serve-top-p-above-one", "config", ["task=bench_infer", "serve.top_p=1.5"], ["serve.top_p=1.5", "(0, 1]"]),
    ("bench-without-batches", "config", ["task=bench_infer", "bench_infer.batches=[]"], ["non-empty list"]),
    ("bench-unknown-quant", "config", ["task=bench_infer", "bench_infer.quants=[fp3]"], ["unknown fp3"]),
    ("serve-zero-max-tokens", "config", ["task=bench_infer", "serve.max_tokens=0"], ["serve.max_tokens=0"]),
    ("prompt-and-prompts-file", "config", ["task=bench_infer", "generate.prompt=hi",
                                           "generate.prompts_file={tmp}/tiny.jsonl"], ["give one of them"]),
    ("negative-memory-cap", "config", ["hardware.memory_cap_gib=-1"], ["hardware.memory_cap_gib=-1", "> 0"]),
    ("float-seq-len", "config", ["train.seq_len=1e3"], ["train.seq_len=1e3", "Integer"]),
    ("word-for-a-learning-rate", "config", ["train.lr=fast"], ["train.lr=fast", "Float"]),
    ("eval-split-of-one", "config", ["data.eval_split=1"], ["data.eval_split=1.0", "between 0 and 1"]),
    ("negative-micro-batch", "config", ["train.micro_batch=-1"], ["train.micro_batch=-1", ">= 1"]),
    ("unknown-monitor", "config", ["monitor=nope"], ["monitor=nope", "did you mean monitor=none"]),
    ("unknown-precision", "config", ["precision=fp64"], ["precision=fp64", "choose one of"]),
    ("unknown-parallel", "config", ["parallel=zero9"], ["did you mean parallel=zero3"]),
    ("unknown-adapter", "config", ["adapter=dora"], ["adapter=dora", "choose one of lora, none"]),
    ("generate-zero-new-tokens", "config", ["task=generate", "generate.max_new_tokens=0"],
     ["generate.max_new_tokens=0"]),
    ("plus-on-an-existing-key", "config", ["+train.max_steps=3"], ["already a key", "without the +"]),
    ("unknown-launcher", "config", ["-m", "hydra/launcher=nope", "train.lr=0.1,0.2"],
     ["hydra/launcher=nope", "choose one of"]),
    ("several-nodes-without-a-launcher", "environment", ["hardware.num_nodes=2"],
     ["hardware.num_nodes=2", "torchrun --nnodes 2"]),
    ("export-one-argument", "config", ["export", "{run}"], ["usage: dsrun export"]),
    ("resume-without-a-folder", "config", ["resume"], ["usage: dsrun resume"]),
    ("diff-one-run", "config", ["diff", "{run}"], ["usage: dsrun diff"]),
    ("runs-limit-zero", "config", ["runs", "--limit", "0"], ["--limit 0", ">= 1"]),
    ("runs-unknown-flag", "config", ["runs", "--bogus"], ["unrecognized arguments: --bogus"]),
    ("doctor-unknown-key", "config", ["doctor", "doctor.nope=1"], ["doctor.nope: no such key"]),
    # issue #28: run folders the catalog never imagined
    ("foreign-files-in-run-folder", "checkpoint", ["hydra.run.dir={tmp}/noconfig"],
     ["holds files dsrun did not write (README)", "choose a new hydra.run.dir"]),
    ("run-folder-through-plus-plus", "checkpoint", ["model=tiny_qwen2", "++hydra.run.dir={run}"],
     ["holds a run with another config", "model.name: tiny -> tiny_qwen2"]),
    ("run-folder-through-an-environment-variable", "checkpoint", ["model=tiny_qwen2", "hydra.run.dir=${{oc.env:RUNX}}"],
     ["holds a run with another config", "model.name: tiny -> tiny_qwen2"]),
    ("empty-run-folder", "checkpoint", ["hydra.run.dir="], ["hydra.run.dir= is empty", "name a folder"]),
    ("run-folder-is-a-file", "checkpoint", ["hydra.run.dir={tmp}/a-file"], ["is a file, not a folder"]),
    ("run-folder-inside-checkpoints", "checkpoint", ["hydra.run.dir={run}/checkpoints"],
     ["holds files dsrun did not write"]),
    ("run-folder-is-the-weights", "checkpoint", ["hydra.run.dir={run}/model"], ["holds files dsrun did not write"]),
    ("run-folder-is-the-snapshot", "checkpoint", ["hydra.run.dir={run}/.hydra"], ["holds files dsrun did not write"]),
    ("sweep-trials-share-a-folder", "checkpoint",
     ["-m", "train.lr=0.1,0.2", "hydra.sweep.dir={tmp}/sw", "hydra.sweep.subdir=same"],
     ["several trials of this sweep would write into", "${hydra.job.num}"]),
    ("sweep-folder-is-a-run", "checkpoint", ["-m", "train.lr=0.1,0.2", "hydra.sweep.dir={run}"],
     ["holds a run; a sweep writes its trials into a folder of its own"]),
    ("empty-sweep-subdir", "checkpoint", ["-m", "train.lr=0.1,0.2", "hydra.sweep.dir={tmp}/sw", "hydra.sweep.subdir="],
     ["hydra.sweep.subdir= is empty"]),
    ("resume-without-checkpoints", "checkpoint", ["resume", "{clone}", "train.max_steps=4"],
     ["holds a trained run", "no checkpoint to continue from", "train.overwrite=true"]),
    ("metrics-file-is-a-folder", "checkpoint", ["resume", "{clone}"], ["metrics.jsonl is not a file", "move it aside"]),
    ("summary-file-is-a-folder", "checkpoint", ["resume", "{clone}"], ["summary.json is not a file"]),
    ("resumes-file-is-a-folder", "checkpoint", ["resume", "{clone}"], ["resumes.jsonl is not a file"]),
    ("export-into-the-run", "checkpoint", ["export", "{run}", "{run}"], ["not empty", "new folder"]),
    ("export-onto-the-weights", "checkpoint", ["export", "{run}", "{run}/model"], ["not empty", "new folder"]),
    ("export-from-a-non-run", "checkpoint", ["export", "{tmp}/noconfig", "{tmp}/out"], ["not a run folder"]),
    ("resume-a-missing-folder", "checkpoint", ["resume", "{tmp}/nothing"], ["not a dsrun run folder"]),
    ("replay-a-missing-folder", "checkpoint", ["replay", "{tmp}/nothing"], ["not a dsrun run folder"]),
    ("resume-the-checkpoints-folder", "checkpoint", ["resume", "{run}/checkpoints"], ["not a dsrun run folder"]),
    ("generate-from-a-missing-folder", "model", ["generate", "{tmp}/nothing", "hi"], ["not a run folder"]),
    ("report-a-run-not-a-sweep", "checkpoint", ["report", "{run}"], ["no sweep trials in it"]),
    ("corrupt-ledger", "environment", ["runs"], ["the ledger", "cannot read it", "DSRUN_LEDGER"]),
    ("ledger-is-a-folder", "environment", ["runs"], ["the ledger", "is not a file"]),
    ("rollback-with-a-corrupt-ledger", "environment", ["rollback"], ["the ledger", "cannot read it"]),
    ("more-gpus-than-present", "environment", ["hardware=4x4090", "precision=bf16"], ["asks for 4 GPUs", "task=plan"]),
    ("vllm-not-installed", "environment", ["task=serve", "serve.engine=vllm"], ["no `vllm` executable", "pip install"]),
    ("unwritable-run-folder", "environment", ["hydra.run.dir={tmp}/a-file/run"], ["cannot create the run folder"]),
    ("read-only-working-directory", "environment", ["train.max_steps=2"], ["cannot create the run folder",
                                                                           "hydra.run.dir=/"]),
    ("prometheus-host-not-here", "environment", ["monitor=prometheus", "monitor.prometheus.host=999.1.1.1"],
     ["monitor.prometheus.host=999.1.1.1", "127.0.0.1"]),
]
# what a case needs beyond its arguments: an environment, a working directory, a damaged clone of the saved run
ENV = {"corrupt-ledger": {"DSRUN_LEDGER": "{tmp}/garbage.sqlite"}, "ledger-is-a-folder": {"DSRUN_LEDGER": "{tmp}"},
       "run-folder-through-an-environment-variable": {"RUNX": "{run}"},
       "rollback-with-a-corrupt-ledger": {"DSRUN_LEDGER": "{tmp}/garbage.sqlite"}}
CWD = {"read-only-working-directory": "/proc"}  # no folder can be made there, not even by root
RESHAPE = {  # a clone of the saved run, reshaped: what is missing or of the wrong kind
    "resume-without-checkpoints": lambda clone: shutil.rmtree(clone / "checkpoints"),
    **{f"{name.split('.')[0]}-file-is-a-folder": (lambda clone, name=name: folderize(clone / name))
       for name in ("metrics.jsonl", "summary.json", "resumes.jsonl")},
}
DAMAGE = {  # file in a clone of the saved run -> new content (a callable of the original bytes' path)
    "truncated-checkpoint": ("checkpoints/step-00000002/state", lambda p: p.read_bytes()[: 1 << 20]),
    "garbage-latest-pointer": ("checkpoints/latest", lambda p: b"\xff\xfe\x00garbage"),
    "latest-points-nowhere": ("checkpoints/latest", lambda p: b"step-00000099\n"),
    "truncated-rng-file": ("checkpoints/step-00000002/rng-rank0.pt", lambda p: p.read_bytes()[:100]),
    "corrupt-snapshot": (".hydra/config.yaml", lambda p: b"train: [unclosed\n  : :"),
    "corrupt-resolved-config": ("config.yaml", lambda p: b"train: [unclosed\n  : :"),
}

FILES = {
    "empty.jsonl": b"\n\n",
    "malformed.jsonl": b'{"text": "ok"}\n{"text": "broken"\n',
    "latin1.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
    "norole.jsonl": b'{"messages": [{"content": "hi"}]}\n',
    "nofield.jsonl": b'{"prompt": "hi"}\n',
    "tiny.jsonl": b'{"text": "hi"}\n',
    "noassistant.jsonl": b'{"messages": [{"role": "user", "content": "hi"}]}\n'
                         b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "?"}]}\n',
    "data.jsonl.gz": gzip.compress(b'{"text": "hello"}\n'),
    "a-file": b"",
    "norejected.jsonl": b'{"prompt": "hi", "chosen": "hello"}\n',
    "garbage.sqlite": b"this is not an SQLite database" * 100,
    "noconfig/README": b"",
    "badjson/config.json": b"{not json",
    "binonly/config.json": json.dumps({"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "intermediate_size": 128, "vocab_size": 129280}).encode(),
    "binonly/pytorch_model.bin": b"not unpickled",
    "remote/config.json": json.dumps({"model_type": "custom_thing",
                                      "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}).encode(),
}
BASE = [*FAST, "train.max_steps=2", "train.seq_len=64", "train.micro_batch=2"]


def folderize(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()


def signature(run: Path) -> dict[str, tuple[int, int]]:
    """Every file of the saved run with its size and modification time: any write, removal or addition shows.
    The lock file is the one file a refused run may touch (it locks before it checks)."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".dsrun.lock"}


def content_hash(run: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted([*(run / "checkpoints").rglob("*"), *(run / "model").rglob("*")]):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """One short run with a checkpoint and final weights, made once; every case checks that it is left alone."""
    run = tmp_path_factory.mktemp("saved") / "run"
    proc = dsrun(*BASE, "train.checkpoint_every=0", run_dir=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"run": run, "hash": content_hash(run)}


def clone(run: Path, dest: Path) -> Path:
    """A copy of the run made of hard links (instant): a write through one would show in the original's signature;
    damaged files are replaced, never written through."""
    def link_weights(source: str, target: str) -> None:  # small files (logs, metrics) are appended to: copies
        (os.link if "/checkpoints/" in source or "/model/" in source else shutil.copy2)(source, target)

    shutil.copytree(run, dest, copy_function=link_weights, ignore=shutil.ignore_patterns(".dsrun.lock"))
    return dest


def prepare(tmp: Path, run: Path, name: str) -> dict[str, str]:
    for rel, content in FILES.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(content)
    os.mkfifo(tmp / "fifo")
    weights = run / "model"
    for folder, cut in (("garbageweights", None), ("cutweights", 2)):
        (tmp / folder).mkdir()
        os.link(weights / "config.json", tmp / folder / "config.json")
        data = b"\x00" * 64 if cut is None else (weights / "model.safetensors").read_bytes()[: 1 << 16]
        (tmp / folder / "model.safetensors").write_bytes(data)
    values = {"tmp": str(tmp), "run": str(run), "ckpt": str(run / "checkpoints" / "step-00000002")}
    if name in RESHAPE:
        values["clone"] = str(clone(run, tmp / "clone"))
        RESHAPE[name](tmp / "clone")
    if name in DAMAGE:
        target = clone(run, tmp / "clone")
        rel, damage = DAMAGE[name]
        content = damage(run / rel)
        (target / rel).unlink()
        (target / rel).write_bytes(content)
        values["clone"] = str(target)
    return values


class _PassedChecks(Exception):
    pass


def checked_in_process(args: list[str], run_dir: Path | None) -> subprocess.CompletedProcess | None:
    """`python -m dsrun args` up to the end of its start-up checks (cli.precheck: compose, resolve, validate every
    job), in this process: no fork, no import, ~0.2 s a case. None when the command passes them (the case is refused
    later, by the task: it runs as a real process) — the folder claim, the first thing that would write, is not
    reached here. A verb runs as a real process (its own expansion and environment)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout
    from unittest import mock

    from dsrun import cli

    if args[0] in VERBS or not all("=" in a or a.startswith("-") for a in args):
        return None
    argv = cli.hydra_argv(cli.take_verbose_flag([*args, *([f"hydra.run.dir={run_dir}"] if run_dir else [])]), [])
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(cli, "claim_run_dir", side_effect=_PassedChecks), redirect_stdout(out), \
            redirect_stderr(err):
        cli.register_configs()
        try:
            cli.precheck(argv)
        except _PassedChecks:
            return None
        except SystemExit as exc:
            return subprocess.CompletedProcess(argv, cli.exit_status(exc), out.getvalue(), err.getvalue())
    raise AssertionError(f"precheck returned without claiming the run folder: {argv}")


def test_start_up_checks_leave_hydras_global_config_as_they_found_it(tmp_path):
    """Composing sets Hydra's global config for `${hydra:...}`; left behind, a half-filled one (no
    runtime.output_dir) broke the next in-process task that asks Hydra for its run folder (the planner)."""
    from hydra.core.hydra_config import HydraConfig

    assert not HydraConfig.initialized()
    passing = ["hardware=cpu", "monitor=none", "train.max_steps=1"]
    assert checked_in_process(passing, tmp_path / "run") is None, "the command passes the start-up checks"
    assert checked_in_process([*passing, "train.lr=-1"], tmp_path / "run").returncode != 0
    assert not HydraConfig.initialized()


@pytest.mark.parametrize("case", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_catalog(case, tmp_path, saved):
    name, category, arguments, fragments = case
    run = saved["run"]
    values = prepare(tmp_path, run, name)
    args = [a.format(**values) for a in arguments]
    if args[0] not in VERBS:
        named = {a.lstrip("+~").split("=", 1)[0] for a in args}  # BASE's value of a key the case sets goes
        base = [b for b in BASE if b.split("=", 1)[0] not in named]
        args = [*(["-m"] if "-m" in args else []), *base, *[a for a in args if a != "-m"]]
    explicit = any(a.lstrip("+").startswith(("hydra.run.dir", "hydra.sweep.dir")) for a in args) or args[0] in VERBS
    run_dir = None if explicit or name in CWD else tmp_path / "run"
    env = {key: value.format(**values) for key, value in ENV.get(name, {}).items()}
    before = signature(run)
    holder = None
    if name == "run-folder-in-use":  # a live owner: this test process holds the folder's lock
        holder = os.open(run / ".dsrun.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(holder, json.dumps({"pid": os.getpid(), "host": "here", "time": "now"}).encode(), 0)
    try:
        proc = checked_in_process(args, run_dir) if holder is None and not env and name not in CWD else None
        if proc is None:  # it passes the start-up checks, or needs its own environment: a real process
            proc = dsrun(*args, run_dir=run_dir, timeout=120, env=env, cwd=Path(CWD[name]) if name in CWD else None)
    finally:
        if holder is not None:
            os.ftruncate(holder, 0)
            os.close(holder)
    assert_user_error(proc, *fragments)
    assert signature(run) == before, "the saved run is untouched"


def test_the_saved_run_still_loads_after_every_case(saved):
    """After the whole catalog (this test runs after it): the checkpoint and weights are byte for byte what the run
    wrote, and the run resumes from its checkpoint."""
    run = saved["run"]
    assert content_hash(run) == saved["hash"]
    proc = dsrun("resume", str(run), "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'} at step 2" in proc.stderr


def test_catalog_is_documented_and_large_enough():
    doc = (REPO / "docs" / "bad-inputs.md").read_text()
    assert len(ROWS) >= 160
    for name, category, _, _ in ROWS:
        assert f"`{name}`" in doc, f"{name} missing from docs/bad-inputs.md"
    assert {r[1] for r in ROWS} == {"config", "data", "model", "checkpoint", "environment"}


def test_several_problems_are_all_reported(tmp_path):
    proc = dsrun(*FAST, "train.micro_batch=0", "train.accumulation=0", run_dir=tmp_path / "run")
    assert_user_error(proc, "train.micro_batch=0", "train.accumulation=0")
    assert len(proc.stderr.strip().splitlines()) == 2
    assert not (tmp_path / "run").exists(), "a refused run creates no run folder"


def test_sweep_over_an_unknown_key_is_refused_before_any_trial(tmp_path):
    proc = dsrun("-m", *FAST, "train.micro_batchh=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert_user_error(proc, "train.micro_batchh")
    assert not (tmp_path / "sweep").exists()


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    assert_user_error(dsrun("resume", str(tmp_path)), "not a dsrun run folder")


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str):
    """A real full disk: a tmpfs of `size` (root only; skipped with the reason elsewhere), unmounted after."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or 'not root'}); the disk-full case needs one")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path):
    """A real full disk: a tmpfs that holds one checkpoint of the tiny model (~200 MB with AdamW) but not two."""
    with small_disk(tmp_path, "300m") as mount:
        run_dir = mount / "run"
        proc = dsrun(*FAST, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                     "train.seq_len=64", "train.micro_batch=2", run_dir=run_dir)
        assert_user_error(proc, "No space left", "is intact")
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        assert (run_dir / "checkpoints" / latest / "COMPLETE").is_file()
        assert not list((run_dir / "checkpoints").glob("*.incomplete")), "the partial save is cleaned up"


def test_disk_full_at_start_up_is_one_line(tmp_path):
    """A run folder on a full disk: refused before Hydra writes its snapshot (which would end in a traceback)."""
    with small_disk(tmp_path, "1m") as mount:
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"\0" * 65536):
                pass
        except OSError:  # No space left on device: the disk is full
            pass
        finally:
            os.close(filler)
        proc = dsrun(*FAST, "train.max_steps=2", run_dir=mount / "run")
        assert_user_error(proc, "cannot write to the run folder", "No space left")


def test_disk_full_during_the_final_weights_is_one_line_naming_what_is_left(tmp_path):
    """The final safetensors write hits a full disk (safetensors raises its own SafetensorError, not OSError): one
    line, exit 2, and the message says no checkpoint exists (checkpoints off) instead of pointing at one."""
    with small_disk(tmp_path, "20m") as mount:
        run_dir = mount / "run"  # the tiny model's weights are 66 MB: the 20 MB disk fills during the save
        proc = dsrun(*FAST, "train.max_steps=2", "train.seq_len=32", "train.micro_batch=2", run_dir=run_dir)
        # (not assert_user_error: transformers' "Writing model shards" bar shares stderr until the console is quiet)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        errors = [ln for ln in proc.stderr.splitlines() if "dsrun: error:" in ln]
        assert len(errors) == 1 and "cannot write the final weights" in errors[0], proc.stderr[-2000:]
        assert "No space left" in errors[0] and "no complete checkpoint exists in this run" in errors[0]
        assert not (run_dir / "checkpoints").exists()
        # written under a temporary name: nothing half-written is left where a loader would look (issue #28)
        assert not (run_dir / "model").exists() and not (run_dir / ".model.partial").exists()


def test_read_only_run_folder_is_one_line_and_still_readable(tmp_path, saved):
    """A finished run on a read-only mount (an archive, a shared results disk): resuming or training into it is one
    line naming the folder and the fix (was: the message, then a traceback from unlinking the write probe), and
    the verbs that only read it still work."""
    with small_disk(tmp_path, "200m") as mount:  # the weights and the run's files; its checkpoints are not needed
        run = Path(shutil.copytree(saved["run"], mount / "run",
                                   ignore=shutil.ignore_patterns(".dsrun.lock", "checkpoints")))
        made = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only ({made.stderr.strip()})")
        before = signature(run)
        assert_user_error(dsrun("resume", str(run), "train.max_steps=3"), "Read-only file system", "make it writable")
        assert_user_error(dsrun(*BASE, run_dir=run), "Read-only file system", "make it writable")
        proc = dsrun("generate", str(run), "hi", "generate.max_new_tokens=2")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert signature(run) == before
