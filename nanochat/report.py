"""The report card: each phase logs its settings and results as a JSON section; `generate()` turns
the sections into report.md (environment, cost, code size, one section per phase, a summary table,
loss and bpb curves as PNG plots).

    from nanochat.report import get_report
    get_report().log("base_train", {"settings": {...}, "results": {...}, "curves": {...}})

A section's dict may hold "settings" and "results" (flat dicts, shown as lists), "definitions"
({metric: which definition it follows}, shown with the section and gathered under the summary table),
"curves" ({"name": {"x": [...], "y": [...], "xlabel": ..., "ylabel": ...}}, plotted), and
"wall_seconds" (summed into the total wall time).

The summary's numbers and what they follow: CORE and ChatCORE are nanochat's (compare with its published
GPT-2 CORE 0.2565, d20 CORE 0.2219 and ChatCORE 0.0884); bits per byte is shown twice, on the packed rows
training sees and on nanochat's seed rows; SpellingBee is beside ChatCORE, not in it. The eval phases
write the exact wording (base_eval, chat_eval), so the report states each number's definition. Sections are files, so a phase that ran in
another process (a Ray task, a Train worker) logs with the same call.
"""
import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from nanochat.common import atomic_write_text, get_base_dir

# phases in pipeline order; the report lists logged sections in this order, unknown ones after
PHASES = [
    "tok_train", "tok_eval", "base_train", "base_loss", "base_eval", "mid_train", "chat_eval_mid",
    "chat_sft", "chat_eval_sft", "chat_rl", "chat_eval_rl",
]
BASE_METRICS = ["CORE", "val_bpb_packed", "val_bpb_nanochat"]
CHAT_METRICS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
STAGES = {"base": "base_eval", "mid": "chat_eval_mid", "sft": "chat_eval_sft", "rl": "chat_eval_rl"}
GPU_HOUR_USD = 3.0  # rough on-demand price of one H100 hour; the report says it is an estimate


