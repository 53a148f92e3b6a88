"""Scorers that misbehave on purpose, for tests/test_sandbox.py: each returns 1.0 only if what it tried succeeded.
Imported by the sealed scoring worker (via SandboxedReward), never by the tests' own process."""

import ctypes
import hashlib
import os
import socket
import subprocess
import time


def evaluate(answer, path):
    eval(answer)  # noqa: S307 - the point: a scorer that evaluates the answer
    return 1.0


def write(answer, path):
    with open(path, "w") as f:
        f.write(answer)
    return 1.0


def shell(answer, path):
    os.system(f"touch {path}")
    subprocess.Popen(["touch", path]).wait()
    return 1.0


def fork(answer, path):
    if os.fork() == 0:
        open(path, "w").close()
        os._exit(0)
    return 1.0


def connect(answer, path):
    socket.socket().connect(("127.0.0.1", 9))
    return 1.0


def import_new(answer, path):
    import wave  # noqa: F401 - not loaded before the worker sealed
    return 1.0


def native(answer, path):
    ctypes.CDLL(None).system(f"touch {path}".encode())
    return 1.0


def sleep(answer, path):
    time.sleep(float(answer))
    return 1.0


def burn(answer, path):
    hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10 ** int(answer))  # one long C call: no signal interrupts it
    return 1.0


def length(answer, path):
    return float(len(answer))
