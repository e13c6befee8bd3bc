"""The system libbpf (libbpf1) through ctypes: open and load an object, its maps and
program, map updates, BPF_PROG_TEST_RUN, and ids back to file descriptors.

Only what the fast path needs. Every call that fails raises ``BpfError`` with the
errno, so the manager can say in one line why the fast path is off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

BPF_ANY, BPF_NOEXIST = 0, 1


class BpfError(OSError):
    pass


_lib = None
_messages: list[str] = []     # libbpf's own lines since the last call that took them

_libc = ctypes.CDLL(None)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]


@ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _print_fn(level, fmt, args):
    # a va_list is passed by pointer on x86-64 and arm64, so vsnprintf can take it
    buf = ctypes.create_string_buffer(1024)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    _messages.append(buf.value.decode("utf-8", "replace").rstrip())
    del _messages[:-200]
    return 0


def take_messages() -> list[str]:
    """libbpf's messages (warnings, the verifier's log) since the last call."""
    out = list(_messages)
    _messages.clear()
    return out


def lib():
    """The loaded libbpf, or BpfError when the system has none."""
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            handle = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise BpfError(0, f"libbpf is not installed ({exc})") from None
        vp, c_int, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
        for fn, args, res in (
                ("bpf_object__open_file", [ctypes.c_char_p, vp], vp),
                ("bpf_object__load", [vp], c_int),
                ("bpf_object__close", [vp], None),
                ("bpf_object__find_program_by_name", [vp, ctypes.c_char_p], vp),
                ("bpf_program__fd", [vp], c_int),
                ("bpf_object__find_map_fd_by_name", [vp, ctypes.c_char_p], c_int),
                ("bpf_map_update_elem", [c_int, vp, vp, ctypes.c_uint64], c_int),
                ("bpf_map_lookup_elem", [c_int, vp, vp], c_int),
                ("bpf_map_delete_elem", [c_int, vp], c_int),
                ("bpf_map_get_next_key", [c_int, vp, vp], c_int),
                ("bpf_prog_get_fd_by_id", [u32], c_int),
                ("bpf_map_get_fd_by_id", [u32], c_int),
                ("bpf_obj_get_info_by_fd", [c_int, vp, ctypes.POINTER(u32)], c_int),
                ("bpf_prog_test_run_opts", [c_int, vp], c_int),
                ("bpf_obj_pin", [c_int, ctypes.c_char_p], c_int),
                ("bpf_obj_get", [ctypes.c_char_p], c_int),
                ("libbpf_set_print", [vp], vp)):
            f = getattr(handle, fn)
            f.argtypes, f.restype = args, res
        handle.libbpf_set_print(_print_fn)
        _lib = handle
    return _lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno() or -rc
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


class BpfObject:
    """A compiled object file opened and loaded into the kernel."""

    def __init__(self, path: str):
        l = lib()
        self.obj = l.bpf_object__open_file(path.encode(), None)
        if not self.obj:
            _check(-(ctypes.get_errno() or 22), f"opening {path}")
        rc = l.bpf_object__load(self.obj)
        if rc:
            l.bpf_object__close(self.obj)
            self.obj = None
            _check(rc if rc < 0 else -rc, "loading the programs (the verifier refused, or no CAP_BPF)")

    def program_fd(self, name: str) -> int:
        prog = lib().bpf_object__find_program_by_name(self.obj, name.encode())
        if not prog:
            raise BpfError(2, f"no program {name!r} in the object")
        return _check(lib().bpf_program__fd(prog), f"program {name}")

    def map_fd(self, name: str) -> int:
        return _check(lib().bpf_object__find_map_fd_by_name(self.obj, name.encode()), f"map {name}")

    def close(self) -> None:
        """Our references go; attached programs and their maps stay in the kernel."""
        if self.obj:
            lib().bpf_object__close(self.obj)
            self.obj = None


class Map:
    """A map by file descriptor, with keys and values as bytes of fixed sizes."""

    def __init__(self, fd: int, key_size: int, value_size: int, owned: bool = False):
        self.fd, self.key_size, self.value_size, self.owned = fd, key_size, value_size, owned
        self._value = ctypes.create_string_buffer(value_size)

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        _check(lib().bpf_map_update_elem(self.fd, key, value, flags), "map update")

    def lookup(self, key: bytes) -> bytes | None:
        if lib().bpf_map_lookup_elem(self.fd, key, self._value) < 0:
            return None
        return self._value.raw

    def delete(self, key: bytes) -> bool:
        return lib().bpf_map_delete_elem(self.fd, key) == 0

    def keys(self) -> list[bytes]:
        out, cur = [], None
        nxt = ctypes.create_string_buffer(self.key_size)
        while lib().bpf_map_get_next_key(self.fd, cur, nxt) == 0:
            out.append(nxt.raw)
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)
        return out

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def test_run(prog_fd: int, packet: bytes, ctx: bytes | None = None) -> tuple[int, bytes]:
    """BPF_PROG_TEST_RUN once: (the program's return value, the packet after it)."""
    out = ctypes.create_string_buffer(len(packet) + 256)
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.cast(ctypes.c_char_p(packet), ctypes.c_void_p),
                        data_out=ctypes.cast(out, ctypes.c_void_p), data_size_in=len(packet),
                        data_size_out=len(out), repeat=1)
    if ctx is not None:
        opts.ctx_in = ctypes.cast(ctypes.c_char_p(ctx), ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "test run")
    return opts.retval, out.raw[:opts.data_size_out]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


