# cython: language_level=3, embedsignature=True
"""Model: a loaded GGUF model, its metadata and its vocabulary (tokenize / detokenize).

Also owns the process-wide libllama setup: backend init and the log callback that routes
llama.cpp's log lines into Python logging.
Imports: `_llama`, `errors`. Vocabulary methods only read the model and are thread-safe.
"""

import logging
import os
from collections import deque

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport INT32_MIN, int32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from libcpp.vector cimport vector

from pyllama cimport _llama as L

from pyllama.errors import (
    InvalidModelError,
    InvalidRequestError,
    InvalidTokenError,
    ModelLoadError,
    ModelNotFoundError,
)

llama_logger = logging.getLogger("pyllama.llama_cpp")

cdef extern from *:
    """
    #ifndef PYLLAMA_LLAMA_COMMIT
    #define PYLLAMA_LLAMA_COMMIT "unknown"
    #endif
    """
    const char * PYLLAMA_LLAMA_COMMIT_C "PYLLAMA_LLAMA_COMMIT"

PYLLAMA_LLAMA_COMMIT = (<bytes>PYLLAMA_LLAMA_COMMIT_C).decode()

cdef extern from *:
    """
    #ifdef GGML_BACKEND_DL
    #define PYLLAMA_BACKEND_DL 1
    #else
    #define PYLLAMA_BACKEND_DL 0
    #endif
    """
    int PYLLAMA_BACKEND_DL

# True when ggml's backends are modules loaded at import (the wheel); False when the CPU
# backend is linked into libggml (make's native build: ggml refuses GGML_NATIVE with DL).
BACKEND_DL = bool(PYLLAMA_BACKEND_DL)

# --- llama.cpp logging -------------------------------------------------------------------------
# PERF: the level gate is a C int, so filtered-out lines (most of load-time DEBUG/INFO) never
# take the GIL. Errors always pass: the last ones explain a failed load.
cdef int _log_min_level = L.GGML_LOG_LEVEL_WARN
cdef int _log_last_level = L.GGML_LOG_LEVEL_INFO
_recent_errors = deque(maxlen=8)

# upstream prints libllama's debug lines at verbosity 5 (LOG_LEVEL_DEBUG) and its trace lines
# at 4; Python's DEBUG stands for 4, this level below it for 5
LOG_DEBUG_VERBOSE = 5
logging.addLevelName(LOG_DEBUG_VERBOSE, "DEBUG")

_PY_LEVELS = {
    L.GGML_LOG_LEVEL_DEBUG: LOG_DEBUG_VERBOSE,
    L.GGML_LOG_LEVEL_INFO: logging.INFO,
    L.GGML_LOG_LEVEL_WARN: logging.WARNING,
    L.GGML_LOG_LEVEL_ERROR: logging.ERROR,
}


cdef void _log_callback(L.ggml_log_level level, const char * text, void * user_data) noexcept nogil:
    # Any thread, GIL not held. CONT lines continue the previous line's level (progress dots).
    global _log_last_level
    cdef int lvl = <int>level
    if lvl == L.GGML_LOG_LEVEL_CONT:
        return
    _log_last_level = lvl
    if lvl < _log_min_level and lvl != L.GGML_LOG_LEVEL_ERROR:
        return
    with gil:
        try:
            line = (<bytes>text).decode("utf-8", "replace").rstrip()
            if not line:
                return
            if lvl == L.GGML_LOG_LEVEL_ERROR:
                _recent_errors.append(line)
            pylevel = _PY_LEVELS.get(lvl, logging.INFO)
            if llama_logger.isEnabledFor(pylevel):
                llama_logger.log(pylevel, "%s", line)
        except BaseException:
            pass


def set_log_level(level):
    """Set the lowest llama.cpp log level forwarded to the `pyllama.llama_cpp` logger.

    Args:
        level: a `logging` level (LOG_DEBUG_VERBOSE for libllama's debug lines, DEBUG, INFO,
            WARNING, ERROR).
    """
    global _log_min_level
    level = int(level)
    if level <= LOG_DEBUG_VERBOSE:
        _log_min_level = L.GGML_LOG_LEVEL_DEBUG
    elif level <= logging.INFO:  # DEBUG too: libllama has no trace level
        _log_min_level = L.GGML_LOG_LEVEL_INFO
    elif level <= logging.WARNING:
        _log_min_level = L.GGML_LOG_LEVEL_WARN
    else:
        _log_min_level = L.GGML_LOG_LEVEL_ERROR


# --- ggml backends ------------------------------------------------------------------------------
# The build has GGML_BACKEND_DL: every backend (the CPU one included) is a module loaded here,
# before anything else touches ggml, as upstream's tools do with ggml_backend_load_all().
LIB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib")
_BACKEND_FILE_PREFIX = "libggml-"
_BACKEND_FILE_SUFFIX = ".so"
# What was loaded, for list_backends(): (backend package or "pyllama", file path).
_loaded_backend_files = []


