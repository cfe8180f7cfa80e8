"""Build the engine the settings describe: read memory, load the model, size the context, start."""

from __future__ import annotations

import logging
import time

from parallama.batching import Engine, EngineConfig
from parallama.memory import cpus
from parallama.memory.degradation import DegradationConfig, DegradationController
from parallama.memory.probes import MemoryProbe, MemoryReading, SystemProbe, auto_reserve
from parallama.memory.sizing import SizingInput, SizingPlan, plan_sizing
from parallama.sequences.config import ContextConfig, ModelConfig, use_flash_attn
from parallama.sequences.llama_backend import LlamaBackend
from parallama.sequences.model import LlamaModel, gpu_offload_supported
from parallama.sequences.model_file import resolve_model_path
from parallama.server.chat_template import ChatTemplate
from parallama.server.settings import Settings
from parallama.server.state import ModelNames, Served

log = logging.getLogger(__name__)


def default_threads() -> int:
    """Physical cores this process may run on (its CPU affinity), at most the container's CPU quota."""
    return cpus.default_threads()


def size(settings: Settings, model: LlamaModel, n_gpu_layers: int, reading: MemoryReading) -> SizingPlan:
    facts = model.facts(settings.cache_type_k, settings.cache_type_v)
    cpu_only = n_gpu_layers == 0 or not reading.gpus
    cache_types = settings.cache_type_k if settings.cache_type_k == settings.cache_type_v else (
        f"{settings.cache_type_k}/{settings.cache_type_v}")
    return plan_sizing(SizingInput(
        weights_bytes=facts.weights_bytes,
        kv_bytes_per_token=facts.kv_bytes_per_token,
        ctx_size=settings.ctx_size,
        n_vocab=facts.n_vocab,
        n_layer=facts.n_layer,
        n_gpu_layers=n_gpu_layers,
        parallel=settings.parallel,
        kv_size=settings.kv_size,
        max_parallel=settings.max_parallel,
        reserve_bytes=auto_reserve(reading) if settings.reserve_bytes is None else settings.reserve_bytes,
        n_batch=settings.batch_size,
        cache_types=cache_types,
        prefix_cache=settings.prefix_cache,
        kv_unified=settings.kv_unified,
        cache_ram_bytes=settings.cache_ram_bytes,
        flash_attn=use_flash_attn(settings.flash_attn, cpu_only, settings.kv_unified, settings.cache_type_v),
        n_head=facts.n_head,
    ), reading)


def build(settings: Settings, probe: MemoryProbe | None = None) -> Served:
    path = resolve_model_path(settings.model)
    n_gpu_layers = settings.n_gpu_layers
    if n_gpu_layers is None:
        n_gpu_layers = -1 if gpu_offload_supported() else 0
    probe = probe or SystemProbe()
    reading = probe.read()  # before the weights load: sizing counts them itself
    model = LlamaModel(ModelConfig(str(path), n_gpu_layers))
    try:
        plan = size(settings, model, n_gpu_layers, reading)
    except Exception:
        model.close()
        raise
    context = ContextConfig(
        n_ctx=plan.kv_cells,
        n_seq_max=plan.layout.n_seq_max,  # the running slots and the prefix cache's ids
        n_batch=settings.batch_size,
        n_ubatch=settings.ubatch_size,
        n_threads=settings.threads or default_threads(),
        cache_type_k=settings.cache_type_k,
        cache_type_v=settings.cache_type_v,
        kv_unified=settings.kv_unified,
        flash_attn=plan.flash_attn,
    )
    backend = LlamaBackend(model, context)
    controller = DegradationController(DegradationConfig(
        reserve_bytes=plan.reserve_bytes,
        kv_bytes_per_token=plan.kv_bytes_per_token,
        ctx_size=settings.ctx_size,
        max_cells=backend.n_ctx,
        max_cap=plan.parallel,
        overcommit=plan.overcommit,
        gpu_fraction=plan.gpu_fraction,
        probe_interval=settings.memory_check_interval,
        recover_after=settings.recover_after,
    ))
    engine = Engine(backend, EngineConfig(ctx_size=settings.ctx_size, max_queue=settings.max_queue,
                                          layout=plan.layout, cache_ram_bytes=plan.cache_ram_bytes), probe, controller)
    engine.start()
    names = ModelNames.from_alias(settings.model_alias, path.stem)
    model_id = names.model_id
    log.info("serving %s: %s; n_batch %d, %d threads, flash attention %s, %s", model_id, plan.describe(),
             context.n_batch, context.n_threads, "on" if context.flash_attn else "off",
             f"{n_gpu_layers} GPU layers" if n_gpu_layers else "CPU only")
    facts = backend.facts
    template = ChatTemplate(facts.chat_template, facts.bos_token, facts.eos_token)
    return Served(engine, names, settings.ctx_size, plan.describe(), template, int(time.time()),
                  settings.request_timeout)
