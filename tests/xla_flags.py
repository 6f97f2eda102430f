"""XLA_FLAGS for a test's subprocess: the test run's own (tests/conftest.py: its quick CPU
code generator) on a given number of simulated CPU devices."""

import os

_DEVICES = "--xla_force_host_platform_device_count="


def on_devices(devices: int) -> str:
    """The run's XLA_FLAGS with `devices` CPU devices (1: XLA's default, as users run)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICES)]
    return " ".join([*flags, *([f"{_DEVICES}{devices}"] if devices > 1 else [])])
