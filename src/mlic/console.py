"""A quiet console for stages that import TensorFlow: its start-up chatter goes, its errors stay.

On a CPU-only machine TensorFlow 2.21 prints about nine lines on stderr before a stage says a word
(absl's "before InitializeLog" notice, the oneDNN and "could not find cuda drivers" notices, each
twice, and `E0000 ... failed call to cuInit: ... UNKNOWN ERROR (303)`, an ERROR line that only
means "no GPU"), and training adds an ERROR-level `oneDNN supports DT_BOOL only ...` fallback
notice. TF_CPP_MIN_LOG_LEVEL=1 hides none of them (the first ones are printed before absl reads
it); 3 hides them and every real error too.

`quiet_tensorflow()`, called before anything imports TensorFlow:
- sets TF_CPP_MIN_LOG_LEVEL=1 unless the environment sets it (TF's INFO lines off);
- routes file descriptor 2 through a small filter process that drops whole lines matching NOISE
  and passes everything else unchanged and in order: TF warnings and errors, Python logging,
  warnings and tracebacks (they share the descriptor, so their relative order is kept too).

A process, not a thread, does the filtering: when the stage dies abruptly (a TF `F` line then
abort(), a segfault with faulthandler, os._exit) the filter still reads what was written and
prints it; a thread would die with the stage, and one waiting for the GIL could block a C++
writer. When stderr is a terminal the filter reads a pseudo-terminal, so `isatty()` (tqdm, colour)
and the terminal width still hold. At exit the stage waits until the filter has printed all it
wrote (milliseconds; at most 5 s), then gives fd 2 back to the console.

Opt out with MLIC_TF_LOG=all: nothing is filtered and TF_CPP_MIN_LOG_LEVEL is left alone.
POSIX only; elsewhere only TF_CPP_MIN_LOG_LEVEL is set. Imports no TensorFlow.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys

OPT_OUT = "MLIC_TF_LOG"  # MLIC_TF_LOG=all: show TensorFlow's console output unfiltered

# The head of a TF C++ log line: absl's `E0000 00:00:1796232933.216855   13577 file.cc:52] ` or the
# older `2023-10-09 13:36:23.355516: E path/file.cc:9342] `. Never `F` (fatal) lines.
_HEAD = r"(?:[IWE]\d{4} [\d:.]+ +\d+ |\d{4}-\d\d-\d\d [\d:.]+: [IWE] )[\w/.+-]+:\d+\] "

# (whole-line regex, dropped only when the machine has no GPU). Keep this list short and exact.
NOISE: tuple[tuple[str, bool], ...] = (
    # absl, once per TF library, before logging is set up (so TF_CPP_MIN_LOG_LEVEL cannot hide it).
    (r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$", False),
    # oneDNN is on by default on x86: the notice says how to turn it off; nothing is wrong.
    (_HEAD + r"oneDNN custom operations are on\. ", False),
    # A bool op runs in Eigen rather than oneDNN: a dispatch choice, logged at ERROR level.
    (_HEAD + r"oneDNN supports DT_BOOL only on platforms with AVX-512\. Falling back ", False),
    # GPU wheels register their CUDA plugins twice (tensorflow/tensorflow#62075): harmless.
    (_HEAD + r"Unable to register cu(?:DNN|FFT|BLAS) factory: Attempting to register factory for "
             r"plugin cu\w+ when one has already been registered$", False),
    (_HEAD + r"computation placer already registered\. ", False),
    # "No GPU", said twice, the second time at ERROR level. Kept where a GPU exists: there they
    # are the clue to a broken driver.
    (_HEAD + r"Could not find cuda drivers on your machine, GPU will not be used\.$", True),
    (_HEAD + r"failed call to cuInit: ", True),
)

# Run as `python -I -S -c _FILTER <regex> <ack fd> <mark>`: reads fd 0 (the stage's stderr), writes
# fd 1 (the console). At exit the stage writes <mark>; the filter answers on <ack fd> once all
# before it is out, so the stage need not wait for the pipe to close: a subprocess may hold it
# (multiprocessing's resource tracker does until the stage has exited). The filter ends when the
# last writer has gone, after draining. Its own session keeps the terminal's Ctrl-C away (it
# would otherwise die while still starting, before the stage's traceback); it ignores SIGINT and
# SIGTERM sent to it anyway.
_FILTER = r"""
import os, re, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
drop, ack, mark = re.compile(sys.argv[1].encode()), int(sys.argv[2]), b"\0" + sys.argv[3].encode()
out, tail = 1, b""
def emit(data):
    global out
    while data and out is not None:
        try:
            data = data[os.write(out, data):]
        except OSError:  # the console went away: keep reading so that writers never block
            out = None
