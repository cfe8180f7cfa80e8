"""Every knob of the server, in one pydantic-settings object: a CLI flag and a PARALLAMA_ variable each."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from parallama.memory.probes import parse_size
from parallama.sequences.config import PLAIN_CACHE_TYPES
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CacheType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]


def _auto_or_positive(value: object) -> int | None:
    """'auto' (or nothing) means: let the server size it from the memory it finds."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    number = int(value)  # type: ignore[arg-type]
    if number < 1:
        raise ValueError("must be a positive integer or 'auto'")
    return number


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARALLAMA_", extra="ignore")

    # model
    model: Path | None = Field(None, description="GGUF file to serve (default: the embedded SmolLM2-135M-Instruct)")
    model_alias: str | None = Field(None, description="model id clients use (default: the GGUF file name); several comma-separated names are all accepted, the first is the id; '*' answers any name")
    n_gpu_layers: int | None = Field(None, ge=-1, description="layers on the GPU; -1 all (default: all when a GPU is present, else 0)")
    # sequences and KV
    parallel: int | None = Field(None, description="most sequences that run at once (default: auto, from free memory)")
    max_parallel: int = Field(16, ge=1, le=256, description="upper bound for --parallel auto")
    ctx_size: int = Field(2048, ge=64, description="context of ONE sequence: prompt + answer tokens")
    kv_size: int | None = Field(None, description="cells in the shared KV cache (default: auto, at most parallel x ctx-size)")
    kv_unified: bool = Field(False, description="one KV pool shared by all sequences instead of a stream per sequence (llama.cpp's -kvu): more sequences than memory for full contexts, but every token attends to every cell in use, cached ones included")
    memory_reserve: str = Field("auto", description="memory left free for the rest of the machine, e.g. 2GiB or 512MiB; auto: the smaller of 1GiB and a tenth of total RAM (of the container's memory limit when lower)")
    memory_check_interval: float = Field(0.5, gt=0, description="seconds between memory readings while serving")
    recover_after: float = Field(3.0, ge=0, description="seconds of steady headroom before each step back up")
    prefix_cache: bool = Field(True, description="keep finished requests' KV to reuse their prefixes (resent conversations, shared system prompts)")
    cache_ram: str = Field("auto", description="host RAM for the prefix cache's second tier (evicted entries are saved there), e.g. 2GiB; 0 turns it off; auto: the smaller of 1GiB and a tenth of free RAM")
    batch_size: int = Field(512, ge=16, description="most tokens one llama_decode carries (n_batch)")
    ubatch_size: int = Field(512, ge=16, description="physical micro-batch (n_ubatch)")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: the physical cores this process may run on, at most the container's CPU quota)")
    cache_type_k: CacheType = Field("f16", description="K cache type")
    cache_type_v: CacheType = Field("f16", description="V cache type (quantized types need flash attention)")
    flash_attn: Literal["auto", "on", "off"] = Field("auto", description="flash attention; auto: off when the model runs on the CPU alone with a KV stream per sequence and an f16/f32/bf16 V cache (there llama.cpp's flash-attention kernel slows decoding as contexts grow), on otherwise")
    # serving
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the server to the network")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    max_queue: int = Field(256, ge=1, description="requests waiting for a sequence before 503 server_is_overloaded")
    request_timeout: float | None = Field(None, gt=0, description="seconds after which a request ends with what it has (default: none)")
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds in-flight requests get to finish after SIGTERM")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body accepted (413 above)")
    # security
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' on /v1, /status and /metrics")
    api_key_file: Path | None = Field(None, description="read the API key from this file")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list, description="extra Host header names accepted while bound to loopback (comma-separated)")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="web origins (scheme://host:port) whose pages may call this server from a browser (comma-separated; '*' allows any). The server's own page at / needs none")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @model_validator(mode="after")
    def _v_cache_needs_flash_attn(self) -> Settings:
        if self.flash_attn == "off" and self.cache_type_v not in PLAIN_CACHE_TYPES:
            raise ValueError(f"--cache-type-v {self.cache_type_v} needs flash attention: use --flash-attn on or auto")
        return self

    @field_validator("parallel", "kv_size", mode="before")
    @classmethod
    def _auto(cls, value: object) -> int | None:
        return _auto_or_positive(value)

    @field_validator("memory_reserve")
    @classmethod
    def _size(cls, value: str) -> str:
        if value.strip().lower() != "auto":
            parse_size(value)  # raises ValueError with the accepted forms
        return value

    @property
    def reserve_bytes(self) -> int | None:
        """None: auto, sized at start-up from the memory the machine or container has."""
        return None if self.memory_reserve.strip().lower() == "auto" else parse_size(self.memory_reserve)

    @field_validator("cache_ram")
    @classmethod
    def _size_or_auto(cls, value: str) -> str:
        if value.strip().lower() != "auto":
            parse_size(value)
        return value

    @property
    def cache_ram_bytes(self) -> int | None:
        """None: let the start-up plan choose."""
        return None if self.cache_ram.strip().lower() == "auto" else parse_size(self.cache_ram)

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return [h.strip().lower() for h in value.split(",") if h.strip()] if isinstance(value, str) else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        # Browsers send Origin as scheme://host[:port], lower-case, with no trailing slash.
        items = value.split(",") if isinstance(value, str) else value
        return [o.strip().rstrip("/").lower() for o in items if o.strip()] if isinstance(items, list) else value

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_file:
            return self.api_key_file.read_text().strip() or None
        return None
