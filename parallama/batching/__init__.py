"""The dispatcher: request queue, continuous-batching scheduler, and (later) memory-aware sizing.

Imports ``parallama.sequences`` only: no FastAPI, no llama_cpp.
"""

from parallama.batching.engine import Engine, EngineConfig, EngineStopped, QueueFull, RequestStream
from parallama.batching.events import Event, Usage

__all__ = ["Engine", "EngineConfig", "EngineStopped", "Event", "QueueFull", "RequestStream", "Usage"]
