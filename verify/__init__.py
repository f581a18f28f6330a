"""The lower layer: the Llama model math (llama, meta_reference, forward), the formats read and
written (checkpoint, safetensors_stream, gptq_format) with the quantisation grid (grid), the
measurements that gate publishing (metrics, thresholds, integrity, runtimes, llamacpp) and the
verify report (report); the exceptions of both layers (errors). Nothing here imports pipeline/."""
