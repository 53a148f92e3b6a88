"""XLA_FLAGS for a process a test starts: the suite's flags (tests/conftest.py) with its own CPU device count."""

import os


def xla_flags(devices: int) -> str:
    """The suite's XLA flags with `devices` CPU devices in place of its 8 (1: no device-count flag)."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"] * (devices > 1))
