"""Forward passes and metrics: the Meta reference, the layer-by-layer HF/GPTQ forward,
perplexity, parity and generation checks that gate publishing."""
