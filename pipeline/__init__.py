"""Meta Llama-family checkpoints to verified fp16 and GPTQ Hugging Face repositories.

Stages: convert (pipeline.convert), quantize (pipeline.quantize), verify (pipeline.verify),
publish (pipeline.publish); pipeline.job chains them from a recipe (pipeline.recipe).
"""

__version__ = "0.1.0"
