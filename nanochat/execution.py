"""Run untrusted Python (model-written HumanEval answers) in a sandboxed child process.

    result = execute_code("print(1 + 1)")   # ExecutionResult(success=True, stdout="2\\n", ...)

Each call writes the code to a fresh temporary directory (removed afterwards), starts
`python -I -S` there on part 1 of this file (empty environment, new session) and kills the whole
process group when the wall-clock timeout passes; captured output is capped. Before running the
code, the child locks itself in with every layer the kernel lets it use (Linux only). The operating
system is the barrier; Python is not patched:

- namespaces: new network (only a downed loopback), pid (the code is pid 1 and sees no other
  process), mount, ipc and uts namespaces; also a user namespace when not started as root.
- read-only view: in the mount namespace every mount is remounted read-only, nosuid and nodev, but
  for a (noexec) bind mount of the working directory; a fresh /proc shows only the sandbox.
- landlock LSM: reads only beneath the Python install, /usr, /lib* and the working directory;
  writes, deletes and renames only in the working directory; execve nowhere; no TCP (ABI >= 4); no
  signals to, nor abstract unix sockets of, processes outside (ABI >= 6).
- no privileges: started as root, the code runs as nobody (uid 65534); when Python is installed
  where nobody may not enter (/root/.pyenv, uv's ~/.local/share/uv), that directory is covered by an
  empty tmpfs into which only the interpreter is bound back. Without a mount namespace it then
  stays uid 0, but without any capability. Other users keep their uid, without capabilities.
- seccomp (x86_64): fork, vfork, exec, clone of anything but a thread, socket, ptrace, signals and
  scheduling calls aimed at other pids, setsid, mount, unshare, setns, bpf, io_uring, keyctl, ...
  fail with EPERM.
- rlimits: address space (the memory limit), CPU seconds, 16 MiB per file, 256 open files, no core
  files; no new processes at all (RLIMIT_NPROC=0, ignored for uid 0) when seccomp is unavailable.

So, threat by threat: network - net namespace, seccomp, landlock; spawning processes - seccomp (or
RLIMIT_NPROC); signalling or tracing other processes - pid namespace, seccomp, landlock, uid;
writing or deleting outside the working directory - read-only mounts, landlock, uid; reading the
caller's secrets - empty environment, private /proc, landlock, uid. Layers the machine lacks
(containers often forbid unshare, older kernels lack landlock) are skipped; `sandbox_report()` says
which and why, and the first call logs a warning.

What it does NOT protect against:
- kernel exploits (seccomp only narrows the attack surface) and CPU, cache or timing side channels;
- reading files beneath the allowed read paths (the Python install, /usr, /lib*): world-readable
  system files are visible; and with landlock unavailable, whatever the sandbox uid may read;
- using up to `timeout` seconds of CPU, `maximum_memory_bytes` of address space, and disk space in
  the working directory (16 MiB per file, any number of files) until the timeout;
- code that fakes success: `os._exit(0)` or `sys.exit(0)` before the tests run reports success, as
  the exit status is all a separate process can be judged by;
- threads are allowed; only the standard library is importable (no site-packages).
"""
import ctypes
import os
import struct
import sys
import types

# --------------------------------------------------------------------------------------------------
# Part 1: the sandbox. The child runs this file's code as __main__ (see CHILD_BOOTSTRAP), so this part
# imports only what is cheap or already loaded; part 2 (the caller's side) follows the
# `if __name__ == "__main__"` below.

NOBODY = 65534
MEMORY_ERROR_EXIT = 99  # the child's exit status when the code raised MemoryError
MAX_FILE_BYTES = 16 * 2**20
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
# linux/sched.h, linux/mount.h, linux/prctl.h
CLONE_THREAD, CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x10000, 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
                      "nodiratime": 2048, "relatime": 1 << 21}  # kept on remount (a user namespace must)
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 24, 22, 38


