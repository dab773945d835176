"""Device plumbing shared by build_engine.py and benchmark.py (and vitdeploy.runtime's TrtRunner).

The two on-device scripts are copied into deploy bundles and run on a Jetson without vitdeploy,
so this file travels with them and obeys the same rules: standard library only at import time
(NumPy, TensorRT and cuda-python/PyCUDA are imported inside the functions that need them) and
Python 3.6 compatible (JetPack 4.6): no dataclasses, no walrus, no ``from __future__ import
annotations``. The scripts load it by path from their own folder, so keep it next to them.

What is here:

* the one-line errors: `UsageError` (exit 2) and its `TensorRTNotFound` / `CudaNotFound`;
* `warn` and `write_atomic` (temporary file + rename, so no reader sees half a file);
* `load_cuda`: device memory, streams, events and device queries behind one small interface,
  over cuda-python (`CudaPython`) or PyCUDA (`PyCuda`);
* `import_tensorrt`, `get_trt_logger` and the helpers that run an engine with either TensorRT
  API: the name-based tensor API (8.5+, the only one from 10) or the bindings API of 8.2-8.4.
"""

import os
import re
import sys
import tempfile

__all__ = [
    "UsageError",
    "TensorRTNotFound",
    "CudaNotFound",
    "NO_CUDA_MESSAGE",
    "warn",
    "write_atomic",
    "version_tuple",
    "CudaPython",
    "PyCuda",
    "import_cudart",
    "load_cuda",
    "query_device",
    "import_tensorrt",
    "get_trt_logger",
    "engine_io",
    "uses_tensor_api",
    "profile_range",
    "set_input_shape",
    "output_shape",
    "ensure_buffer",
    "bind",
    "enqueue",
]

#: CudaNotFound's message: neither cuda-python nor PyCUDA can be imported.
NO_CUDA_MESSAGE = ("neither cuda-python nor PyCUDA is installed: run jetson/setup.sh (pip install cuda-python, or "
                   "JetPack 4.6's python3-pycuda)")


class UsageError(Exception):
    """A problem with the arguments, input files or machine, explained in one line (exit 2)."""


class TensorRTNotFound(UsageError):
    """``import tensorrt`` failed."""


class CudaNotFound(UsageError):
    """Neither cuda-python nor PyCUDA can be imported (needed for calibration and inference)."""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def warn(message):
    """CLI output: one ``warning:`` line on stderr."""
    sys.stderr.write("warning: " + message + "\n")


def write_atomic(path, data):
    """Write ``data`` (bytes, or text as UTF-8) to a temporary file in the same folder, then rename
    it over ``path``: a reader (or a crash half-way through a 10-minute build) never sees half a file."""
    if not isinstance(data, bytes):
        data = data.encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def version_tuple(version):
    """``"10.3.0.26" -> (10, 3, 0, 26)``; unparseable parts stop the tuple (``"unknown" -> ()``)."""
    parts = []
    for piece in str(version).split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group(0)))
    return tuple(parts)


# ---------------------------------------------------------------------------------------------
# CUDA: cuda-python (preferred) or PyCUDA, behind one small interface
# ---------------------------------------------------------------------------------------------