def _backend_package_dirs():
    """Yield (name, lib folder) of each installed backend package (entry points pyllama.backends).

    A backend package (e.g. pyllama-serve-cuda13) carries ggml backend modules in its own lib/
    folder and pins this package's exact version; a package of another version is not loaded,
    since ggml's backend interface is only stable within one pin.
    """
    from importlib.metadata import entry_points

    from pyllama import __version__

    for ep in entry_points(group="pyllama.backends"):
        try:
            module = ep.load()
        except Exception as exc:  # a broken optional package must not stop the core
            llama_logger.warning("backend package %s could not be imported: %s", ep.name, exc)
            continue
        version = getattr(module, "__version__", None)
        if version != __version__:
            llama_logger.warning(
                "backend package %s is version %s but pyllama is %s: not loaded "
                "(install the same version of both)", ep.name, version, __version__)
            continue
        yield ep.name, os.path.join(os.path.dirname(os.path.abspath(module.__file__)), "lib")


def _backend_modules(folder):
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names
            if n.startswith(_BACKEND_FILE_PREFIX) and n.endswith(_BACKEND_FILE_SUFFIX)
            and n not in ("libggml-base.so",)]


cdef _load_module(str path, str owner):
    cdef bytes cpath = os.fsencode(path)
    cdef const char * c_path = cpath
    cdef L.ggml_backend_reg_t reg
    with nogil:
        reg = L.ggml_backend_load(c_path)
    if reg == NULL:
        llama_logger.warning("failed to load ggml backend module %s", path)
        return False
    _loaded_backend_files.append((owner, path))
    return True


def _load_backends():
    """Load the ggml backend modules: backend packages' first, then pyllama/lib's.

    In pyllama/lib, ggml_backend_load_all_from_path picks the best CPU module for this CPU (a
    portable build ships one per CPU level). PYLLAMA_CPU_VARIANT=<name> (e.g. haswell, x64)
    loads libggml-cpu-<name>.so instead: for testing a lower CPU level on a newer machine.
    """
    # A build without GGML_BACKEND_DL (make's native one) has its CPU backend linked in.
    for i in range(L.ggml_backend_reg_count()):
        _loaded_backend_files.append(("built-in", (<bytes>L.ggml_backend_reg_name(
            L.ggml_backend_reg_get(i))).decode()))
    for owner, folder in _backend_package_dirs():
        for path in _backend_modules(folder):
            _load_module(path, owner)
    variant = os.environ.get("PYLLAMA_CPU_VARIANT", "").strip()
    if not BACKEND_DL and not variant:
        return
    cdef bytes cdir = os.fsencode(LIB_DIR)
    cdef const char * c_dir = cdir
    if variant:
        forced = os.path.join(LIB_DIR, f"libggml-cpu-{variant}.so")
        if not os.path.isfile(forced):
            have = [os.path.basename(p)[len("libggml-cpu-"):-3] for p in _backend_modules(LIB_DIR)
                    if os.path.basename(p).startswith("libggml-cpu-")]
            raise ImportError(f"PYLLAMA_CPU_VARIANT={variant}: no {forced} in this build "
                              f"(variants: {', '.join(have) or 'none, a native build'})")
        for path in _backend_modules(LIB_DIR):
            if not os.path.basename(path).startswith("libggml-cpu"):
                _load_module(path, "pyllama")
        _load_module(forced, "pyllama")
    else:
        before = L.ggml_backend_reg_count()
        with nogil:
            L.ggml_backend_load_all_from_path(c_dir)
        for i in range(before, L.ggml_backend_reg_count()):
            _loaded_backend_files.append(("pyllama", (<bytes>L.ggml_backend_reg_name(
                L.ggml_backend_reg_get(i))).decode()))
    if L.ggml_backend_dev_by_type(L.GGML_BACKEND_DEVICE_TYPE_CPU) == NULL:
        detail = "; ".join(_recent_errors)
        raise ImportError(f"no ggml CPU backend could be loaded from {LIB_DIR}"
                          + (f": {detail}" if detail else ""))


L.llama_log_set(_log_callback, NULL)
_load_backends()
L.llama_backend_init()
set_log_level(llama_logger.getEffectiveLevel())

_DEVICE_TYPES = {L.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu", L.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
                 L.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu", L.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
                 L.GGML_BACKEND_DEVICE_TYPE_META: "meta"}


def list_devices():
    """Return every ggml device: name, description, type, backend, total and free bytes.

    Thread-safe. CPU devices are included (type "cpu"); upstream's --list-devices omits them.
    """
    cdef size_t i, free_bytes, total
    cdef L.ggml_backend_dev_t dev
    out = []
    for i in range(L.ggml_backend_dev_count()):
        dev = L.ggml_backend_dev_get(i)
        free_bytes = total = 0
        L.ggml_backend_dev_memory(dev, &free_bytes, &total)
        out.append({
            "name": (<bytes>L.ggml_backend_dev_name(dev)).decode(),
            "description": (<bytes>L.ggml_backend_dev_description(dev)).decode("utf-8", "replace"),
            "type": _DEVICE_TYPES.get(L.ggml_backend_dev_type(dev), "unknown"),
            "backend": (<bytes>L.ggml_backend_reg_name(L.ggml_backend_dev_backend_reg(dev))).decode(),
            "memory_total": total,
            "memory_free": free_bytes,
        })
    return out


def list_backends():
    """Return (owner, module) of each ggml backend at import, in registration order.

    The owner is "pyllama" (pyllama/lib), a backend package's name, or "built-in" (linked into
    libggml: a build without GGML_BACKEND_DL); the module is its file, or the backend's name
    where ggml picked the file (the best CPU module of a portable build) or none was loaded.
    """
    return list(_loaded_backend_files)


