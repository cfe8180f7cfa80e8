"""parallama: a local OpenAI-compatible server that runs many sequences at once on llama-cpp-python."""

__version__ = "0.1.0"
