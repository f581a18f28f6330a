"""The dtypes a converted model may be stored in, by name: torch-free, since a recipe names one."""

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_DTYPE = "float16"
