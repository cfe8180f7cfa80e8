"""One loaded model, many sequences.

The only layer that imports ``llama_cpp``. It knows nothing of queues, HTTP or scheduling: it loads a
model, decodes the batches it is handed, samples, and moves KV cells around on request.
"""

from parallama.sequences.backend import Backend, BatchItem, BatchPlan, DecodeOutcome, ModelFacts, Sampler
from parallama.sequences.params import SamplingParams

__all__ = ["Backend", "BatchItem", "BatchPlan", "DecodeOutcome", "ModelFacts", "Sampler", "SamplingParams"]