def format_device_list():
    """Return upstream's `--list-devices` text (common_print_available_devices)."""
    lines = ["Available devices:"]
    gpus = [d for d in list_devices() if d["type"] != "cpu"]
    if not gpus:
        lines.append("  (none)")
    mib = 1024 * 1024
    for d in gpus:
        lines.append(f"  {d['name']}: {d['description']} ({d['memory_total'] // mib} MiB, "
                     f"{d['memory_free'] // mib} MiB free)")
    return "\n".join(lines) + "\n"


# --- ggml RPC ------------------------------------------------------------------------------------
# Remote devices (llama-server's --rpc: common/arg.cpp add_rpc_devices) and the worker side
# (tools/rpc/rpc-server.cpp). Both go through the "RPC" backend's proc addresses, as upstream's
# tools do, so they work whether ggml-rpc is linked in or a module loaded from pyllama/lib.
cdef extern from "ggml-rpc.h":
    int RPC_PROTO_MAJOR_VERSION
    int RPC_PROTO_MINOR_VERSION
    int RPC_PROTO_PATCH_VERSION

cdef extern from *:
    """
    #include <poll.h>
    #include <stdio.h>
    #include <string.h>
    #include <unistd.h>
    #include "ggml-backend.h"
    typedef ggml_backend_reg_t (*pyllama_rpc_add_server_t)(const char * endpoint);
    typedef void (*pyllama_rpc_start_server_t)(const char * endpoint, const char * cache_dir,
                                               size_t n_threads, size_t n_devices,
                                               ggml_backend_dev_t * devices);

    /* GGML_ABORT's hook (ggml_abort calls it, then abort()). Any thread, GIL not taken: the
       thread that holds the GIL may be the one waiting on the aborting one (a device-memory
       query), so the message goes down a pipe to a Python thread, and this waits for it at
       most wait_ms before the process aborts. */
    static int pyllama_abort_wake_fd = -1;
    static int pyllama_abort_done_fd = -1;
    static int pyllama_abort_wait_ms = 0;
    static void pyllama_on_ggml_abort(const char * message) {
        fprintf(stderr, "%s\\n", message);
        fflush(stderr);
        if (pyllama_abort_wake_fd < 0) {
            return;
        }
        size_t n = strlen(message);
        if (n > 2048) {
            n = 2048;  /* below PIPE_BUF: one atomic write */
        }
        if (write(pyllama_abort_wake_fd, message, n) < 0) {
            return;
        }
        struct pollfd done = {pyllama_abort_done_fd, POLLIN, 0};
        poll(&done, 1, pyllama_abort_wait_ms);
    }
    static void pyllama_line_buffer_stdout(void) {
        setvbuf(stdout, NULL, _IOLBF, 0);  /* the server's banner and client lines, as printed */
    }
    static void pyllama_install_abort_hook(int wake_fd, int done_fd, int wait_ms) {
        pyllama_abort_wake_fd = wake_fd;
        pyllama_abort_done_fd = done_fd;
        pyllama_abort_wait_ms = wait_ms;
        ggml_set_abort_callback(pyllama_on_ggml_abort);
    }
    """
    ctypedef L.ggml_backend_reg_t (*pyllama_rpc_add_server_t)(const char * endpoint) nogil
    ctypedef void (*pyllama_rpc_start_server_t)(const char * endpoint, const char * cache_dir,
                                                size_t n_threads, size_t n_devices,
                                                L.ggml_backend_dev_t * devices) nogil
    void pyllama_install_abort_hook(int wake_fd, int done_fd, int wait_ms)
    void pyllama_line_buffer_stdout()

RPC_PROTO_VERSION = (RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION, RPC_PROTO_PATCH_VERSION)
_rpc_endpoints = {}  # endpoint -> its device names, registered once per process


def supports_rpc():
    """Say whether this build has ggml's RPC backend (llama_supports_rpc)."""
    return bool(L.llama_supports_rpc())


cdef void * _rpc_proc(const char * name) except NULL:
    cdef L.ggml_backend_reg_t reg = L.ggml_backend_reg_by_name(b"RPC")
    if reg == NULL:
        raise ModelLoadError("RPC not supported in this build")
    cdef void * fn = L.ggml_backend_reg_get_proc_address(reg, name)
    if fn == NULL:
        raise ModelLoadError(f"failed to find the RPC backend's {name.decode()}")
    return fn


def add_rpc_server(str endpoint):
    """Register the devices of the RPC server at `endpoint` (host:port); return their names.

    Upstream's add_rpc_devices for one server: ggml_backend_rpc_add_server connects to it (and
    keeps the connection for the process's life), then its backend is registered, so its
    devices (RPC0, RPC1, ... across servers) are listed and used like local ones. A second call
    for the same endpoint returns the same names. Not thread-safe: call before loading a model.
    Check the peer first (pyllama.engine.rpc.probe): ggml aborts the process on an endpoint
    that refuses, or on a failed handshake.

    Raises:
        ModelLoadError: no RPC backend, or the server has no devices.
    """
    if endpoint in _rpc_endpoints:
        return list(_rpc_endpoints[endpoint])
    cdef pyllama_rpc_add_server_t add = <pyllama_rpc_add_server_t> _rpc_proc(b"ggml_backend_rpc_add_server")
    cdef bytes cendpoint = endpoint.encode()
    cdef const char * c_endpoint = cendpoint
    cdef L.ggml_backend_reg_t reg
    with nogil:
        reg = add(c_endpoint)
    if reg == NULL:
        raise ModelLoadError(f"RPC server {endpoint} has no devices")
    L.ggml_backend_register(reg)
    cdef size_t i
    names = [(<bytes>L.ggml_backend_dev_name(L.ggml_backend_reg_dev_get(reg, i))).decode()
             for i in range(L.ggml_backend_reg_dev_count(reg))]
    _rpc_endpoints[endpoint] = tuple(names)
    return names


