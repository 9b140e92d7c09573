"""The inference engine: models, contexts and sampling over libllama.

Imports: the compiled engine modules and `errors`; never falcon or the server.
"""

from pyllama.engine._channel import EventChannel
from pyllama.engine._context import Context, ContextParams, default_threads, fit_params
from pyllama.engine.client import Engine, RequestHandle, Retry
from pyllama.engine.config import CpuPlacement, EngineConfig, SpecConfig
from pyllama.engine._media import MediaChunk, MediaContext, default_marker, image_size, mmproj_caps
from pyllama.engine._model import (
    RPC_PROTO_VERSION,
    LoraAdapter,
    Model,
    ModelParams,
    format_device_list,
    list_backends,
    list_devices,
    llama_build_commit,
    llama_version,
    numa_init,
    rpc_start_server,
    set_log_level,
    supports_gpu_offload,
    supports_rpc,
    system_info,
)
from pyllama.engine.rpc import RpcPeerError, parse_servers, probe, register_servers
from pyllama.engine._sampling import SamplerChain, json_schema_to_grammar
from pyllama.engine.types import (
    DEFAULT_SEED,
    EmbeddingResult,
    ErrorEvent,
    FinishEvent,
    FinishReason,
    ProgressEvent,
    Request,
    SamplingParams,
    Timings,
    TokenEvent,
    TokenProb,
)

__all__ = [
    "DEFAULT_SEED",
    "Context",
    "ContextParams",
    "EmbeddingResult",
    "Engine",
    "EventChannel",
    "CpuPlacement",
    "EngineConfig",
    "ErrorEvent",
    "FinishEvent",
    "FinishReason",
    "ProgressEvent",
    "Request",
    "RequestHandle",
    "Retry",
    "SamplingParams",
    "SpecConfig",
    "Timings",
    "TokenEvent",
    "TokenProb",
    "LoraAdapter",
    "MediaChunk",
    "MediaContext",
    "Model",
    "ModelParams",
    "SamplerChain",
    "default_marker",
    "default_threads",
    "fit_params",
    "format_device_list",
    "image_size",
    "mmproj_caps",
    "list_backends",
    "list_devices",
    "llama_build_commit",
    "json_schema_to_grammar",
    "llama_version",
    "numa_init",
    "parse_servers",
    "probe",
    "register_servers",
    "rpc_start_server",
    "RPC_PROTO_VERSION",
    "RpcPeerError",
    "set_log_level",
    "supports_gpu_offload",
    "supports_rpc",
    "system_info",
]
