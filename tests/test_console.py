"""Tests for the quiet console (`mlic.console`): TF's start-up chatter goes, errors and tracebacks stay.

Every behaviour is checked in a fresh Python process (the function rewires file descriptor 2,
which must not happen to pytest's own). Most scripts write the measured noise lines themselves,
so they run in ~0.1 s; two import TensorFlow for real, once filtered and once opted out, the
second proving there is noise for the first to remove.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import tty
from pathlib import Path

import pytest

from mlic import console

ROOT = Path(__file__).resolve().parents[1]

# Lines seen on stderr (TF 2.21 CPU wheel on these machines; the GPU-wheel ones from
# tensorflow/tensorflow#62075 and its duplicates), in both TF log formats.
NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796232924.947764   13577 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders. "
    "To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "E0000 00:00:1796233025.923662   16355 util.cc:131] oneDNN supports DT_BOOL only on platforms with AVX-512. "
    "Falling back to the default Eigen-based implementation if present.",
    "E0000 00:00:1751448150.986970   10148 cuda_dnn.cc:8579] Unable to register cuDNN factory: Attempting to "
    "register factory for plugin cuDNN when one has already been registered",
    "2023-10-09 13:36:23.355674: E tensorflow/compiler/xla/stream_executor/cuda/cuda_fft.cc:609] Unable to "
    "register cuFFT factory: Attempting to register factory for plugin cuFFT when one has already been registered",
    "W0000 00:00:1751448151.003754   10148 computation_placer.cc:177] computation placer already registered. "
    "Please check linkage and avoid linking the same target more than once.",
]
NO_GPU_NOISE = [
    "I0000 00:00:1796232924.948135   13577 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    "GPU will not be used.",
    "E0000 00:00:1796232933.216855   13577 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)",
]
KEPT = [
    "W0000 00:00:1796233839.704724   26289 op_kernel.cc:1858] OP_REQUIRES failed at whole_file_read_ops.cc:117 : "
    "NOT_FOUND: /nonexistent/file; No such file or directory",
    "W0000 00:00:1796233839.704792   26289 op_kernel.cc:1858] OP_REQUIRES failed at cwise_ops_common.h:100 : "
    "RESOURCE_EXHAUSTED: OOM when allocating tensor with shape[100000,100000] and type float on "
    "/job:localhost/replica:0/task:0/device:CPU:0 by allocator mklcpu",
    "E0000 00:00:1796233839.704724   26289 cuda_dnn.cc:522] Could not create cudnn handle: CUDNN_STATUS_INTERNAL_ERROR",
    "F0000 00:00:1796233839.704724   26289 util.cc:131] Check failed: oneDNN custom operations are on. ",  # fatal: never dropped
    "INFO mlic.stages.train: failed call to cuInit: quoted by Python, not a TF log line",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow",  # level 1 hides its head
]
GPU_ABSENT = console._gpu_absent()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", console.OPT_OUT)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def _script(body: str, calls: int = 1) -> str:
    return "from mlic.console import quiet_tensorflow\n" + "quiet_tensorflow()\n" * calls + textwrap.dedent(body)


def _writes(lines: list[str]) -> str:
    return "".join(f"os.write(2, {(line + chr(10)).encode()!r})\n" for line in lines)


def _run(body: str, calls: int = 1, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _script(body, calls)], capture_output=True, env=_env(**env),
                          timeout=60)


# --------------------------------------------------------------------------- the list itself
@pytest.mark.parametrize("line", NOISE + NO_GPU_NOISE)
def test_noise_lines_match(line: str) -> None:
    assert re.match(console.noise_regex(gpu_absent=True), line)


@pytest.mark.parametrize("line", KEPT)
def test_real_messages_do_not_match(line: str) -> None:
    assert not re.match(console.noise_regex(gpu_absent=True), line)


@pytest.mark.parametrize("line", NO_GPU_NOISE)
def test_no_gpu_lines_kept_where_a_gpu_exists(line: str) -> None:
    assert not re.match(console.noise_regex(gpu_absent=False), line)


# --------------------------------------------------------------------------- the filter, no TF
def test_filters_noise_and_passes_everything_else_in_order() -> None:
    sub = f"import os; os.write(2, {(NOISE[0] + chr(10)).encode()!r}); os.write(2, b'last: a subprocess' + bytes([10]))"
    body = ("import logging, os, subprocess, sys\n" + _writes(NOISE[:2])
            + "print('one: python print', file=sys.stderr)\n"
            + _writes([NOISE[2], KEPT[0]])
            + "logging.basicConfig(format='%(message)s')\nlogging.getLogger('x').warning('three: logging')\n"
            + _writes(NOISE[3:] + (NO_GPU_NOISE if GPU_ABSENT else []) + KEPT[1:])
            + f"subprocess.run([sys.executable, '-c', {sub!r}])\n")  # a child of the stage inherits fd 2
    proc = _run(body)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr.decode().splitlines() == ["one: python print", KEPT[0], "three: logging", *KEPT[1:],
                                                 "last: a subprocess"]


@pytest.mark.parametrize("ending, returncode", [
    ("sys.exit(7)", 7),
    ("os._exit(3)", 3),  # no atexit: the filter process still drains and prints
    ("os.abort()", -signal.SIGABRT),  # as after a TF `F` line: the lines before it are not lost
], ids=["sys.exit", "os._exit", "abort"])
def test_nothing_lost_and_exit_code_kept(ending: str, returncode: int) -> None:
    body = "import os, sys\nfor i in range(3000):\n    os.write(2, b'line %d\\n' % i)\n" + _writes(NOISE) + ending
    proc = _run(body)
    assert proc.returncode == returncode
    assert proc.stderr.decode().splitlines() == [f"line {i}" for i in range(3000)]


def test_exit_not_delayed_by_a_subprocess_that_outlives_the_stage() -> None:
    # multiprocessing's resource tracker holds the stage's stderr until the stage has exited:
    # exit must not wait for the pipe to close, and what the subprocess writes later is filtered too.
    # The subprocess writes only once the stage has exited (it waits up to 60 s for that): a stage
    # that waited for the pipe would sit out those 60 s, past the 30 s wait below. No clock margin.
    late = ("import os, time; parent = os.getppid(); deadline = time.time() + 60\n"
            "while os.getppid() == parent and time.time() < deadline:\n    time.sleep(0.05)\n"
            + _writes([NOISE[0], "late: the subprocess"]))
    body = f"import os, subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {late!r}])\n" + _writes(["stage: done"])
    proc = subprocess.Popen([sys.executable, "-c", _script(body)], stderr=subprocess.PIPE, env=_env())
    assert proc.wait(timeout=30) == 0
    assert proc.stderr.read().decode().splitlines() == ["stage: done", "late: the subprocess"]


def test_uncaught_exception_traceback_reaches_stderr() -> None:
    proc = _run("import os\n" + _writes(NOISE) + "raise RuntimeError('boom')\n")
    assert proc.returncode == 1
    err = proc.stderr.decode().splitlines()
    assert err[0] == "Traceback (most recent call last):" and err[-1] == "RuntimeError: boom"


def test_ctrl_c_traceback_survives() -> None:
    # Ctrl-C reaches the whole process group, filter included: it must not die before draining.
    # A shell's background job starts with SIGINT ignored, and Python then keeps it ignored:
    # restore Python's own handler, as an interactive terminal would have it.
    body = ("import signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "print('ready', flush=True)\ntime.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", _script(body)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), start_new_session=True)
    assert proc.stdout.readline() == b"ready\n"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGINT
    assert err.decode().splitlines()[-1] == "KeyboardInterrupt"


def test_partial_line_shown_without_waiting_for_a_newline() -> None:
    # A progress bar redraws with "\r" and no newline: it must not sit in the filter.
    proc = subprocess.Popen([sys.executable, "-c", _script("import os, time\nos.write(2, b'50%|#####\\r')\ntime.sleep(20)")],
                            stderr=subprocess.PIPE, env=_env())
    try:
        assert select.select([proc.stderr], [], [], 10)[0], "partial line not shown within 10 s"
        assert os.read(proc.stderr.fileno(), 100) == b"50%|#####\r"
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_second_call_is_a_no_op() -> None:
    body = """
        import os
        children = f"/proc/self/task/{os.getpid()}/children"
        print(len(open(children).read().split()) if os.path.exists(children) else 1)
        os.write(2, b"once\\n")
        """
    proc = _run(body, calls=2)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"1\n", b"once\n")


@pytest.mark.parametrize("env, level, noise_kept", [
    ({}, "1", False),
    ({"TF_CPP_MIN_LOG_LEVEL": "0"}, "0", False),  # the user's value wins
    ({console.OPT_OUT: "all"}, "None", True),  # opted out: nothing changed
], ids=["default", "user-level", "opt-out"])
def test_log_level_and_opt_out(env: dict[str, str], level: str, noise_kept: bool) -> None:
    proc = _run("import os\nprint(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))\n" + _writes(NOISE[:1]), **env)
    assert proc.stdout.decode().strip() == level
    assert (NOISE[0] in proc.stderr.decode()) is noise_kept


def test_terminal_stays_a_terminal() -> None:
    # On a terminal the filter reads a raw pseudo-terminal: isatty() holds (tqdm draws its bar),
    # and bytes pass unchanged (no "\r" added to "\n").
    reader, writer = pty.openpty()
    tty.setraw(writer)
    proc = subprocess.Popen([sys.executable, "-c", _script("import os, sys\nprint(os.isatty(2), sys.stderr.isatty())\n"
                                                           + _writes(NOISE + KEPT[:1]))],
                            stdout=subprocess.PIPE, stderr=writer, env=_env())
    os.close(writer)
    out = b""
    while select.select([reader], [], [], 30)[0]:
        try:
            chunk = os.read(reader, 1 << 16)
        except OSError:  # EIO: every writer has gone
            break
        if not chunk:
            break
        out += chunk
    os.close(reader)
    assert proc.communicate(timeout=30)[0] == b"True True\n"
    assert out == (KEPT[0] + "\n").encode()


def test_call_costs_milliseconds() -> None:
    script = textwrap.dedent("""
        import time
        from mlic.console import quiet_tensorflow
        t = time.perf_counter()
        quiet_tensorflow()
        print(1000 * (time.perf_counter() - t))
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=_env(), timeout=60)
    ms = float(proc.stdout)
    assert ms < 100, f"quiet_tensorflow() took {ms:.1f} ms"  # measured ~1 ms; TF's import takes ~3500