def _check(ret, what):
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def enter_namespaces():
    """unshare(2), then fork: the child is pid 1 of the new pid namespace and returns; this process
    stays outside it, waits, and exits as the child did."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    _check(LIBC.unshare(flags | (CLONE_NEWUSER if uid else 0)), "unshare")
    if uid:  # map our own ids only: we keep our uid, with capabilities inside the namespaces
        for name, line in [("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")]:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(line)
    pid = os.fork()
    if pid:
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code < 0:
            os.kill(os.getpid(), -code)  # died of a signal: die of the same one
        os._exit(code & 0xFF)
    LIBC.prctl(PR_SET_PDEATHSIG, 9)  # SIGKILL when the outer process is killed (by the timeout)
    return "on" if not uid else f"on (user namespace for uid {uid})"


def _mounts():
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            mountpoint = fields[4].decode("unicode_escape").encode("latin-1")  # "\\040" is a space
            yield os.fsdecode(mountpoint), sum(MOUNT_OPTION_FLAGS.get(o, 0) for o in fields[5].decode().split(","))


def interpreter_dirs():
    return sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)})


def closed_dir(path):
    """The first directory on the way to `path` that others may not enter, or `path` itself if they
    may not read it; None when others may use `path`."""
    parts = path.rstrip("/").split("/")
    for i in range(1, len(parts) + 1):
        directory, need = "/".join(parts[:i]) or "/", 0o005 if i == len(parts) else 0o001
        if os.stat(directory).st_mode & need != need:
            return directory
    return None


def show_interpreter_to_nobody(workdir):
    """Python installed where others may not enter (root's /root/.pyenv or ~/.local/share/uv): cover
    the closed directory with an empty tmpfs and bind the interpreter back into it, so that the code
    can run as nobody (and the rest of that directory is hidden)."""
    keep = {}
    for path in interpreter_dirs():
        closed = closed_dir(path)
        if closed and closed != path and not (workdir + "/").startswith(closed + "/"):
            keep[path] = (closed, os.open(path, os.O_PATH | os.O_CLOEXEC))
    for closed in {closed for closed, _ in keep.values()}:
        _check(LIBC.mount(b"tmpfs", os.fsencode(closed), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=64k"),
               f"cover {closed}")
    for path, (_, fd) in keep.items():
        os.makedirs(path, exist_ok=True)
        _check(LIBC.mount(f"/proc/self/fd/{fd}".encode(), os.fsencode(path), None, MS_BIND | MS_REC, None),
               f"bind {path}")
        os.close(fd)


def make_filesystem_read_only(workdir):
    """Remount every mount read-only, nosuid, nodev except a bind mount of the working directory;
    then mount a fresh /proc that shows only this pid namespace."""
    _check(LIBC.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    if os.getuid() == 0:
        show_interpreter_to_nobody(workdir)
    _check(LIBC.mount(os.fsencode(workdir), os.fsencode(workdir), None, MS_BIND, None), "bind workdir")
    os.chdir(workdir)  # onto the bind mount: the old working directory is on a mount about to turn read-only
    failed = []
    for mountpoint, flags in _mounts():
        flags |= MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_NOEXEC if mountpoint == workdir else MS_RDONLY)
        if LIBC.mount(None, os.fsencode(mountpoint), None, flags, None) != 0:
            failed.append(mountpoint)
    failed = [f"{mountpoint} still writable" for mountpoint in failed]
    proc_flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if (LIBC.mount(b"proc", b"/proc", b"proc", proc_flags, None) != 0  # else hide the host's /proc
            and LIBC.mount(b"tmpfs", b"/proc", b"tmpfs", proc_flags, None) != 0):
        failed.append("/proc shows the host's processes")
    return f"partial: {', '.join(failed)}" if failed else "on"


def set_limits(memory_bytes, timeout):
    import resource
    cpu_seconds = int(timeout) + 1
    limits = {resource.RLIMIT_CPU: (cpu_seconds, cpu_seconds + 1), resource.RLIMIT_FSIZE: MAX_FILE_BYTES,
              resource.RLIMIT_NOFILE: 256, resource.RLIMIT_CORE: 0}
    if memory_bytes:
        limits[resource.RLIMIT_AS] = memory_bytes
    for which, limit in limits.items():
        resource.setrlimit(which, limit if isinstance(limit, tuple) else (limit, limit))
    return "on"


# linux/landlock.h: filesystem rights of ABI 1 (13 bits), 2 (+refer), 3 (+truncate), 5 (+ioctl_dev)
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR, LL_TRUNCATE = 1, 2, 4, 8, 1 << 14
LL_READ = LL_READ_FILE | LL_READ_DIR  # never LL_EXECUTE: no execve anywhere (loading libraries needs no right)


class _LandlockRuleset(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _LandlockPathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def apply_landlock(workdir):
    abi = _check(LIBC.syscall(444, None, 0, 1), "landlock_create_ruleset (version)")
    fs_rights = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}.get(abi, (1 << 16) - 1)
    ruleset = _LandlockRuleset(fs_rights, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # tcp bind+connect; unix+signal
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset_fd = _check(LIBC.syscall(444, ctypes.byref(ruleset), size, 0), "landlock_create_ruleset")
    rules = [(path, LL_READ) for path in interpreter_dirs() + ["/usr", "/lib", "/lib64", "/lib32"]]
    rules += [("/etc/ld.so.cache", LL_READ_FILE), ("/etc/localtime", LL_READ_FILE),
              ("/dev/null", LL_READ_FILE | LL_WRITE_FILE | LL_TRUNCATE), ("/dev/urandom", LL_READ_FILE),
              (workdir, fs_rights & ~LL_EXECUTE)]
    try:
        for path, rights in rules:
            try:
                path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                rule = _LandlockPathBeneath(rights & fs_rights, path_fd)
                _check(LIBC.syscall(445, ruleset_fd, 1, ctypes.byref(rule), 0), f"landlock_add_rule {path}")
            finally:
                os.close(path_fd)
        _check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _check(LIBC.syscall(446, ruleset_fd, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset_fd)
    return "on" if abi >= 6 else f"partial: landlock ABI {abi} (< 6: signals{'' if abi >= 4 else ', tcp'} not scoped)"


def drop_privileges(workdir):
    for cap in range(64):  # empty the bounding set: even an exec as uid 0 could not regain any
        LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    status = f"on (uid {os.getuid()}, no capabilities)"
    if os.getuid() == 0:
        blocked = [p for p in interpreter_dirs() if closed_dir(p)]
        if blocked:
            status = f"partial: stays uid 0 without capabilities: nobody cannot read {', '.join(blocked)}"
        else:
            os.chown(workdir, NOBODY, NOBODY)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            status = f"on (uid {NOBODY})"
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()  # capability v3, all zero
    _check(LIBC.capset(header, data), "capset")
    return status


# x86_64 syscall numbers (asm/unistd_64.h)
DENIED_SYSCALLS = {
    "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "socket": 41, "socketpair": 53,
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "setsid": 112, "setpgid": 109,
    "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "open_by_handle_at": 304, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "setpriority": 141, "ioprio_set": 251, "kcmp": 312, "process_madvise": 440, "process_mrelease": 448,
}
# syscalls whose first argument names a process: allowed on ourselves only (0 or our pid)
OWN_PROCESS_SYSCALLS = {
    "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "prlimit64": 302, "sched_setaffinity": 203, "sched_setparam": 142, "sched_setscheduler": 144,
    "sched_setattr": 314, "migrate_pages": 256, "move_pages": 279, "get_robust_list": 274,
}
SYS_CLONE, SYS_CLONE3, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT = 56, 435, 0xC000003E, 0x40000000
RET_KILL_PROCESS, RET_ALLOW, RET_ERRNO = 0x80000000, 0x7FFF0000, 0x50000
EPERM, ENOSYS = 1, 38


def _bpf(code, k, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)


def _load(offset):  # A = seccomp_data[offset] (0: syscall nr, 4: arch, 16: low half of arg 0)
    return _bpf(0x20, offset)


def _jump_eq(k, jt, jf):
    return _bpf(0x15, k, jt, jf)


def _ret(k):
    return _bpf(0x06, k)


def _allow_only_if_arg0(nr, *tests):
    """nr is allowed only when one of `tests` (jumps: true -> skip all but one) holds for its arg 0."""
    return [_jump_eq(nr, 0, len(tests) + 3), _load(16), *tests, _ret(RET_ERRNO | EPERM), _ret(RET_ALLOW)]


def apply_seccomp():
    if os.uname().machine != "x86_64" or struct.calcsize("P") != 8:
        raise OSError(f"no syscall table for {os.uname().machine}")
    prog = [_load(4), _jump_eq(AUDIT_ARCH_X86_64, 1, 0), _ret(RET_KILL_PROCESS),  # no 32-bit ABI
            _load(0), _bpf(0x35, X32_SYSCALL_BIT, 0, 1), _ret(RET_ERRNO | EPERM),  # nor x32
            _jump_eq(SYS_CLONE3, 0, 1), _ret(RET_ERRNO | ENOSYS)]  # flags unreadable: libc falls back to clone
    for nr in DENIED_SYSCALLS.values():
        prog += [_jump_eq(nr, 0, 1), _ret(RET_ERRNO | EPERM)]
    prog += _allow_only_if_arg0(SYS_CLONE, _bpf(0x45, CLONE_THREAD, 1, 0))  # threads, not processes
    for nr in OWN_PROCESS_SYSCALLS.values():
        prog += _allow_only_if_arg0(nr, _jump_eq(0, 2, 0), _jump_eq(os.getpid(), 1, 0))
    prog.append(_ret(RET_ALLOW))
    filters = ctypes.create_string_buffer(b"".join(prog))
    fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(filters))  # struct sock_fprog
    _check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(LIBC.prctl(PR_SET_SECCOMP, 2, ctypes.c_char_p(fprog), 0, 0), "seccomp")
    return "on"


def _try(layer, *args):
    try:
        return layer(*args)
    except OSError as e:
        return f"unavailable: {e}"


def sandbox_main(mode, memory_bytes, timeout):
    """Lock this process in, then run ./solution.py (mode "run") or print what worked ("probe")."""
    workdir = os.getcwd()
    with open("solution.py") as f:
        code = f.read()
    report = {"namespaces": _try(enter_namespaces)}
    if report["namespaces"].startswith("on"):
        report["read-only filesystem"] = _try(make_filesystem_read_only, workdir)
    else:
        report["read-only filesystem"] = "unavailable: needs the mount namespace"
    report["rlimits"] = set_limits(memory_bytes, timeout)
    report["landlock"] = _try(apply_landlock, workdir)
    report["unprivileged"] = _try(drop_privileges, workdir)
    report["seccomp"] = _try(apply_seccomp)
    if not report["seccomp"].startswith("on"):
        import resource  # no more processes (nor threads); root ignores this limit
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    if mode == "probe":
        import json
        print(json.dumps(report))
        return
    main = types.ModuleType("__main__")  # the code runs as a script would: as module __main__
    sys.modules["__main__"], sys.argv = main, ["solution.py"]
    try:
        exec(compile(code, "solution.py", "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        e.__traceback__ = e.__traceback__.tb_next  # the traceback starts in solution.py
        sys.excepthook(type(e), e, e.__traceback__)
        sys.exit(MEMORY_ERROR_EXIT if isinstance(e, MemoryError) else 1)


if __name__ == "__main__":
    sandbox_main(sys.argv[-3], int(sys.argv[-2]), float(sys.argv[-1]))
    sys.exit()

# --------------------------------------------------------------------------------------------------
# Part 2: the caller's side.

import functools  # noqa: E402
import logging  # noqa: E402
import marshal  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

log = logging.getLogger(__name__)
# the child runs this file, compiled once by the caller (compiling it in every child costs ~5-10 ms)
CHILD_BOOTSTRAP = "import marshal; exec(marshal.loads(open('sandbox.marshal', 'rb').read()), {'__name__': '__main__'})"
MAX_OUTPUT_BYTES = 256 * 2**10  # per stream; beyond it, the head and a 4 KiB tail are kept
TAIL_BYTES = 4 * 2**10


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None  # the exception line ("ValueError: ..."), or why the run failed
    timeout: bool = False
    memory_exceeded: bool = False


class _CappedBuffer:
    def __init__(self):
        self.head, self.tail, self.dropped = bytearray(), bytearray(), 0

    def add(self, chunk):
        room = MAX_OUTPUT_BYTES - len(self.head)
        self.head += chunk[:room]
        if len(chunk) > room:
            self.tail += chunk[max(room, 0):]
            self.dropped += max(len(self.tail) - TAIL_BYTES, 0)
            del self.tail[:-TAIL_BYTES]

    def text(self):
        text = self.head.decode("utf-8", errors="replace")
        if self.tail:
            text += f"\n[... {self.dropped} bytes left out ...]\n" + self.tail.decode("utf-8", errors="replace")
        return text


def _collect(proc, deadline):
    """Read stdout and stderr until the process has closed them and exited, or until the deadline
    -> (stdout, stderr, timed out). Leaves the process unreaped: its pid, which is also its group's
    id, stays reserved until the caller has killed the group."""
    buffers = {proc.stdout: _CappedBuffer(), proc.stderr: _CappedBuffer()}
    with selectors.DefaultSelector() as selector:
        for stream in buffers:
            selector.register(stream, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if selector.get_map():
                for key, _ in selector.select(remaining):
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        buffers[key.fileobj].add(chunk)
                    else:
                        selector.unregister(key.fileobj)
            elif _exited(proc.pid):
                break
            else:
                time.sleep(0.001)  # output closed, exit imminent (or the code closed it and goes on)
    return buffers[proc.stdout].text(), buffers[proc.stderr].text(), remaining <= 0


def _exited(pid):
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped (SIGCHLD ignored by the host process)
        return True


def _remove_tree(path):
    def make_writable_and_retry(function, failed_path, _):
        os.chmod(os.path.dirname(failed_path), 0o700)  # the code may have made a directory read-only
        function(failed_path)
    shutil.rmtree(path, onerror=make_writable_and_retry)


@functools.cache
def _sandbox_bytecode():
    with open(__file__, "rb") as f:
        return marshal.dumps(compile(f.read(), __file__, "exec"))


def _run_sandboxed(mode, code, timeout, maximum_memory_bytes):
    """-> (exit status, stdout, stderr, timed out)"""
    workdir = tempfile.mkdtemp(prefix="nanochat-exec-")
    try:
        with open(os.path.join(workdir, "solution.py"), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(workdir, "sandbox.marshal"), "wb") as f:
            f.write(_sandbox_bytecode())
        command = [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", CHILD_BOOTSTRAP,
                   mode, str(int(maximum_memory_bytes or 0)), str(timeout)]
        with subprocess.Popen(command, cwd=workdir, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) as proc:
            try:
                stdout, stderr, timed_out = _collect(proc, time.monotonic() + timeout)
            finally:
                try:  # the whole group: whatever the code started dies with it
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        return proc.returncode, stdout, stderr, timed_out
    finally:
        _remove_tree(workdir)


def execute_code(code: str, timeout: float = 5.0, maximum_memory_bytes: int | None = 256 * 2**20) -> ExecutionResult:
    """Run `code` as a script in the sandbox, for at most `timeout` wall-clock seconds, with at most
    `maximum_memory_bytes` of address space (None: unbounded). Safe to call from any thread."""
    _warn_once_if_degraded()
    returncode, stdout, stderr, timed_out = _run_sandboxed("run", code, timeout, maximum_memory_bytes)
    result = ExecutionResult(returncode == 0 and not timed_out, stdout, stderr)
    if timed_out or returncode == -signal.SIGXCPU:  # wall clock, or the CPU-seconds rlimit
        result.timeout, result.error = True, f"timed out after {timeout} s"
    elif returncode == MEMORY_ERROR_EXIT:
        result.memory_exceeded, result.error = True, "MemoryError: memory limit exceeded"
    elif returncode < 0:
        result.error = f"killed by {signal.Signals(-returncode).name}"
    elif returncode > 0:
        lines = stderr.strip().splitlines()
        result.error = lines[-1] if lines else f"exit status {returncode}"
    return result


_report, _report_lock = None, threading.Lock()


def sandbox_report() -> dict[str, str]:
    """Which isolation layers work on this machine: layer -> "on", "partial: why" or "unavailable: why"."""
    global _report
    with _report_lock:
        if _report is None:
            import json
            returncode, stdout, stderr, _ = _run_sandboxed("probe", "", 10.0, None)
            if returncode != 0:
                raise RuntimeError(f"the sandbox does not start: {stderr.strip()}")
            _report = json.loads(stdout)
        return dict(_report)


_warned = False


def _warn_once_if_degraded():
    global _warned
    if not _warned:
        _warned = True
        missing = {layer: status for layer, status in sandbox_report().items() if not status.startswith("on")}
        if missing:
            log.warning("code execution sandbox is degraded on this machine: %s",
                        "; ".join(f"{layer}: {status}" for layer, status in missing.items()))