while True:
    if tail and not select.select([0], [], [], 0.05)[0]:
        emit(tail)  # a line still open after 50 ms (a progress bar, a prompt): show it now
        tail = b""
        continue
    try:
        chunk = os.read(0, 1 << 16)
    except OSError:  # EIO: a pseudo-terminal whose last writer has closed it
        chunk = b""
    if not chunk:
        break
    *lines, tail = (tail + chunk).split(b"\n")
    kept = []
    for line in lines:
        if line.endswith(mark):  # the stage is exiting: all it wrote before is out
            emit(b"".join(kept) + line[:-len(mark)])
            kept = []
            os.write(ack, b"!")
        elif not drop.match(line):
            kept.append(line + b"\n")
    emit(b"".join(kept))
emit(tail)
"""

_installed = False


def _gpu_absent() -> bool:
    """No NVIDIA device node (/dev/nvidia0...), or CUDA_VISIBLE_DEVICES hides them all."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return True
    try:
        return not any(n.startswith("nvidia") and n[6:].isdigit() for n in os.listdir("/dev"))
    except OSError:
        return True


def noise_regex(gpu_absent: bool) -> str:
    """One regex matching every line to drop on this machine (a GPU keeps the no-GPU lines)."""
    return "|".join(f"(?:{rx})" for rx, no_gpu_only in NOISE if gpu_absent or not no_gpu_only)


def _pseudo_terminal(like: int) -> tuple[int, int]:
    import fcntl
    import termios
    import tty

    reader, writer = os.openpty()  # glibc opens it O_NOCTTY: never our controlling terminal
    tty.setraw(writer)  # bytes pass as written: no "\n" -> "\r\n", no echo
    try:
        fcntl.ioctl(writer, termios.TIOCSWINSZ, fcntl.ioctl(like, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        pass
    return reader, writer


def quiet_tensorflow() -> None:
    """Hide TensorFlow's start-up chatter on stderr; keep its errors (see module docstring).

    Call it first thing in a script, before any import that loads TensorFlow. A second call does
    nothing. Set MLIC_TF_LOG=all to see everything.
    """
    global _installed
    if _installed or os.environ.get(OPT_OUT, "").strip().lower() == "all":
        return
    _installed = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if os.name != "posix" or not sys.executable:
        return
    try:
        console = os.dup(2)
    except OSError:  # no stderr at all: nothing to filter
        return
    try:
        reader, writer = _pseudo_terminal(console) if os.isatty(console) else os.pipe()
    except OSError:
        os.close(console)
        return
    ack_reader, ack_writer = os.pipe()
    mark = f"mlic.console.drained.{os.getpid()}.{os.urandom(8).hex()}"  # written with a NUL in front
    try:
        if sys.stderr is not None:
            sys.stderr.flush()  # what Python has buffered goes out before the switch
        child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, noise_regex(_gpu_absent()),
                                  str(ack_writer), mark],
                                 stdin=reader, stdout=console, stderr=console, pass_fds=(ack_writer,),
                                 start_new_session=True)  # Ctrl-C at the terminal is not for it
    except (OSError, ValueError):  # no filter: TensorFlow's chatter stays, nothing breaks
        for fd in (writer, console, ack_reader):
            os.close(fd)
        return
    finally:
        os.close(reader)
        os.close(ack_writer)
    os.dup2(writer, 2)
    os.close(writer)
    atexit.register(_restore, console, ack_reader, mark, os.getpid(), child)


def _restore(console: int, ack: int, mark: str, pid: int, child: subprocess.Popen) -> None:
    """At exit: wait until the filter has printed all we wrote, then give fd 2 back to the console.

    Not until the filter ends: a subprocess may still hold the pipe (see _FILTER).
    """
    if os.getpid() != pid:  # a forked child inherited the handler; the parent restores
        return
    import select

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    try:
        os.write(2, b"\0" + mark.encode() + b"\n")
        select.select([ack], [], [], 5)  # "!" when drained; end of file if the filter died
    except OSError:
        pass
    os.dup2(console, 2)  # the filter's end of file, unless a subprocess still holds the pipe
    for fd in (console, ack):
        os.close(fd)
    try:
        child.wait(timeout=0.1)  # reaped, so `python -X dev` has no ResourceWarning to report
    except subprocess.TimeoutExpired:  # it outlives us, filtering that subprocess's output
        pass