class Report:
    def __init__(self, directory):
        self.directory = Path(directory)

    def log(self, section: str, data: dict):
        """Record (or replace) one section. Atomic: a reader never sees half a section."""
        data = {"logged_at": datetime.datetime.now().isoformat(timespec="seconds"), **data}
        atomic_write_text(self.directory / f"{section}.json", json.dumps(data, indent=2, default=str))

    def sections(self) -> dict:
        found = {p.stem: json.loads(p.read_text()) for p in self.directory.glob("*.json")}
        order = [s for s in PHASES if s in found] + sorted(s for s in found if s not in PHASES and s != "environment")
        return {s: found[s] for s in order}

    def reset(self):
        """Start a new report: drop earlier sections and plots."""
        for p in list(self.directory.glob("*.json")) + list((self.directory / "plots").glob("*.png")):
            p.unlink()

    def generate(self, gpu_hour_usd: float = GPU_HOUR_USD) -> Path:
        sections = self.sections()
        env = environment_info()
        total_wall = sum(float(s.get("wall_seconds", 0)) for s in sections.values())
        gpu_hours = sum(float(s.get("gpu_hours", 0)) for s in sections.values())
        lines = ["# nanochat on Ray: report card", "", f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M:%S}", ""]
        lines += ["## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()] + [""]
        lines += [f"- code: {code_size()}"]
        lines += [f"- GPU hours: {gpu_hours:.2f}, estimated cost ${gpu_hours * gpu_hour_usd:.2f} (at ${gpu_hour_usd:.2f}/GPU-hour, an estimate)"]
        lines += [f"- total wall time: {format_seconds(total_wall)}", ""]
        lines += ["## Summary", ""] + summary_table(sections) + [""] + definitions(sections)
        for name, data in sections.items():
            lines += self._section_markdown(name, data)
        out = self.directory / "report.md"
        atomic_write_text(out, "\n".join(lines) + "\n")
        return out

    def _section_markdown(self, name, data):
        lines = [f"## {name}", ""]
        if "wall_seconds" in data:
            lines += [f"wall time: {format_seconds(float(data['wall_seconds']))}", ""]
        for kind in ("settings", "results", "definitions"):
            if data.get(kind):
                lines += [f"**{kind}**", ""] + [f"- {k}: {format_value(v)}" for k, v in data[kind].items()] + [""]
        if data.get("table"):  # preformatted markdown (e.g. tok_eval's comparison)
            lines += [data["table"], ""]
        for curve_name, curve in (data.get("curves") or {}).items():
            png = self.plot(f"{name}_{curve_name}", curve)
            if png is not None:
                lines += [f"![{name} {curve_name}](plots/{png.name})", ""]
        return lines

    def plot(self, name, curve):
        """Save a curve as a PNG next to the report; None if the curve is empty."""
        if not curve.get("x"):
            return None
        import matplotlib
        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(curve["x"], curve["y"], marker="o" if len(curve["x"]) < 30 else None)
        ax.set_xlabel(curve.get("xlabel", "step"))
        ax.set_ylabel(curve.get("ylabel", name))
        ax.set_title(name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.directory / "plots" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        return path


def summary_table(sections):
    """CORE for the base model; the chat metrics for each chat stage. '-' where not measured."""
    def metric(stage, key):
        results = sections.get(STAGES[stage], {}).get("results", {})
        value = results.get(key)
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"
    stages = list(STAGES)
    rows = ["| metric | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for key in BASE_METRICS + CHAT_METRICS:
        rows.append(f"| {key} | " + " | ".join(metric(s, key) for s in stages) + " |")
    return rows


def definitions(sections):
    """'What each number follows' under the summary table: the definitions the eval sections recorded,
    once per metric, in pipeline order, and the training phases' validation bits per byte."""
    from nanochat.loss_eval import BPB_PACKED_DEFINITION
    found = {}
    for name in STAGES.values():
        for metric, text in sections.get(name, {}).get("definitions", {}).items():
            found.setdefault(metric, text)
    if "val_bpb" in sections.get("base_train", {}).get("results", {}):
        found["val_bpb (base_train)"] = BPB_PACKED_DEFINITION + ", on each training worker's share of the documents"
    chat = [p for p in ("mid_train", "chat_sft") if "val_bpb" in sections.get(p, {}).get("results", {})]
    if chat:
        found[f"val_bpb ({', '.join(chat)})"] = ("bits per byte of the phase's held-out conversations, on the tokens it "
                                                 "trains on: not comparable with the base model's")
    if not found:
        return []
    return ["Definitions:", ""] + [f"- {metric}: {text}" for metric, text in found.items()] + [""]


def environment_info():
    info = {"git commit": git_commit(), "platform": platform.platform(), "python": platform.python_version()}
    for package in ("torch", "ray"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    info["cpu"] = f"{cpu_model()} ({os.cpu_count()} logical cores)"
    try:
        info["memory"] = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError):
        pass
    try:
        import torch
        if torch.cuda.is_available():
            info["gpus"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        else:
            info["gpus"] = "none"
    except ImportError:
        info["gpus"] = "unknown"
    return info


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return (out.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_size():
    """Lines and characters of the project's own source (Python + Rust)."""
    root = Path(__file__).resolve().parent.parent
    files = [p for d in ("nanochat", "tasks", "ray_jobs", "serve_app", "rustbpe/src") for p in (root / d).rglob("*")
             if p.suffix in (".py", ".rs")]
    lines = chars = 0
    for p in files:
        text = p.read_text(errors="replace")
        lines += text.count("\n")
        chars += len(text)
    return f"{len(files)} files, {lines:,} lines, {chars:,} characters"


def format_seconds(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m{s % 60:04.1f}s" if s >= 3600 else f"{int(s // 60)}m{s % 60:04.1f}s"


def format_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def get_report(directory=None) -> Report:
    """The run's report, under $NANOCHAT_BASE_DIR/report unless a directory (e.g. cluster storage) is given."""
    return Report(directory or (get_base_dir() / "report"))
