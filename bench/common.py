"""What every benchmark records about the machine it ran on (results are only comparable on the same one)."""
import os
import platform
from pathlib import Path


def machine_info():
    """CPU model and cores, GPU when there is one, the versions that matter, and the 1-minute load
    average: a shared machine's other work skews absolute numbers, so the record says how busy it was."""
    import torch
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "loadavg_1m_start": round(os.getloadavg()[0], 2)}
    try:
        import ray
        info["ray"] = ray.__version__
    except ImportError:  # the GPU box has torch only
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
