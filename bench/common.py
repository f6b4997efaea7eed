"""What every benchmark shares: the record of the machine it ran on (results are only comparable on the
same one), and how its one JSON line is printed and kept."""
import json
import os
import platform
import sys
from pathlib import Path

from nanochat.report import cpu_model


def machine_info():
    """CPU model and cores, GPU when there is one, the versions that matter, and the 1-minute load
    average: a shared machine's other work skews absolute numbers, so the record says how busy it was."""
    import torch
    info = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "loadavg_1m_start": round(os.getloadavg()[0], 2)}
    try:
        import ray
        info["ray"] = ray.__version__
    except ImportError:  # the GPU box has torch only: the record just lacks Ray's version
        info["ray"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def emit(result: dict, out=None):
    """Print the benchmark's one JSON line; with `out`, also keep it in that file (bench/results/...). Every
    record says how it was made: the exact command (unless the bench wrote it), and the 1-minute load average
    at the end beside the start's (machine_info)."""
    script = os.path.relpath(sys.argv[0], Path(__file__).resolve().parents[1])  # relative: no machine's path
    result = {"command": " ".join(["python", script, *sys.argv[1:]]), **result}
    if isinstance(result.get("machine"), dict):
        result["machine"].setdefault("loadavg_1m_end", round(os.getloadavg()[0], 2))
    line = json.dumps(result)
    print(line)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(line + "\n")


class NoStopTokenizer:
    """The little of a tokenizer the engines use, with special ids the model can never produce: random
    weights never stop a run early (every request decodes exactly its max_tokens)."""

    def __init__(self, vocab_size):
        from nanochat.tokenizer import SPECIAL_TOKENS
        self.ids = {name: vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]