# --------------------------------------------------------------------------- real TensorFlow
TF_BODY = """
    import tensorflow as tf
    print(tf.config.list_physical_devices())  # the CUDA probe: cuInit
    print(float(tf.reduce_sum(tf.ones(3))))
    tf.io.read_file("/nonexistent/mlic-console-test")  # fails: NotFoundError, uncaught
    """
NOISE_WORDS = ("cuInit", "oneDNN", "computation placer", "Unable to register", "absl::InitializeLog",
               "cuda drivers", "cpu_feature_guard")


@pytest.fixture(scope="module")
def tf_runs() -> dict[str, subprocess.CompletedProcess]:
    """The same TF script, filtered and opted out, run side by side (each imports TF: ~4 s)."""
    procs = {name: subprocess.Popen([sys.executable, "-c", _script(TF_BODY)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=_env(**env))
             for name, env in (("quiet", {}), ("all", {console.OPT_OUT: "all"}))}
    runs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        runs[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return runs


def test_tensorflow_start_up_noise_exists_unfiltered(tf_runs) -> None:
    err = tf_runs["all"].stderr.decode()
    # oneDNN's line shows only where TensorFlow turns its custom ops on (not on a CPU without
    # AVX2, which gets cpu_feature_guard's line instead): the noise differs by machine, not its kind.
    assert "absl::InitializeLog" in err
    assert "oneDNN custom operations are on" in err or "cpu_feature_guard" in err, err[-3000:]
    if GPU_ABSENT:
        assert "failed call to cuInit" in err


def test_tensorflow_start_up_is_quiet_but_errors_stay(tf_runs) -> None:
    run = tf_runs["quiet"]
    err = run.stderr.decode()
    assert run.returncode == 1
    assert b"3.0" in run.stdout
    assert [line for line in err.splitlines() if any(word in line for word in NOISE_WORDS)] == []
    assert "OP_REQUIRES failed" in err and "NOT_FOUND: /nonexistent/mlic-console-test" in err  # TF's C++ error
    assert "Traceback (most recent call last):" in err
    assert err.splitlines()[-1].startswith("tensorflow.python.framework.errors_impl.NotFoundError")
