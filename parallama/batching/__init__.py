"""The dispatcher: typed commands in, events out; the continuous-batching scheduler, the prefix
cache, and one statistics value.

Imports ``parallama.sequences`` and ``parallama.memory`` only: no FastAPI, no llama_cpp.
"""

from parallama.batching.engine import Engine, EngineConfig, EngineStopped, QueueFull, RequestStream
from parallama.batching.events import Event, Usage

__all__ = ["Engine", "EngineConfig", "EngineStopped", "Event", "QueueFull", "RequestStream", "Usage"]