def rpc_start_server(str endpoint, cache_dir, int n_threads, devices):
    """Serve `devices` (names) over ggml RPC at `endpoint`; return only if it fails to start.

    ggml_backend_rpc_start_server (tools/rpc/rpc-server.cpp's main): prints its banner, binds,
    then serves one client at a time, forever. Runs with the GIL released, so only signals
    stop it: restore SIGINT/SIGTERM's default actions before calling.

    Raises:
        InvalidRequestError: an unknown device name.
    """
    cdef pyllama_rpc_start_server_t start = <pyllama_rpc_start_server_t> _rpc_proc(b"ggml_backend_rpc_start_server")
    cdef vector[L.ggml_backend_dev_t] devs
    cdef L.ggml_backend_dev_t dev
    for name in devices:
        dev = L.ggml_backend_dev_by_name(name.encode())
        if dev == NULL:
            raise InvalidRequestError(f"unknown device: {name}")
        devs.push_back(dev)
    cdef bytes cendpoint = endpoint.encode()
    cdef bytes ccache = os.fsencode(cache_dir) if cache_dir else b""
    cdef const char * c_endpoint = cendpoint
    cdef const char * c_cache = <const char *> ccache if cache_dir else NULL
    cdef size_t threads = n_threads
    pyllama_line_buffer_stdout()
    with nogil:
        start(c_endpoint, c_cache, threads, devs.size(), devs.data())


_abort_hook = None


def set_abort_hook(hook, double wait_s=5.0):
    """Call `hook(message)` on a Python thread when ggml aborts the process (GGML_ABORT).

    ggml-rpc aborts when an RPC server dies or answers garbage mid-computation; the hook gets up
    to `wait_s` seconds (e.g. to fail the requests in flight with a clear error) before the
    process aborts all the same. The last hook set wins; None removes it.
    """
    global _abort_hook
    first = _abort_hook is None and hook is not None
    _abort_hook = hook
    if not first:
        return
    import threading

    wake_r, wake_w = os.pipe()
    done_r, done_w = os.pipe()

    def watch():
        message = os.read(wake_r, 4096).decode("utf-8", "replace").strip()
        try:
            if _abort_hook is not None:
                _abort_hook(message)
        except BaseException:
            llama_logger.exception("the ggml abort hook failed")
        finally:
            os.write(done_w, b"x")

    threading.Thread(target=watch, name="pyllama-ggml-abort", daemon=True).start()
    pyllama_install_abort_hook(wake_w, done_r, int(wait_s * 1000))


def llama_version():
    """Return libllama's version string."""
    return (<bytes>L.llama_version()).decode()


def llama_build_commit():
    """The llama.cpp commit this build was pinned to (vendor/pin.toml)."""
    return PYLLAMA_LLAMA_COMMIT


def system_info():
    """Return llama.cpp's description of the CPU features and backends in use."""
    return (<bytes>L.llama_print_system_info()).decode()


def supports_gpu_offload():
    """Say whether this build has a GPU backend."""
    return bool(L.llama_supports_gpu_offload())


_GGUF_MAGIC = b"GGUF"
LOAD_MODES = {"auto": L.LLAMA_LOAD_MODE_AUTO, "none": L.LLAMA_LOAD_MODE_NONE, "mmap": L.LLAMA_LOAD_MODE_MMAP,
              "mlock": L.LLAMA_LOAD_MODE_MLOCK, "mmap+mlock": L.LLAMA_LOAD_MODE_MMAP_MLOCK,
              "dio": L.LLAMA_LOAD_MODE_DIRECT_IO}
LAZY_MODES = {"off": L.LLAMA_LAZY_MODE_OFF, "auto": L.LLAMA_LAZY_MODE_AUTO, "on": L.LLAMA_LAZY_MODE_ON}
NUMA = {"distribute": L.GGML_NUMA_STRATEGY_DISTRIBUTE, "isolate": L.GGML_NUMA_STRATEGY_ISOLATE,
        "numactl": L.GGML_NUMA_STRATEGY_NUMACTL}


def numa_init(str strategy):
    """Apply a NUMA strategy (distribute, isolate, numactl) once, before loading a model."""
    if strategy not in NUMA:
        raise InvalidRequestError("numa must be distribute, isolate or numactl")
    L.llama_numa_init(NUMA[strategy])


SPLIT_MODES = {"none": L.LLAMA_SPLIT_MODE_NONE, "layer": L.LLAMA_SPLIT_MODE_LAYER,
               "row": L.LLAMA_SPLIT_MODE_ROW, "tensor": L.LLAMA_SPLIT_MODE_TENSOR}