# --- ids back to descriptors (adopting what a crashed run left attached) ---------------
_PROG_INFO_LEN = 256      # bpf_prog_info is smaller on older kernels; the kernel says


def prog_map_ids(prog_fd: int) -> list[int]:
    """The ids of the maps a loaded program uses (bpf_prog_info.nr_map_ids/map_ids)."""
    info = ctypes.create_string_buffer(_PROG_INFO_LEN)
    size = ctypes.c_uint32(_PROG_INFO_LEN)
    _check(lib().bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(size)), "program info")
    count = int.from_bytes(info.raw[52:56], "little")
    ids = (ctypes.c_uint32 * max(count, 1))()
    info = ctypes.create_string_buffer(_PROG_INFO_LEN)
    info[52:56] = count.to_bytes(4, "little")
    info[56:64] = ctypes.addressof(ids).to_bytes(8, "little")
    size = ctypes.c_uint32(_PROG_INFO_LEN)
    _check(lib().bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(size)), "program info")
    return list(ids)[:count]


def map_info(map_fd: int) -> tuple[str, int, int]:
    """(name, key size, value size) of a map (bpf_map_info)."""
    info = ctypes.create_string_buffer(128)
    size = ctypes.c_uint32(128)
    _check(lib().bpf_obj_get_info_by_fd(map_fd, info, ctypes.byref(size)), "map info")
    raw = info.raw
    key_size, value_size = int.from_bytes(raw[8:12], "little"), int.from_bytes(raw[12:16], "little")
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return name, key_size, value_size


def pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), f"pinning {path}")


def pinned(path: str) -> int:
    """A descriptor for what is pinned at ``path`` (needs no CAP_SYS_ADMIN, unlike ids)."""
    return _check(lib().bpf_obj_get(path.encode()), f"opening {path}")


BPF_FS_MAGIC = 0xCAFE4A11


def is_bpffs(path: str) -> bool:
    """Whether ``path`` is on a mounted bpf filesystem (where pins can live)."""
    buf = ctypes.create_string_buffer(128)      # struct statfs: f_type first
    _libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    if _libc.statfs(path.encode(), buf) != 0:
        return False
    return int.from_bytes(buf.raw[:8], "little") == BPF_FS_MAGIC


def prog_id(prog_fd: int) -> int:
    """A loaded program's id (bpf_prog_info.id)."""
    info = ctypes.create_string_buffer(_PROG_INFO_LEN)
    size = ctypes.c_uint32(_PROG_INFO_LEN)
    _check(lib().bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(size)), "program info")
    return int.from_bytes(info.raw[4:8], "little")


def prog_fd_by_id(prog_id: int) -> int:
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"program id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    return _check(lib().bpf_map_get_fd_by_id(map_id), f"map id {map_id}")
