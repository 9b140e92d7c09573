"""The llama-server flag parser, on a table of upstream command lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyllama.cli import FlagError, parse_server_args

SERVER = str(Path(sys.executable).parent / "pyllama-server")


@pytest.mark.parametrize("argv,expected", [
    (["-m", "m.gguf", "--port", "8080", "-np", "4", "-cb"],
     dict(model="m.gguf", port=8080, parallel=4, cont_batching=True, kv_unified=None)),
    (["-m", "m.gguf"], dict(parallel=4, kv_unified=True)),  # auto: 4 slots, unified KV
    (["--ctx-size", "8192", "-b", "1024", "-ub", "256", "-t", "2", "-tb", "4"],
     dict(ctx_size=8192, batch_size=1024, ubatch_size=256, threads=2, threads_batch=4)),
    (["--ctx_size=4096", "--n_predict", "64"], dict(ctx_size=4096, n_predict=64)),  # underscores
    (["-c", "1", "-c", "2"], dict(ctx_size=2)),  # the last value wins
    (["-fa", "on", "-ctk", "q8_0", "-ctv", "q4_0", "--no-mmap", "--mlock"],
     dict(flash_attn="on", cache_type_k="q8_0", cache_type_v="q4_0", mmap=False, mlock=True)),
    (["-fa", "auto"], dict(flash_attn="auto")), (["--flash-attn", "1"], dict(flash_attn="on")),
    (["--temp", "0.2", "--top-k", "10", "--top-p", "0.5", "--min-p", "0.1", "-s", "7",
      "--repeat-penalty", "1.1", "--mirostat", "2", "--samplers", "top_k;temperature"],
     dict(temp=0.2, top_k=10, top_p=0.5, min_p=0.1, seed=7, repeat_penalty=1.1, mirostat=2,
          samplers="top_k;temperature")),
    (["--api-key", "a,b", "--api-key", "c"], dict(api_key=("a", "b", "c"))),
    (["-r", "User:", "--reverse-prompt", "###"], dict(reverse_prompt=("User:", "###"))),
    (["--embedding", "--pooling", "mean"], dict(embedding=True, pooling="mean")),
    (["--reranking"], dict(reranking=True, embedding=True, pooling="rank")),
    (["--metrics", "--no-slots", "--props", "--no-webui", "--no-jinja"],
     dict(metrics=True, slots=False, props=True, webui=False, jinja=False)),
    (["--context-shift", "--keep", "-1", "-n", "128", "-sps", "0.5"],
     dict(context_shift=True, keep=-1, n_predict=128, slot_prompt_similarity=0.5)),
    (["--host", "0.0.0.0", "--timeout", "600", "--threads-http", "16", "-ngl", "99"],
     dict(host="0.0.0.0", timeout=600, threads_http=16, n_gpu_layers="99")),
    (["--rope-scaling", "yarn", "--rope-scale", "4", "--rope-freq-base", "10000", "--yarn-orig-ctx", "4096",
      "--yarn-ext-factor", "0.5", "--override-kv", "tokenizer.ggml.add_bos_token=bool:false,x.n=int:3"],
     dict(rope_scaling="yarn", rope_scale=4.0, rope_freq_base=10000.0, yarn_orig_ctx=4096,
          yarn_ext_factor=0.5, override_kv=("tokenizer.ggml.add_bos_token=bool:false", "x.n=int:3"))),
    (["-lm", "mmap+mlock", "-sm", "none", "-mg", "1", "-ts", "3,1", "-nkvo", "--no-op-offload", "-dev", "none"],
     dict(load_mode="mmap+mlock", split_mode="none", main_gpu=1, tensor_split="3,1", kv_offload=False,
          op_offload=False, device="none")),
    (["-lzm", "off", "--numa", "distribute", "--ui-config", '{"theme": "dark"}', "--tags", "a,b"],
     dict(lazy_mode="off", numa="distribute", ui_config='{"theme": "dark"}', tags="a,b")),
    (["--reasoning-format", "deepseek", "--chat-template", "chatml", "-kvu", "--swa-full"],
     dict(reasoning_format="deepseek", chat_template="chatml", kv_unified=True, swa_full=True)),
    # the logging flags and --offline, which upstream's tooling passes on most launches
    (["--offline", "-lv", "4", "--log-file", "x.log", "--log-colors", "off", "--no-log-prefix",
      "--no-log-timestamps", "--log-jsonl"],
     dict(offline=True, verbosity=4, log_file="x.log", log_colors="off", log_prefix=False,
          log_timestamps=False, log_jsonl=True)),
    (["--verbosity", "1"], dict(verbosity=1)),
    # escapes in the stop strings and DRY breakers, on by default as upstream's -e
    (["-r", "\\n", "--dry-sequence-breaker", "\\t"], dict(escape=True, reverse_prompt=("\n",),
                                                         dry_sequence_breaker=("\t",))),
    (["--no-escape", "-r", "\\n"], dict(escape=False, reverse_prompt=("\\n",))),
    (["--adaptive-target", "0.3", "--adaptive-decay", "0.5"], dict(adaptive_target=0.3, adaptive_decay=0.5)), (["--log-verbosity", "5"], dict(verbosity=5)),
    ([], dict(offline=False, verbosity=3, log_prefix=True, log_timestamps=True, log_colors="auto")),
    # CPU placement and libllama's timings
    (["-C", "0xF0", "-Cr", "2-3", "--cpu-strict", "1", "--prio", "-1", "--poll", "0", "-Cb", "f",
      "-Crb", "-1", "--cpu-strict-batch", "1", "--prio-batch", "2", "--poll-batch", "1", "--no-perf"],
     dict(cpu_mask="0xF0", cpu_range="2-3", cpu_strict=1, prio=-1, poll=0, cpu_mask_batch="f",
          cpu_range_batch="-1", cpu_strict_batch=1, prio_batch=2, poll_batch=1, perf=False)),
    ([], dict(cpu_mask="", prio=0, poll=50, perf=True)),
    (["-ot", "blk\\.1\\.=CPU,x=CPU", "--override-tensor", "y=CPU", "-cmoe", "-ncmoe", "2", "-ncffn", "1",
      "-fit", "off", "-fitt", "512,256", "-fitc", "1024"],
     dict(override_tensor=("blk\\.1\\.=CPU", "x=CPU", "y=CPU"), cpu_moe=True, n_cpu_moe=2, n_cpu_ffn=1,
          fit="off", fit_target="512,256", fit_ctx=1024)),
    ([], dict(override_tensor=(), fit="on", fit_target="1024", fit_ctx=4096)),
    (["-rea", "off", "--reasoning-budget", "64", "--reasoning-budget-message", "Stop.", "--no-reasoning-preserve"],
     dict(reasoning="off", reasoning_budget=64, reasoning_budget_message="Stop.", reasoning_preserve=False)),
    (["--reasoning", "on", "--reasoning-preserve"], dict(reasoning="on", reasoning_preserve=True)),
    ([], dict(reasoning="auto", reasoning_budget=-1, reasoning_preserve=None)),
    (["--control-vector", "a.gguf,b.gguf", "--control-vector-scaled", "c.gguf:0.5",
      "--control-vector-layer-range", "2", "5", "-c", "64"],
     dict(control_vector=("a.gguf", "b.gguf"), control_vector_scaled=("c.gguf:0.5",),
          control_vector_layer_range=(2, 5), ctx_size=64)),
])
def test_upstream_command_lines(argv, expected):
    s = parse_server_args(argv, environ={})
    for key, value in expected.items():
        assert getattr(s, key) == value, key


def test_seed_production_example_without_gpu_flags(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("secret\n")
    s = parse_server_args(["-m", "model.gguf", "--host", "0.0.0.0", "--port", "8080", "-np", "8", "-cb",
                           "-c", "16384", "-b", "2048", "-ub", "512", "-fa", "auto", "--metrics",
                           "--api-key-file", str(keys), "--timeout", "600", "--slot-save-path",
                           str(tmp_path), "--jinja", "-ctk", "q8_0", "-ctv", "q8_0"], environ={})
    assert (s.parallel, s.ctx_size, s.api_key, s.metrics, s.jinja) == (8, 16384, ("secret",), True, True)


def test_override_map():
    s = parse_server_args(["--override-kv", "a=bool:true,b=int:-2", "--override-kv", "c=float:0.5,d=str:x y"],
                          environ={})
    assert s.kv_override_map() == {"a": True, "b": -2, "c": 0.5, "d": "x y"}


def test_environment_variables_and_precedence():
    env = {"LLAMA_ARG_CTX_SIZE": "1024", "LLAMA_ARG_N_PARALLEL": "3", "LLAMA_API_KEY": "k",
           "LLAMA_ARG_ENDPOINT_METRICS": "1", "LLAMA_ARG_FLASH_ATTN": "off", "LLAMA_ARG_MMAP": "false",
           "LLAMA_ARG_CONT_BATCHING": "disabled"}
    s = parse_server_args(["-c", "2048"], environ=env)
    assert s.ctx_size == 2048  # the command line wins
    assert (s.parallel, s.api_key, s.metrics, s.flash_attn, s.mmap, s.cont_batching) == \
        (3, ("k",), True, "off", False, False)
    assert parse_server_args([], environ={"LLAMA_ARG_ENDPOINT_METRICS": "0"}).metrics is False
    with pytest.raises(FlagError):
        parse_server_args([], environ={"LLAMA_ARG_MMAP": "maybe"})


@pytest.mark.parametrize("argv,message", [
    (["--frobnicate"], "invalid argument: --frobnicate"),
    (["--lora", "/nonexistent/x.gguf"], "LoRA adapter not found"),
    (["-mmdev", "A,B"], 'error while handling argument "-mmdev": only one device may be specified for mmproj'),
    (["--draft-max", "8"], 'error while handling argument "--draft-max": the argument has been removed. '
                           "use --spec-draft-n-max or --spec-ngram-mod-n-max"),
    (["--spec-type", "ngram-fancy"], 'error while handling argument "--spec-type": unknown speculative type: '
                                     "ngram-fancy"),
    (["--spec-ngram-simple-size-n", "0"], "ngram size N must be between 1 and 1024 inclusive"),
    (["--spec-draft-prio", "4"], 'error while handling argument "--spec-draft-prio": invalid value'),
    (["-C", "0xzz"], 'error while handling argument "-C": invalid cpumask'),
    (["-Crb", "3"], 'error while handling argument "-Crb": invalid range'),
    (["-Cr", "0-999"], 'error while handling argument "-Cr": invalid range'),
    (["--prio", "4"], 'error while handling argument "--prio": invalid value'),
    (["--host", " , "], "--host requires at least one address"),
    (["-ncmoe", "-1"], 'error while handling argument "-ncmoe": invalid value'),
    (["-fit", "auto"], "error: unknown value for --fit: 'auto'"),
    (["--reasoning-budget", "-2"], 'error while handling argument "--reasoning-budget": invalid value'),
    (["-rea", "maybe"], "invalid value for -rea"),
    (["--control-vector-scaled", "a.gguf"], "control-vector-scaled format: FNAME:SCALE"),
    (["--control-vector-layer-range", "1"], "expected value for argument --control-vector-layer-range"),
    (["--control-vector-layer-range", "1", "x"], "invalid value for --control-vector-layer-range"),
    (["-fitt", "lots"], 'error while handling argument "-fitt"'),
    (["--host", "127.0.0.1,127.0.0.2", "--port", "0"], "--port 0 is not supported with multiple TCP addresses"),
    (["--prio-batch", "-1"], 'error while handling argument "--prio-batch": invalid value'),
    (["-np", "0"], "--parallel"),
    (["-c", "lots"], "invalid value for -c"),
    (["-fa", "sometimes"], "invalid value for -fa"),
    (["-ctk", "q3"], "invalid value for -ctk"),
    (["--port"], "expected value for argument --port"),
    (["--override-kv", "a=float:x"], "Invalid type for KV override"),
    (["--override-kv", "a=list:1"], "Invalid type for KV override"),
    (["--rope-scaling", "cubic"], "invalid value for --rope-scaling"),
    (["-lm", "fast"], "invalid value for -lm"),
    (["--ui-config", "[1]"], "--ui-config must be a JSON object"),
    (["--numa", "spread"], "invalid value for --numa"),
    (["-ts", "a,b"], "invalid value for --tensor-split"),
    (["-dev", ","], "no devices specified"),  # a device name is checked when the model loads
])
def test_refused_flags(argv, message):
    with pytest.raises(FlagError, match=re.escape(message)):
        parse_server_args(argv, environ={})


def test_process_help_version_and_exit_codes():
    for flag in ("--help", "-h", "--usage"):  # upstream's three spellings
        out = subprocess.run([SERVER, flag], capture_output=True, text=True)
        assert out.returncode == 0 and "--ctx-size" in out.stdout and "LLAMA_ARG_CTX_SIZE" in out.stdout
    out = subprocess.run([SERVER, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "pyllama" in out.stdout and "0c1e57098" in out.stdout
    out = subprocess.run([SERVER, "--tools", "all"], capture_output=True, text=True)
    assert out.returncode == 1 and "--tools" in out.stderr and "does not support" in out.stderr


def test_logging_flags_from_the_environment():
    s = parse_server_args([], environ={"LLAMA_ARG_OFFLINE": "1", "LLAMA_ARG_LOG_VERBOSITY": "2",
                                       "LLAMA_ARG_LOG_FILE": "y.log", "LLAMA_ARG_LOG_PREFIX": "false"})
    assert (s.offline, s.verbosity, s.log_file, s.log_prefix) == (True, 2, "y.log", False)
    with pytest.raises(FlagError):
        parse_server_args(["--log-colors", "sometimes"], environ={})


def test_completion_bash_is_a_working_bash_completion():
    out = subprocess.run([SERVER, "--completion-bash"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "complete -F _llama_completions llama-server" in out.stdout
    # bash loads it, and completing "--ctx" offers the flag
    script = out.stdout + '\nCOMP_WORDS=(llama-server --ctx); COMP_CWORD=1; _llama_completions; echo "${COMPREPLY[@]}"\n'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--ctx-size" in done.stdout.split() and "--temp" not in done.stdout.split()


@pytest.mark.parametrize("raw,expected", [
    ("a\\nb", "a\nb"), ("\\r\\t\\'\\\"\\\\", "\r\t'\"\\"), ("a\\x41b", "aAb"),
    ("\\q", "\\q"), ("x\\", "x\\"), ("\\x4", "\\x4"), ("é\\n", "é\n"), ("\\xzz", "\\xzz"),
])
def test_escapes_as_upstreams_string_process_escapes(raw, expected):
    from pyllama.flags import process_escapes

    assert process_escapes(raw) == expected


def test_cpu_placement_reaches_the_engine_config():
    from pyllama.engine import CpuPlacement
    from pyllama.server.app import engine_config

    cfg = engine_config(parse_server_args(["-t", "2", "-C", "0x1", "--prio", "-1", "--poll", "0",
                                           "--no-perf"], environ={}))
    assert cfg.n_threads == 2 and cfg.n_threads_batch is None and cfg.perf is False
    assert cfg.cpu == CpuPlacement(mask="0x1", prio=-1, poll=0)
    assert cfg.context_options()["cpu"] == cfg.cpu
    # -t not given: upstream's default (common_cpu_get_num_math), chosen by the Context
    assert engine_config(parse_server_args([], environ={})).n_threads is None


def test_tensor_overrides_and_fit_reach_the_engine_config():
    from pyllama.server.app import FFN_DENSE_REGEX, FFN_EXPS_REGEX, engine_config

    cfg = engine_config(parse_server_args(["-ot", "a=CPU", "-cmoe", "-ncmoe", "1", "-ncffn", "2", "-fitt", "7",
                                           "-fitc", "300", "-ngl", "all"], environ={}))
    assert cfg.tensor_overrides == (("a", "CPU"), (FFN_EXPS_REGEX, "CPU"), (rf"blk\.0{FFN_EXPS_REGEX}", "CPU"),
                                    (rf"blk\.0{FFN_DENSE_REGEX}", "CPU"), (rf"blk\.1{FFN_DENSE_REGEX}", "CPU"))
    assert cfg.fit and cfg.fit_target_mib == (7,) and cfg.fit_ctx_min == 300
    assert cfg.n_gpu_layers == -2  # "all": not for --fit to lower (upstream's -2)
    off = engine_config(parse_server_args(["-fit", "off", "--no-warmup"], environ={}))
    assert not off.fit and not off.warmup and off.n_gpu_layers == -1


def test_multimodal_flags_reach_the_engine_config():
    from pyllama.server.app import engine_config

    cfg = engine_config(parse_server_args(
        ["-mm", "p.gguf", "--no-mmproj-offload", "--image-min-tokens", "64", "--image-max-tokens", "256",
         "--mtmd-batch-max-tokens", "300", "--video-fps", "2.5", "--video-timestamp-interval", "1000",
         "--video-ffmpeg-dir", "/opt/ffmpeg"], environ={}))
    assert (cfg.mmproj, cfg.mmproj_use_gpu, cfg.mmproj_device) == ("p.gguf", False, None)
    assert (cfg.image_min_tokens, cfg.image_max_tokens, cfg.mtmd_batch_max_tokens) == (64, 256, 300)
    assert (cfg.video_fps, cfg.video_timestamp_interval_ms, cfg.video_ffmpeg_dir) == (2.5, 1000, "/opt/ffmpeg")
    assert cfg.media_marker.startswith("<__media_")  # the marker /props reports
    default = engine_config(parse_server_args([], environ={}))
    assert (default.mmproj, default.mmproj_use_gpu, default.mtmd_batch_max_tokens) == ("", True, 1024)
    assert (default.image_min_tokens, default.video_fps, default.video_timestamp_interval_ms) == (-1, 4.0, 5000)
    # -mmdev: "none" keeps it on the CPU, a device offloads it there whatever --mmproj-offload says
    off = engine_config(parse_server_args(["-mm", "p", "-mmdev", "none"], environ={}))
    assert (off.mmproj_use_gpu, off.mmproj_device) == (False, "none")
    on = engine_config(parse_server_args(["-mm", "p", "--no-mmproj-offload", "--mmproj-device", "CUDA0"],
                                         environ={}))
    assert (on.mmproj_use_gpu, on.mmproj_device) == (True, "CUDA0")
    with pytest.raises(FlagError, match="only one device"):
        parse_server_args(["-mmdev", "CUDA0,CUDA1"], environ={})
    # the variables upstream reads (MTMD_BACKEND_DEVICE has no LLAMA_ARG_ prefix)
    env = engine_config(parse_server_args([], environ={
        "LLAMA_ARG_MMPROJ": "e.gguf", "MTMD_BACKEND_DEVICE": "none", "LLAMA_ARG_IMAGE_MAX_TOKENS": "9",
        "LLAMA_ARG_MTMD_BATCH_MAX_TOKENS": "7", "LLAMA_ARG_MMPROJ_OFFLOAD": "0"}))
    assert (env.mmproj, env.mmproj_device, env.image_max_tokens, env.mtmd_batch_max_tokens) == ("e.gguf", "none", 9, 7)
    assert not env.mmproj_use_gpu
    s = parse_server_args(["--no-mmproj", "-mmu", "http://x/p.gguf"], environ={})
    assert (s.mmproj_auto, s.mmproj_url) == (False, "http://x/p.gguf")
    assert parse_server_args(["--mmproj-auto"], environ={}).mmproj_auto