cdef void _fill_override(L.llama_model_kv_override * item, str key, value) except *:
    cdef bytes ckey = key.encode()
    if len(ckey) >= 128:
        raise InvalidRequestError(f"override key too long: {key}")
    memset(item, 0, sizeof(L.llama_model_kv_override))
    memcpy(item.key, <const char *> ckey, len(ckey))
    if isinstance(value, bool):
        item.tag = L.LLAMA_KV_OVERRIDE_TYPE_BOOL
        item.val_bool = value
    elif isinstance(value, int):
        item.tag = L.LLAMA_KV_OVERRIDE_TYPE_INT
        item.val_i64 = value
    elif isinstance(value, float):
        item.tag = L.LLAMA_KV_OVERRIDE_TYPE_FLOAT
        item.val_f64 = value
    elif isinstance(value, str):
        cval = value.encode()
        if len(cval) >= 128:
            raise InvalidRequestError(f"override value too long for {key}")
        item.tag = L.LLAMA_KV_OVERRIDE_TYPE_STR
        memcpy(item.val_str, <const char *> cval, len(cval))
    else:
        raise InvalidRequestError(f"override {key}: values must be bool, int, float or str")


cdef object _token_or_none(L.llama_token tok):
    return None if tok == L.LLAMA_TOKEN_NULL else tok


cdef str _meta_string(int32_t n, char * buf, size_t size):
    return buf[:n].decode("utf-8", "replace") if n >= 0 else None


cdef class ModelParams:
    """llama_model_params built from Model's options (see Model), with the storage they point
    into. Built apart from the Model so that --fit can adjust them before the load.

    tensor_overrides: ((pattern, buffer type name), ...): tensors whose name matches the regex
        go to that buffer type (llama-server's -ot; "CPU" for --cpu-moe / --n-cpu-moe).

    Raises:
        InvalidRequestError: an option is out of range, or an unknown device / buffer type.
    """

    def __init__(self, *, int n_gpu_layers=-1, bint use_mmap=True, bint use_mlock=False,
                 bint vocab_only=False, bint check_tensors=False, bint repack=True,
                 kv_overrides=None, load_mode=None, split_mode="layer", int main_gpu=0,
                 tensor_split=None, bint no_host=False, lazy_mode="auto", devices=None,
                 tensor_overrides=None):
        self.params = L.llama_model_default_params()
        cdef L.llama_model_params * params = &self.params
        params.n_gpu_layers = n_gpu_layers
        if use_mmap:
            params.load_mode = L.LLAMA_LOAD_MODE_MMAP_MLOCK if use_mlock else L.LLAMA_LOAD_MODE_MMAP
        else:
            params.load_mode = L.LLAMA_LOAD_MODE_MLOCK if use_mlock else L.LLAMA_LOAD_MODE_NONE
        if load_mode is not None:
            if load_mode not in LOAD_MODES:
                raise InvalidRequestError(f"load_mode must be one of {', '.join(LOAD_MODES)}")
            params.load_mode = LOAD_MODES[load_mode]
        if split_mode not in SPLIT_MODES:
            raise InvalidRequestError(f"split_mode must be one of {', '.join(SPLIT_MODES)}")
        params.split_mode = SPLIT_MODES[split_mode]
        params.main_gpu = main_gpu
        params.no_host = no_host
        if lazy_mode not in LAZY_MODES:
            raise InvalidRequestError("lazy_mode must be on, off or auto")
        params.lazy_mode = LAZY_MODES[lazy_mode]
        # always a buffer of llama_max_devices: --fit writes its split into it
        self.split.resize(max(L.llama_max_devices(), len(tensor_split or ())))
        for i, value in enumerate(tensor_split or ()):
            self.split[i] = value
        params.tensor_split = self.split.data()
        cdef L.ggml_backend_dev_t dev
        if devices is not None:
            names = [d for d in devices if d]
            if names != ["none"]:
                for name in names:  # as upstream's parse_device_list
                    dev = L.ggml_backend_dev_by_name(name.encode())
                    if dev == NULL or L.ggml_backend_dev_type(dev) == L.GGML_BACKEND_DEVICE_TYPE_CPU:
                        raise InvalidRequestError(f"invalid device: {name}")
                    self.devices.push_back(dev)
            self.devices.push_back(NULL)
            params.devices = self.devices.data()
        params.vocab_only = vocab_only
        params.check_tensors = check_tensors
        params.use_extra_bufts = repack
        cdef L.llama_model_kv_override item
        if kv_overrides:
            for key, value in kv_overrides.items():
                _fill_override(&item, key, value)
                self.kv_overrides.push_back(item)
            memset(&item, 0, sizeof(item))  # the list ends with an empty key
            self.kv_overrides.push_back(item)
            params.kv_overrides = self.kv_overrides.data()
        self._set_tensor_overrides(tensor_overrides or ())

    def _set_tensor_overrides(self, overrides):
        # as upstream's parse_tensor_buffer_overrides: buffer types by the name of each
        # device's default buffer type; the list ends with {NULL, NULL} and has room for
        # llama_max_tensor_buft_overrides entries, which --fit may add to
        cdef dict bufts = {}
        cdef L.ggml_backend_dev_t dev
        cdef L.ggml_backend_buffer_type_t buft
        cdef size_t i
        for i in range(L.ggml_backend_dev_count()):
            dev = L.ggml_backend_dev_get(i)
            buft = L.ggml_backend_dev_buffer_type(dev)
            if buft != NULL:
                bufts[L.ggml_backend_buft_name(buft).decode()] = <size_t> buft
        self.patterns = []
        self.tensor_overrides.clear()
        cdef L.llama_model_tensor_buft_override entry
        for pattern, buffer_type in overrides:
            if buffer_type not in bufts:
                raise InvalidRequestError(
                    f"unknown buffer type {buffer_type!r} (available: {', '.join(sorted(bufts))})",
                    param="tensor_overrides")
            self.patterns.append(pattern.encode())
            entry.pattern = <const char *> self.patterns[-1]
            entry.buft = <L.ggml_backend_buffer_type_t> <size_t> bufts[buffer_type]
            self.tensor_overrides.push_back(entry)
        entry.pattern = NULL
        entry.buft = NULL
        self.tensor_overrides.resize(max(self.tensor_overrides.size() + 1,
                                         L.llama_max_tensor_buft_overrides()), entry)
        self.params.tensor_buft_overrides = self.tensor_overrides.data() if overrides else NULL

    @property
    def n_gpu_layers(self):
        return self.params.n_gpu_layers

    @property
    def tensor_split(self):
        return tuple(self.split[i] for i in range(self.split.size()))


