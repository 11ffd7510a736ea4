"""The type a model has as dsrun passes it around: a transformers causal LM, bare (a `PreTrainedModel`) or under
peft's adapters (a `PeftModel`, which forwards the base's attributes and methods). The two share no base class
that declares what dsrun calls on them (config, get_input_embeddings, save_pretrained, ...), so the alias is
deliberately loose; where only a bare model can arrive, code names `PreTrainedModel` itself."""

from typing import Any, TypeAlias

CausalLM: TypeAlias = Any
