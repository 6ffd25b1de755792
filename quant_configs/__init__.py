"""Quantization presets (``superweight convert --preset NAME``), installed as ``vllm_superweight.quant_configs``."""