cdef class Model:
    """A GGUF model loaded with libllama.

    Args:
        path: the .gguf file.
        n_gpu_layers: layers to offload to the GPU; -1 offloads all, 0 none (CPU builds ignore it).
        use_mmap: map the file instead of reading it into memory.
        use_mlock: keep the model in RAM.
        vocab_only: load the vocabulary and metadata only, no weights.
        check_tensors: validate tensor data while loading.
        repack: let the CPU backend repack weights for faster kernels (llama-server's --repack).
        kv_overrides: {key: value} metadata overrides (bool, int, float or str values), as
            llama-server's --override-kv.
        load_mode: None (from use_mmap/use_mlock) or auto, none, mmap, mlock, mmap+mlock, dio.
        split_mode: none, layer, row or tensor (several GPUs).
        main_gpu: the GPU for split_mode none.
        tensor_split: proportions of the model per GPU.
        no_host: bypass the host buffer.
        lazy_mode: on, off or auto: read the rows of marked tensors on demand.
        devices: names of the devices to offload to (see list_devices()); None for every
            device, ["none"] or [] for none (llama-server's -dev).
        tensor_overrides: ((regex, buffer type), ...) placement of matching tensors (-ot).
        params: a ModelParams instead of the options above (--fit adjusts one before loading).

    Raises:
        ModelNotFoundError: the path does not exist or is not a file.
        InvalidModelError: the file is not a GGUF model, or is damaged or truncated.
        ModelLoadError: libllama refused the model for another reason.

    Thread-safe for reads once constructed.
    """

    def __cinit__(self, path, *, ModelParams params=None, **options):
        self.ptr = NULL
        self.vocab = NULL
        self.special_texts = {}
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ModelNotFoundError(f"model file not found: {self.path}")
        with open(self.path, "rb") as f:
            if f.read(4) != _GGUF_MAGIC:
                raise InvalidModelError(f"not a GGUF file (bad magic): {self.path}")
        if params is None:
            params = ModelParams(**options)
        elif options:
            raise TypeError("pass either params or options, not both")

        cdef bytes cpath = os.fsencode(self.path)
        cdef const char * c_path = cpath
        _recent_errors.clear()
        with nogil:
            self.ptr = L.llama_model_load_from_file(c_path, params.params)
        if self.ptr == NULL:
            detail = "; ".join(_recent_errors) or "libllama gave no reason"
            raise InvalidModelError(f"failed to load model {self.path}: {detail}")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        cdef L.llama_token t
        with nogil:  # ignore_eos biases them per request; a vocabulary scan costs ms
            for t in range(self.n_vocab):
                if L.llama_vocab_is_eog(self.vocab, t):
                    self.eog_ids.push_back(t)

    def __dealloc__(self):
        if self.ptr != NULL:
            L.llama_model_free(self.ptr)
            self.ptr = NULL

    def close(self):
        """Free the model. Contexts made from it must be closed first."""
        if self.ptr != NULL:
            L.llama_model_free(self.ptr)
            self.ptr = NULL
            self.vocab = NULL

    def __repr__(self):
        return f"<Model {self.path!r} {self.architecture} n_vocab={self.n_vocab}>"

    cdef int _require_open(self) except -1:
        if self.ptr == NULL:
            raise ModelLoadError("model is closed")
        return 0

    # --- metadata --------------------------------------------------------------------------
    def meta(self, str key, default=None):
        """Return one GGUF metadata value as a string (arrays are summarised by libllama)."""
        self._require_open()
        cdef bytes ckey = key.encode()
        cdef vector[char] buf = vector[char](256)
        cdef int32_t n = L.llama_model_meta_val_str(self.ptr, ckey, buf.data(), buf.size())
        if n < 0:
            return default
        if <size_t>n >= buf.size():
            buf.resize(n + 1)
            n = L.llama_model_meta_val_str(self.ptr, ckey, buf.data(), buf.size())
        return _meta_string(n, buf.data(), buf.size())

    @property
    def metadata(self):
        """All GGUF metadata key/value pairs, as strings."""
        self._require_open()
        cdef int32_t count = L.llama_model_meta_count(self.ptr)
        cdef vector[char] buf = vector[char](256)
        cdef int32_t i, n
        out = {}
        for i in range(count):
            n = L.llama_model_meta_key_by_index(self.ptr, i, buf.data(), buf.size())
            if <size_t>n >= buf.size():
                buf.resize(n + 1)
                n = L.llama_model_meta_key_by_index(self.ptr, i, buf.data(), buf.size())
            key = _meta_string(n, buf.data(), buf.size())
            n = L.llama_model_meta_val_str_by_index(self.ptr, i, buf.data(), buf.size())
            if <size_t>n >= buf.size():
                buf.resize(n + 1)
                n = L.llama_model_meta_val_str_by_index(self.ptr, i, buf.data(), buf.size())
            out[key] = _meta_string(n, buf.data(), buf.size())
        return out

    @property
    def general(self):
        """The `general.*` metadata keys, without the prefix."""
        return {k[8:]: v for k, v in self.metadata.items() if k.startswith("general.")}

    @property
    def architecture(self):
        return self.meta("general.architecture")

    @property
    def name(self):
        return self.meta("general.name")

    @property
    def description(self):
        """libllama's one-line description (architecture, size, quantisation)."""
        self._require_open()
        cdef char buf[256]
        cdef int32_t n = L.llama_model_desc(self.ptr, buf, sizeof(buf))
        return _meta_string(min(n, 255), buf, sizeof(buf))

    @property
    def n_ctx_train(self):
        self._require_open()
        return L.llama_model_n_ctx_train(self.ptr)

    @property
    def n_embd(self):
        self._require_open()
        return L.llama_model_n_embd(self.ptr)

    @property
    def n_layer(self):
        self._require_open()
        return L.llama_model_n_layer(self.ptr)

    @property
    def n_head(self):
        self._require_open()
        return L.llama_model_n_head(self.ptr)

    @property
    def n_params(self):
        self._require_open()
        return L.llama_model_n_params(self.ptr)

    @property
    def size(self):
        """Total size of the model's tensors in bytes."""
        self._require_open()
        return L.llama_model_size(self.ptr)

    @property
    def has_encoder(self):
        self._require_open()
        return bool(L.llama_model_has_encoder(self.ptr))

    @property
    def chat_template(self):
        """The chat template embedded in the GGUF, or None."""
        self._require_open()
        cdef const char * tmpl = L.llama_model_chat_template(self.ptr, NULL)
        return None if tmpl == NULL else (<bytes>tmpl).decode("utf-8", "replace")

    def named_chat_template(self, str name):
        """A named template embedded in the GGUF (e.g. "rerank", "tool_use"), or None."""
        self._require_open()
        cdef bytes cname = name.encode()
        cdef const char * tmpl = L.llama_model_chat_template(self.ptr, cname)
        return None if tmpl == NULL else (<bytes>tmpl).decode("utf-8", "replace")

    def load_lora(self, path):
        """Load a LoRA adapter (GGUF) for this model.

        Raises:
            ModelNotFoundError: no such file.
            InvalidModelError: not a LoRA adapter for this model.
        """
        return LoraAdapter(self, path)

    # --- special tokens --------------------------------------------------------------------
    @property
    def token_bos(self):
        return _token_or_none(L.llama_vocab_bos(self.vocab))

    @property
    def token_eos(self):
        return _token_or_none(L.llama_vocab_eos(self.vocab))

    @property
    def token_eot(self):
        return _token_or_none(L.llama_vocab_eot(self.vocab))

    @property
    def token_nl(self):
        return _token_or_none(L.llama_vocab_nl(self.vocab))

    @property
    def add_bos(self):
        """Whether the vocabulary asks for BOS at the start of a prompt."""
        return bool(L.llama_vocab_get_add_bos(self.vocab))

    @property
    def add_eos(self):
        return bool(L.llama_vocab_get_add_eos(self.vocab))

    @property
    def fim_tokens(self):
        """FIM special tokens: dict of pre, suf, mid, pad, rep, sep (None when absent)."""
        return {"pre": _token_or_none(L.llama_vocab_fim_pre(self.vocab)),
                "suf": _token_or_none(L.llama_vocab_fim_suf(self.vocab)),
                "mid": _token_or_none(L.llama_vocab_fim_mid(self.vocab)),
                "pad": _token_or_none(L.llama_vocab_fim_pad(self.vocab)),
                "rep": _token_or_none(L.llama_vocab_fim_rep(self.vocab)),
                "sep": _token_or_none(L.llama_vocab_fim_sep(self.vocab))}

    @property
    def token_sep(self):
        return _token_or_none(L.llama_vocab_sep(self.vocab))

    @property
    def add_sep(self):
        return bool(L.llama_vocab_get_add_sep(self.vocab))

    def is_eog(self, L.llama_token token):
        """Say whether `token` ends generation (EOS, EOT and the like)."""
        self.check_token(token)
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    @property
    def eog_tokens(self):
        """Every token that ends generation, in id order."""
        return list(self.eog_ids)

    def is_control(self, L.llama_token token):
        self.check_token(token)
        return bool(L.llama_vocab_is_control(self.vocab, token))

    def token_text(self, L.llama_token token):
        """The token's text as stored in the vocabulary (no byte decoding)."""
        self.check_token(token)
        return (<bytes>L.llama_vocab_get_text(self.vocab, token)).decode("utf-8", "replace")

    # --- tokenization ----------------------------------------------------------------------
    cdef int check_token(self, L.llama_token token) except -1:
        if self.vocab == NULL:
            raise ModelLoadError("model is closed")
        if token < 0 or token >= self.n_vocab:
            raise InvalidTokenError(f"invalid token id {token}: the vocabulary has {self.n_vocab} tokens")
        return 0

    def tokenize(self, text, *, bint add_special=True, bint parse_special=False):
        """Turn text into token ids.

        Args:
            text: str or UTF-8 bytes.
            add_special: add BOS/EOS as the vocabulary asks.
            parse_special: recognise special-token text such as "<start_of_turn>".

        Returns:
            A list of token ids. Thread-safe.
        """
        self._require_open()
        cdef bytes data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        cdef const char * c_text = data
        cdef int32_t n_text = len(data)
        cdef vector[L.llama_token] out = vector[L.llama_token](n_text + 2 * add_special + 1)
        cdef int32_t n
        with nogil:
            n = L.llama_tokenize(self.vocab, c_text, n_text, out.data(), out.size(),
                                 add_special, parse_special)
            if n < 0:
                out.resize(-n)
                n = L.llama_tokenize(self.vocab, c_text, n_text, out.data(), out.size(),
                                     add_special, parse_special)
        if n < 0:
            raise InvalidTokenError("tokenization failed: the text is too long")
        return [out[i] for i in range(n)]

    def special_text_tokens(self, str text):
        """A chat template's delimiter or tag (e.g. "<start_of_turn>user\\n") as token ids:
        special tokens parsed, nothing added. Thread-safe.

        PERF(pyllama): cached (up to 256 texts): every chat request asks for the same few, and
        llama.cpp's tokenizer takes ~60 us a call on a vocabulary with thousands of special
        tokens (gemma 3), however short the text.

        Returns:
            A tuple of token ids.
        """
        cached = self.special_texts.get(text)
        if cached is None:
            cached = tuple(self.tokenize(text, add_special=False, parse_special=True)) if text else ()
            if len(self.special_texts) < 256:
                self.special_texts[text] = cached
        return cached

    def count_tokens(self, text, *, bint add_special=True, bint parse_special=False):
        """Count the tokens `text` makes, without building their list.

        For a text that may be far longer than any context: tokenize() would hold a Python int
        per token (36 bytes each: 750 MB for a 20 MB prompt), this holds none.

        Args:
            text: str or UTF-8 bytes.
            add_special: add BOS/EOS as the vocabulary asks.
            parse_special: recognise special-token text.

        Returns:
            The number of tokens tokenize() would return. Thread-safe.
        """
        self._require_open()
        cdef bytes data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        cdef const char * c_text = data
        cdef int32_t n_text = len(data)
        cdef int32_t n
        with nogil:
            # n_tokens_max 0: llama_tokenize answers minus the count, writing nothing
            n = L.llama_tokenize(self.vocab, c_text, n_text, NULL, 0, add_special, parse_special)
        if n == INT32_MIN:
            raise InvalidTokenError("tokenization failed: the text is too long")
        return -n if n < 0 else n

    cdef bytes piece_c(self, L.llama_token token, bint special):
        cdef char buf[128]
        cdef int32_t n = L.llama_token_to_piece(self.vocab, token, buf, sizeof(buf), 0, special)
        cdef vector[char] big
        if n >= 0:
            return PyBytes_FromStringAndSize(buf, n)
        big.resize(-n)
        n = L.llama_token_to_piece(self.vocab, token, big.data(), big.size(), 0, special)
        return PyBytes_FromStringAndSize(big.data(), n)

    def token_to_piece(self, L.llama_token token, *, bint special=False):
        """Return the bytes of one token (may be part of a multi-byte character).

        Args:
            token: a token id.
            special: render special tokens as their text (otherwise they give b"").
        """
        self.check_token(token)
        return self.piece_c(token, special)

    def detokenize(self, tokens, *, bint remove_special=False, bint unparse_special=False):
        """Turn token ids back into text.

        Args:
            tokens: token ids.
            remove_special: drop a leading BOS / trailing EOS the vocabulary adds.
            unparse_special: render special tokens as their text.

        Returns:
            The text; bytes that are not valid UTF-8 become U+FFFD. Thread-safe.
        """
        self._require_open()
        cdef vector[L.llama_token] toks
        for t in tokens:
            self.check_token(t)
            toks.push_back(t)
        cdef vector[char] buf = vector[char](toks.size() * 8 + 16)
        cdef int32_t n
        with nogil:
            n = L.llama_detokenize(self.vocab, toks.data(), toks.size(), buf.data(), buf.size(),
                                   remove_special, unparse_special)
            if n < 0:
                buf.resize(-n)
                n = L.llama_detokenize(self.vocab, toks.data(), toks.size(), buf.data(), buf.size(),
                                       remove_special, unparse_special)
        return buf.data()[:n].decode("utf-8", "replace")


cdef class LoraAdapter:
    """A LoRA adapter loaded for one Model; applied per batch with a scale by the engine."""

    def __cinit__(self, Model model, path):
        self.ptr = NULL
        self.model = model
        self.path = os.fspath(path)
        model._require_open()
        if not os.path.isfile(self.path):
            raise ModelNotFoundError(f"LoRA adapter not found: {self.path}")
        cdef bytes cpath = os.fsencode(self.path)
        _recent_errors.clear()
        self.ptr = L.llama_adapter_lora_init(model.ptr, cpath)
        if self.ptr == NULL:
            detail = "; ".join(_recent_errors) or "libllama gave no reason"
            raise InvalidModelError(f"failed to load LoRA adapter {self.path}: {detail}")

    def __dealloc__(self):
        # NOTE: an adapter must not outlive its model; ours holds a reference to it.
        if self.ptr != NULL and self.model.ptr != NULL:
            L.llama_adapter_lora_free(self.ptr)
        self.ptr = NULL
