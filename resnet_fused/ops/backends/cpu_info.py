"""Which CPU this is, for the "cpu" backend's rules that were measured to differ between vendors."""

from __future__ import annotations


def cpu_vendor() -> str:
    """The CPU's vendor string (x86 Linux: 'GenuineIntel', 'AuthenticAMD'), or '' where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
