"""EngineConfig: one spelling of every engine, model and context option."""

from __future__ import annotations

import dataclasses

import pytest

from pyllama.engine import Context, Engine, EngineConfig, Model


def test_every_field_reaches_model_context_or_the_loop():
    config = EngineConfig()
    model, context = config.model_options(), config.context_options()
    loop = {"n_parallel", "n_predict", "ctx_shift", "slot_prompt_similarity", "n_threads_sampling",
            "lora", "lora_init_without_apply", "n_ctx_slot_max", "warmup", "fit", "fit_target_mib", "fit_ctx_min",
            "cache_ram_mib", "cache_idle_slots", "n_cache_reuse", "sleep_idle_seconds",
            "n_ctx_checkpoints", "checkpoint_min_step", "rpc_servers", "speculative",
            # the projector (MediaContext)
            "mmproj", "mmproj_use_gpu", "mmproj_device", "image_min_tokens", "image_max_tokens",
            "mtmd_batch_max_tokens", "media_marker", "video_fps", "video_timestamp_interval_ms",
            "video_ffmpeg_dir"}
    assert set(model) | (set(context) - {"n_seq_max"}) | loop == EngineConfig.field_names()
    assert not set(model) & set(context)
    assert context["n_seq_max"] == config.n_parallel


def test_the_options_are_model_and_context_keywords(synthetic_path):
    # the names match Model's and Context's keywords, and the defaults are accepted
    config = EngineConfig(n_ctx=512, n_parallel=2, kv_overrides={"llama.context_length": 1024})
    model = Model(synthetic_path, **config.model_options())
    try:
        assert model.n_ctx_train == 1024
        context = Context(model, **config.context_options())
        assert context.n_seq_max == 2 and context.n_ctx == 512
        context.close()
    finally:
        model.close()


def test_a_config_is_a_frozen_value():
    config = EngineConfig(lora=[("a.gguf", 1)], devices=["CUDA0"], tensor_split=[3, 1])
    assert config.lora == (("a.gguf", 1.0),) and config.devices == ("CUDA0",)
    assert config.tensor_split == (3, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_ctx = 1
    assert config.replace(n_ctx=8).n_ctx == 8 and config.n_ctx == 4096
    with pytest.raises(TypeError, match="n_gpu"):
        config.replace(n_gpu=1)


def test_engine_options_override_the_config(synthetic_path):
    base = EngineConfig(n_parallel=2, n_ctx=512, n_batch=64)
    with Engine(synthetic_path, base, n_parallel=3, context_options={"n_ubatch": 32}) as eng:
        assert eng.config == base.replace(n_parallel=3, n_ubatch=32)
        assert eng.n_slots == 3
        assert eng.core.context.n_batch == 64 and eng.core.context.n_ubatch == 32
    with Engine(synthetic_path, n_parallel=2, n_ctx=512) as eng:  # keywords alone, as before
        assert eng.config.n_parallel == 2 and eng.n_slots == 2


def test_unknown_engine_options_are_refused_before_loading(synthetic_path):
    with pytest.raises(TypeError, match="n_paralel"):
        Engine(synthetic_path, n_paralel=2)
    with pytest.raises(TypeError, match="rope_freq"):
        Engine(synthetic_path, model_options={"rope_freq": 1.0})
    with pytest.raises(TypeError, match="repeats"):
        Engine(synthetic_path, n_ctx=256, context_options={"n_ctx": 512})
