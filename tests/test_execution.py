"""The sandbox of nanochat.execution: results, limits, and attacks the operating system must refuse.
No Python-level guard is installed in the sandbox, so every refusal checked here comes from the OS."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanochat.execution import MAX_OUTPUT_BYTES, ExecutionResult, execute_code, sandbox_report

SECRET = "nanochat-test-secret-5d1c7e"
# what the OS answers, depending on the layer that refuses: seccomp or landlock (EPERM, EACCES),
# RLIMIT_NPROC (EAGAIN), read-only mounts (EROFS), pid namespace (ESRCH), net namespace (ENETUNREACH)
REFUSALS = {"PermissionError", "BlockingIOError", "ProcessLookupError", "OSError"}


def run(code, **kwargs):
    result = execute_code(code, **kwargs)
    assert isinstance(result, ExecutionResult)
    assert SECRET not in result.stdout + result.stderr
    return result


def refused(result):
    return not result.success and not result.timeout and result.error.split(":")[0] in REFUSALS


def test_reports_which_layers_work():
    report = sandbox_report()
    assert set(report) == {"namespaces", "read-only filesystem", "rlimits", "landlock", "unprivileged", "seccomp"}
    assert all(status.startswith(("on", "partial: ", "unavailable: ")) for status in report.values())
    print(report)


def test_prints_output():
    result = run("import math, collections\nprint('hello', math.factorial(5))\nprint('é✓')")
    assert result.success and not result.timeout and not result.memory_exceeded and result.error is None
    assert result.stdout == "hello 120\né✓\n"


def test_exception_fails_with_its_message():
    result = run("def f(x):\n    raise ValueError(f'bad {x}')\nf(3)")
    assert not result.success and not result.timeout
    assert result.error == "ValueError: bad 3"
    assert 'File "solution.py", line 2, in f' in result.stderr
    assert not run("def f(:").success
    assert run("import sys; sys.exit(2)").error == "exit status 2"


def test_infinite_loop_and_sleep_time_out():
    for code in ["while True: pass", "import time; time.sleep(60)"]:
        start = time.monotonic()
        result = run(code, timeout=1.0)
        assert result.timeout and not result.success and "timed out" in result.error
        assert time.monotonic() - start < 4  # the timeout, start-up and clean-up on a loaded machine


def test_output_flood_is_capped_and_times_out():
    result = run("import sys\nwhile True: sys.stdout.write('x' * 4096)", timeout=2.0)
    assert result.timeout
    assert MAX_OUTPUT_BYTES <= len(result.stdout) < MAX_OUTPUT_BYTES + 16 * 1024
    assert "bytes left out" in result.stdout


def test_huge_allocations_exceed_memory():
    for code in ["x = bytearray(2**34)", "x = []\nwhile True: x.append(bytearray(2**20))"]:
        result = run(code, maximum_memory_bytes=256 * 2**20)
        assert result.memory_exceeded and not result.success and not result.timeout
        assert "MemoryError" in result.error


def test_work_dir_is_writable_and_removed_afterwards():
    result = run("import os, tempfile\nopen('out.txt', 'w').write('kept')\nos.mkdir('d')\n"
                 "os.rename('out.txt', 'd/out.txt')\nprint(open('d/out.txt').read(), os.getcwd())\n"
                 "tempfile.NamedTemporaryFile().write(b'x')\nos.chmod('d', 0)")
    assert result.success, result.stderr
    text, workdir = result.stdout.split()
    assert text == "kept" and not os.path.exists(workdir)


def test_os_system_and_subprocess_are_refused():
    result = run("import os\nprint(os.system('exit 0'))")  # 0 only if a shell ran
    assert result.success and result.stdout.strip() != "0"
    assert refused(run("import subprocess\nsubprocess.run(['true'])"))


def test_fork_is_refused():
    result = run("import os\nif os.fork() == 0:\n    print('child')")
    assert refused(result) and "child" not in result.stdout


def test_kill_cannot_reach_other_processes():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in [victim.pid, os.getpid()]:
            result = run(f"import os\nos.kill({pid}, 9)")
            assert refused(result)
        assert victim.poll() is None  # still running; and so is this test process
    finally:
        victim.kill()
        victim.wait()
    # pid 1: either refused, or the sandbox's own pid 1 in its pid namespace (and then a no-op)
    result = run("import os, signal\nprint(os.getpid())\nos.kill(1, signal.SIGKILL)")
    assert result.stdout.strip() == "1" or refused(result)
    os.kill(1, 0)  # the real init is alive


def test_parent_environment_is_invisible(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SECRET", SECRET)
    # a process started with the secret in its environment, as Ray workers are
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=dict(os.environ))
    try:
        code = ("import os\nprint(dict(os.environ))\n"
                f"for pid in [{holder.pid}, {os.getpid()}, os.getppid(), 1]:\n"
                "    try:\n"
                "        print(open(f'/proc/{pid}/environ').read())\n"
                "    except OSError as e:\n"
                "        print('refused', pid, e)\n")
        result = run(code)  # run() checks that SECRET appears nowhere
    finally:
        holder.kill()
        holder.wait()
    assert result.success and "NANOCHAT_SECRET" not in result.stdout


def test_files_outside_the_work_dir_cannot_be_written_or_deleted(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("precious")
    result = run(f"import shutil\nshutil.rmtree('{victim}')")
    assert refused(result) and (victim / "data.txt").read_text() == "precious"
    for target in [tmp_path / "new.txt", victim / "data.txt", "/tmp/nanochat-sandbox-escape.txt"]:
        result = run(f"open('{target}', 'w').write('pwned')")
        assert refused(result)
    assert not (tmp_path / "new.txt").exists() and not os.path.exists("/tmp/nanochat-sandbox-escape.txt")
    assert (victim / "data.txt").read_text() == "precious"
    result = run(f"import os\nos.rename('{victim / 'data.txt'}', 'stolen.txt')")
    assert refused(result) and (victim / "data.txt").exists()


def test_files_outside_the_work_dir_cannot_be_read():
    """Landlock allows reads beneath the Python install, /usr, /lib* and the work dir only: a file anyone may
    read by its permissions (a world-readable file in a world-traversable folder: the sandbox's uid is no
    barrier there) is still refused, and so is listing its folder."""
    import shutil
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="nanochat-read-test-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        secret_file = folder / "secret.txt"
        secret_file.write_text(SECRET)  # run() checks that SECRET appears nowhere in the output
        secret_file.chmod(0o644)
        result = run(f"print(open('{secret_file}').read())")
        assert refused(result), (result, sandbox_report())
        result = run(f"import os\nprint(os.listdir('{folder}'))")
        assert refused(result) and "secret.txt" not in result.stdout
        assert run("print(len(open('/usr/lib/os-release').read()) > 0)").stdout == "True\n"  # allowed reads still work
    finally:
        shutil.rmtree(folder)


def test_network_is_refused():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
        assert refused(result) and "connected" not in result.stdout
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()
    result = run("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('8.8.8.8', 53))")
    assert refused(result)


# each prints ESCAPED if the call went through: a shell ran, a process was forked, or the test
# process could be signalled (signal 0 only checks that it may be)
BYPASSES = {
    "ctypes system": "import ctypes\nif ctypes.CDLL(None).system(b'exit 0') == 0: print('ESCAPED')",
    "ctypes fork": "import ctypes\nif ctypes.CDLL(None).fork() >= 0: print('ESCAPED')",
    "ctypes kill": "import ctypes\nif ctypes.CDLL(None).kill({pid}, 0) == 0: print('ESCAPED')",
    "importlib.reload(os)": "import importlib, os\nos = importlib.reload(os)\n"
                            "if os.system('exit 0') == 0: print('ESCAPED')\nos.kill({pid}, 0)\nprint('ESCAPED')",
    "__import__": "if __import__('os').system('exit 0') == 0: print('ESCAPED')\n"
                  "__import__('os').kill({pid}, 0)\nprint('ESCAPED')",
    "posix module": "import posix\nif posix.system('exit 0') == 0: print('ESCAPED')\n"
                    "posix.kill({pid}, 0)\nprint('ESCAPED')",
    "posix exec": "import posix\nposix.execv('/bin/sh', ['sh', '-c', 'echo ESCAPED'])",
}


@pytest.mark.parametrize("name", BYPASSES)
def test_bypasses_hit_the_same_walls(name):
    result = run(BYPASSES[name].format(pid=os.getpid()))
    assert "ESCAPED" not in result.stdout, result


def test_runs_from_threads():
    def work(i):
        return execute_code(f"print({i} * {i})")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(8)))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(8)]
    assert threading.current_thread() is threading.main_thread()  # no signal handlers were needed
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
