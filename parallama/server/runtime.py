"""Build the engine the settings describe: load the model, size the context, start the worker."""

from __future__ import annotations

import logging
import time

import psutil

from parallama.batching import Engine, EngineConfig
from parallama.sequences.config import ContextConfig, ModelConfig
from parallama.sequences.llama_backend import LlamaBackend
from parallama.sequences.model import LlamaModel, gpu_offload_supported
from parallama.sequences.model_file import resolve_model_path
from parallama.server.chat_template import ChatTemplate
from parallama.server.settings import Settings
from parallama.server.state import Served

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 8


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def build(settings: Settings) -> Served:
    path = resolve_model_path(settings.model)
    n_gpu_layers = settings.n_gpu_layers
    if n_gpu_layers is None:
        n_gpu_layers = -1 if gpu_offload_supported() else 0
    model = LlamaModel(ModelConfig(str(path), n_gpu_layers))
    parallel = settings.parallel or DEFAULT_PARALLEL
    kv_size = settings.kv_size or parallel * settings.ctx_size
    context = ContextConfig(
        n_ctx=kv_size,
        n_seq_max=parallel,
        n_batch=max(settings.batch_size, parallel),
        n_ubatch=settings.ubatch_size,
        n_threads=settings.threads or default_threads(),
        cache_type_k=settings.cache_type_k,
        cache_type_v=settings.cache_type_v,
    )
    backend = LlamaBackend(model, context)
    engine = Engine(backend, EngineConfig(ctx_size=settings.ctx_size, max_queue=settings.max_queue))
    engine.start()
    model_id = settings.model_alias or path.stem
    plan = (f"{parallel} sequences x {settings.ctx_size} tokens over {backend.n_ctx:,} KV cells; "
            f"n_batch {context.n_batch}, {context.n_threads} threads, {n_gpu_layers} GPU layers")
    log.info("loaded %s from %s: %s", model_id, path, plan)
    facts = backend.facts
    template = ChatTemplate(facts.chat_template, facts.bos_token, facts.eos_token)
    return Served(engine, model_id, settings.ctx_size, plan, template, int(time.time()), settings.request_timeout)
