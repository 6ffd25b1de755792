"""vLLM integration: the superweight_rtn quantization method (config + linear schemes + load-time transforms)."""
