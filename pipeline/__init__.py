"""Meta Llama-family checkpoints to verified fp16, GPTQ and GGUF Hugging Face repositories.

Stages: convert (pipeline.convert), quantize (pipeline.quantize), gguf (pipeline.gguf), verify
(verify.stage, on the verify/ library), publish (pipeline.publish); pipeline.job chains them
from a recipe (pipeline.recipe). DESIGN.md has the layers and the stage table.
"""

__version__ = "0.1.0"
