"""XLA:CPU custom calls written in Python: a numpy function as a typed XLA FFI handler.

:func:`jax.pure_callback` would run numpy inside a compiled program too, but JAX never writes an
executable holding a host callback to the persistent compilation cache, so every program using
one (here: the kernels' programs, which hold the convergence diagnostics) would compile again in
every process. A custom call is part of the program like any other instruction: the program is
cached, and its target is looked up by name when it runs. The handler is a C function pointer
made by :mod:`ctypes` (which takes Python's GIL while it runs) that reads XLA's call frame
(``xla/ffi/api/c_api.h``, FFI API 0.x), wraps the argument and result buffers as numpy arrays
without copying, and calls the numpy function; an exception becomes an XLA error, raised by the
jitted call.

Only the layout of the C structs below is assumed, and only for the FFI API major version 0
(checked against the header JAX ships, when present): :func:`available` says whether it holds.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading

import numpy as np

__all__ = ["available", "register", "ffi_call"]

_c_size, _c_ptr, _c_i64, _c_int = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class _ExtensionBase(ctypes.Structure):
    pass


_ExtensionBase._fields_ = [("struct_size", _c_size), ("type", _c_int), ("next", ctypes.POINTER(_ExtensionBase))]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", _c_size), ("extension_start", _c_ptr), ("major", _c_int), ("minor", _c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", _c_size), ("api_version", _ApiVersion), ("traits", ctypes.c_uint32)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", _c_size), ("extension_start", _c_ptr), ("dtype", _c_int), ("data", _c_ptr),
                ("rank", _c_i64), ("dims", ctypes.POINTER(_c_i64))]


class _Operands(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets share this layout
    _fields_ = [("struct_size", _c_size), ("extension_start", _c_ptr), ("size", _c_i64),
                ("types", ctypes.POINTER(_c_int)), ("items", ctypes.POINTER(_c_ptr))]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", _c_size), ("extension_start", _c_ptr), ("message", ctypes.c_char_p), ("errc", _c_int)]


_ERROR_CREATE = ctypes.CFUNCTYPE(_c_ptr, ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):
    _fields_ = [("struct_size", _c_size), ("extension_start", _c_ptr), ("api_version", _ApiVersion),
                ("internal_api", _c_ptr), ("error_create", _ERROR_CREATE)]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", _c_size), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("api", ctypes.POINTER(_Api)), ("ctx", _c_ptr), ("stage", _c_int), ("args", _Operands),
                ("rets", _Operands)]


_HANDLER = ctypes.CFUNCTYPE(_c_ptr, ctypes.POINTER(_CallFrame))
_EXTENSION_METADATA = 1
_STAGE_EXECUTE = 3
_ERROR_INTERNAL = 13
_DTYPES = {1: np.bool_, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.uint8, 7: np.uint16,
           8: np.uint32, 9: np.uint64, 10: np.float16, 11: np.float32, 12: np.float64}
_LOCK = threading.Lock()
_REGISTERED: dict = {}  # name -> the ctypes function object (kept alive for the process)
_VERSION: list = []


def _api_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the FFI API of JAX's headers; ``None`` when not the layout above."""
    if not _VERSION:
        version = (0, 1)  # the structs above are those of FFI API 0.1 onwards
        try:
            import jax.ffi

            with open(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")) as f:
                header = f.read()
            major = int(re.search(r"#define XLA_FFI_API_MAJOR (\d+)", header).group(1))
            minor = int(re.search(r"#define XLA_FFI_API_MINOR (\d+)", header).group(1))
            version = (major, minor) if major == 0 else None
        except (OSError, AttributeError, ImportError):
            pass
        _VERSION.append(version)
    return _VERSION[0]


def available() -> bool:
    """Whether Python FFI handlers can be registered with this JAX (FFI API major version 0)."""
    return _api_version() is not None


def _as_array(pointer) -> np.ndarray:
    """A numpy view of an ``XLA_FFI_Buffer``."""
    buf = ctypes.cast(pointer, ctypes.POINTER(_Buffer)).contents
    shape = tuple(int(buf.dims[i]) for i in range(buf.rank))
    dtype = np.dtype(_DTYPES[buf.dtype])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer((ctypes.c_char * nbytes).from_address(buf.data), dtype=dtype).reshape(shape)


def _make_handler(fn):
    major, minor = _api_version()

    def handler(frame_pointer):
        frame = frame_pointer.contents
        extension = frame.extension_start
        if extension and extension.contents.type == _EXTENSION_METADATA:  # XLA asks for the version
            metadata = ctypes.cast(extension, ctypes.POINTER(_MetadataExtension)).contents.metadata.contents
            metadata.api_version.major, metadata.api_version.minor = major, minor
            metadata.traits = 0
            return None
        if frame.stage != _STAGE_EXECUTE:
            return None
        try:
            inputs = [_as_array(frame.args.items[i]) for i in range(frame.args.size)]
            outputs = [_as_array(frame.rets.items[i]) for i in range(frame.rets.size)]
            if getattr(fn, "writes_results", False):  # fn(*inputs, *outputs) fills the buffers
                fn(*inputs, *outputs)
                return None
            results = fn(*inputs)
            if len(results) != len(outputs):
                raise RuntimeError(f"{fn.__name__} gave {len(results)} results for {len(outputs)} outputs")
            for out, result in zip(outputs, results):
                if np.shape(result) != out.shape:
                    raise RuntimeError(f"{fn.__name__} gave shape {np.shape(result)} for {out.shape}")
                out[...] = result
            return None
        except Exception as error:  # noqa: BLE001  (becomes an XLA error raised by the caller)
            message = f"{fn.__name__}: {error!r}".encode()
            args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message, _ERROR_INTERNAL)
            return frame.api.contents.error_create(ctypes.byref(args))

    return _HANDLER(handler)


def register(name: str, fn) -> None:
    """Register ``fn(*inputs) -> tuple of outputs`` (numpy in, array-likes out, shaped as the
    call's results) as the XLA:CPU custom call ``name``; a ``fn`` whose ``writes_results``
    attribute is true is called as ``fn(*inputs, *outputs)`` and fills the result buffers itself
    (no copy). Idempotent."""
    if not available():
        raise RuntimeError("this JAX's XLA FFI API is not the one engine.sampling.host_ffi knows")
    with _LOCK:
        if name in _REGISTERED:
            return
        import jax

        handler = _make_handler(fn)
        capsule_new = ctypes.pythonapi.PyCapsule_New
        capsule_new.restype, capsule_new.argtypes = ctypes.py_object, (_c_ptr, ctypes.c_char_p, _c_ptr)
        capsule = capsule_new(ctypes.cast(handler, _c_ptr).value, b"xla._CUSTOM_CALL_TARGET", None)
        jax.ffi.register_ffi_target(name, capsule, platform="cpu", api_version=1)
        _REGISTERED[name] = handler


def ffi_call(name: str, result, *args, vmap_method: str = "expand_dims"):
    """``jax.ffi.ffi_call(name, result, vmap_method=...)(*args)`` of a registered target."""
    import jax

    return jax.ffi.ffi_call(name, result, vmap_method=vmap_method)(*args)
