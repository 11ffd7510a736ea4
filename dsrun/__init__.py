"""dsrun: declarative fine-tuning and training of DeepSeek-family models with Hydra and Lightning Fabric."""

__version__ = "0.1.0"
