"""The core: what a Llama model is and the files it lives in. Errors and the input boundary,
the Llama math, checkpoints (HF, Meta), safetensors, the GPTQ packed format and the quantisation
grid, the GGUF type catalogue, tokenizers and chat formats, calibration text and staged outputs.
Every stage and verify/ build on it; it imports nothing of ours above it."""