class CudaPython(object):
    """Device memory, streams, events and device queries through cuda-python's runtime API.

    Every cuda-python call returns ``(error, *values)``; `_check` turns errors into one-line
    RuntimeErrors. The runtime API uses the device's primary context, as TensorRT does.
    """

    name = "cuda-python"

    def __init__(self, cudart, device=0):
        self.cudart = cudart
        self._check(cudart.cudaSetDevice(device))
        self.device = device

    def _check(self, result):
        err, values = result[0], result[1:]
        if err != self.cudart.cudaError_t.cudaSuccess:
            text = self.cudart.cudaGetErrorString(err)[1]
            text = text.decode() if isinstance(text, bytes) else str(text)
            raise RuntimeError("CUDA error {}: {}".format(int(err), text))
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def malloc(self, nbytes):
        return int(self._check(self.cudart.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr):
        self._check(self.cudart.cudaFree(ptr))

    def host_empty(self, shape, dtype):
        """A host array for copies (plain NumPy memory here)."""
        import numpy as np
        return np.empty(shape, dtype)

    def htod(self, ptr, host, stream=None):
        """Host -> device copy: synchronous without a stream, else queued on it."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        if stream is None:
            self._check(self.cudart.cudaMemcpy(ptr, host.ctypes.data, host.nbytes, kind))
        else:
            self._check(self.cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, stream))

    def dtoh(self, host, ptr, stream):
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, stream))

    def stream_create(self):
        return self._check(self.cudart.cudaStreamCreate())

    @staticmethod
    def stream_handle(stream):
        return int(stream)

    def stream_synchronize(self, stream):
        self._check(self.cudart.cudaStreamSynchronize(stream))

    def stream_destroy(self, stream):
        self._check(self.cudart.cudaStreamDestroy(stream))

    def event_create(self):
        return self._check(self.cudart.cudaEventCreate())

    def event_record(self, event, stream):
        self._check(self.cudart.cudaEventRecord(event, stream))

    def event_elapsed_ms(self, start, end):
        self._check(self.cudart.cudaEventSynchronize(end))
        return float(self._check(self.cudart.cudaEventElapsedTime(start, end)))

    def event_destroy(self, event):
        self._check(self.cudart.cudaEventDestroy(event))

    def mem_get_info(self):
        """``(free, total)`` bytes of device memory (system RAM on a Jetson)."""
        free, total = self._check(self.cudart.cudaMemGetInfo())
        return int(free), int(total)

    def device_properties(self):
        """``(name, (major, minor))`` of the current device."""
        props = self._check(self.cudart.cudaGetDeviceProperties(self.device))
        name = props.name
        name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
        return name.strip(), (int(props.major), int(props.minor))

    def close(self):
        pass


class PyCuda(object):
    """The same interface over PyCUDA (JetPack 4.6's Python 3.6 has no cuda-python).

    PyCUDA has no implicit context: we push the device's primary context (the one TensorRT's
    runtime API calls use) and pop it in `close`.
    """

    name = "pycuda"

    def __init__(self, driver, device=0):
        self.driver = driver
        driver.init()
        self._device = driver.Device(device)
        self._context = self._device.retain_primary_context()
        self._context.push()
        self._allocations = {}

    def malloc(self, nbytes):
        allocation = self.driver.mem_alloc(max(int(nbytes), 1))
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, ptr):
        allocation = self._allocations.pop(int(ptr), None)
        if allocation is not None:
            allocation.free()

    def host_empty(self, shape, dtype):
        """A page-locked host array (asynchronous copies need one with PyCUDA)."""
        return self.driver.pagelocked_empty(shape, dtype)

    def htod(self, ptr, host, stream=None):
        if stream is None:
            self.driver.memcpy_htod(ptr, host)
        else:
            self.driver.memcpy_htod_async(ptr, host, stream)

    def dtoh(self, host, ptr, stream):
        self.driver.memcpy_dtoh_async(host, ptr, stream)

    def stream_create(self):
        return self.driver.Stream()

    @staticmethod
    def stream_handle(stream):
        return int(stream.handle)

    def stream_synchronize(self, stream):
        stream.synchronize()

    def stream_destroy(self, stream):
        pass  # freed with the Python object

    def event_create(self):
        return self.driver.Event()

    def event_record(self, event, stream):
        event.record(stream)

    def event_elapsed_ms(self, start, end):
        end.synchronize()
        return float(start.time_till(end))

    def event_destroy(self, event):
        pass

    def mem_get_info(self):
        free, total = self.driver.mem_get_info()
        return int(free), int(total)

    def device_properties(self):
        return self._device.name().strip(), tuple(int(v) for v in self._device.compute_capability())

    def close(self):
        for allocation in list(self._allocations.values()):
            allocation.free()
        self._allocations.clear()
        self._context.pop()


def import_cudart():
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (12.6+) or ``cuda.cudart`` (older)."""
    try:
        from cuda.bindings import runtime as cudart
        return cudart
    except ImportError:
        from cuda import cudart
        return cudart


def load_cuda(device=0):
    """A CUDA helper over cuda-python, else PyCUDA.

    Raises CudaNotFound (one line) when neither is installed, RuntimeError when CUDA itself
    fails (no device, driver too old).
    """
    try:
        cudart = import_cudart()
    except ImportError:
        cudart = None
    if cudart is not None:
        return CudaPython(cudart, device)
    try:
        import pycuda.driver as driver
    except ImportError:
        raise CudaNotFound(NO_CUDA_MESSAGE)
    return PyCuda(driver, device)


def query_device(device=0):
    """``(name, (major, minor))`` of the GPU, or ``(None, None)`` when CUDA cannot tell."""
    try:
        cuda = load_cuda(device)
    except (UsageError, RuntimeError, OSError):
        return None, None
    try:
        return cuda.device_properties()
    except (RuntimeError, OSError, AttributeError):
        return None, None
    finally:
        cuda.close()


# ---------------------------------------------------------------------------------------------
# TensorRT
# ---------------------------------------------------------------------------------------------


def import_tensorrt(message="TensorRT not found (cannot import tensorrt)"):
    """The ``tensorrt`` module, imported only when needed so ``--help`` works without it.

    Raises TensorRTNotFound(``message``) when it cannot be imported.
    """
    try:
        import tensorrt
    except (ImportError, OSError):
        raise TensorRTNotFound(message)
    return tensorrt


_LOGGERS = {}


def get_trt_logger(trt, verbose=False):
    """One TensorRT logger per severity for the whole process (TensorRT expects a single logger)."""
    severity = trt.Logger.VERBOSE if verbose else trt.Logger.WARNING
    if severity not in _LOGGERS:
        _LOGGERS[severity] = trt.Logger(severity)
    return _LOGGERS[severity]


def _dtype_name(trt, dtype):
    """NumPy name of a TensorRT DataType (``"float32"``), or TensorRT's own for types NumPy lacks."""
    import numpy as np

    try:
        return np.dtype(trt.nptype(dtype)).name
    except (TypeError, KeyError, AttributeError):
        return str(dtype).split(".")[-1].lower()


def engine_io(engine, trt):
    """``[{"name", "is_input", "shape", "dtype", "index"}]`` of an engine's I/O tensors.

    Uses the TensorRT 8.5+ name-based tensor API when present, else the 8.x bindings API
    (``index`` is the binding index there, the I/O position otherwise). Shapes keep -1 for
    dynamic dimensions; ``dtype`` is a NumPy dtype name (TensorRT's own name for types NumPy
    lacks, which ``numpy.dtype`` then refuses).
    """
    tensors = []
    if hasattr(engine, "num_io_tensors"):
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            tensors.append({"name": name, "is_input": engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                            "shape": [int(d) for d in engine.get_tensor_shape(name)],
                            "dtype": _dtype_name(trt, engine.get_tensor_dtype(name)), "index": i})
    else:
        for i in range(engine.num_bindings):
            tensors.append({"name": engine.get_binding_name(i), "is_input": bool(engine.binding_is_input(i)),
                            "shape": [int(d) for d in engine.get_binding_shape(i)],
                            "dtype": _dtype_name(trt, engine.get_binding_dtype(i)), "index": i})
    return tensors


def uses_tensor_api(engine, context):
    """Whether to run with the name-based tensor API (8.5+) rather than the 8.x bindings."""
    return hasattr(engine, "num_io_tensors") and hasattr(context, "execute_async_v3")


def profile_range(engine, tensor, tensor_api):
    """``(min shape, max shape)`` an `engine_io` input accepts: its profile 0, or its static shape."""
    shape = tuple(int(d) for d in tensor["shape"])
    if all(d >= 0 for d in shape):
        return shape, shape
    if tensor_api and hasattr(engine, "get_tensor_profile_shape"):
        low, _opt, high = engine.get_tensor_profile_shape(tensor["name"], 0)
    else:
        low, _opt, high = engine.get_profile_shape(0, tensor["index"])
    return tuple(int(d) for d in low), tuple(int(d) for d in high)


def set_input_shape(context, tensor, shape, tensor_api):
    """Set an input's shape for the next run; TensorRT's answer (False when it refuses)."""
    if tensor_api:
        return context.set_input_shape(tensor["name"], tuple(shape))
    return context.set_binding_shape(tensor["index"], tuple(shape))


def output_shape(context, tensor, tensor_api):
    """An output's shape for the input shapes set (-1 where TensorRT cannot infer it)."""
    if tensor_api:
        return tuple(int(d) for d in context.get_tensor_shape(tensor["name"]))
    return tuple(int(d) for d in context.get_binding_shape(tensor["index"]))


def ensure_buffer(cuda, buffers, name, nbytes):
    """Device memory for tensor ``name`` in ``buffers`` (``{name: (ptr, size)}``), grown (never
    shrunk) to ``nbytes``; returns the pointer."""
    ptr, size = buffers.get(name, (None, 0))
    if ptr is not None and size >= nbytes:
        return ptr
    if ptr is not None:
        cuda.free(ptr)
    ptr = cuda.malloc(max(nbytes, 1))
    buffers[name] = (ptr, max(nbytes, 1))
    return ptr


def bind(engine, context, io, pointers, tensor_api):
    """Give TensorRT the device address of every `engine_io` tensor (``pointers``: ``{name: ptr}``).

    Returns what `enqueue` needs: None for the tensor API (addresses are set on the context),
    the bindings list for the 8.x API.
    """
    if tensor_api:
        for tensor in io:
            context.set_tensor_address(tensor["name"], pointers[tensor["name"]])
        return None
    bindings = [0] * engine.num_bindings
    for tensor in io:
        bindings[tensor["index"]] = pointers[tensor["name"]]
    return bindings


def enqueue(context, bindings, stream_handle, tensor_api):
    """Queue one execution on the stream (after `bind`); TensorRT's answer (False on failure)."""
    if tensor_api:
        return context.execute_async_v3(stream_handle)
    return context.execute_async_v2(bindings, stream_handle)
