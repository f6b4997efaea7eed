"""The main job: raw text -> tokenizer -> ... -> a chat model, with a report card at the end.

    python ray_jobs/speedrun.py                   # on this machine (starts a local Ray if none runs)
    ray job submit --working-dir . -- python ray_jobs/speedrun.py --preset d20   # on a cluster

Each phase runs as a Ray task or a Ray Train run. A phase is skipped when its completion marker
exists, so re-running the same command after a crash continues where it stopped (--restart
starts over). Everything goes under $NANOCHAT_BASE_DIR (default ~/.cache/nanochat).
"""
import json
import os
import time
from types import SimpleNamespace

from nanochat.common import ArgumentParser, SettingsError, get_base_dir, setup_logging

parser = ArgumentParser(description="nanochat speedrun: the whole pipeline")
parser.add_argument("--preset", choices=["tiny", "smoke", "d20", "d26", "d32"], default=None,
                    help="model/data scale (default: tiny without GPUs, d20 when every node has 8 GPUs)")
parser.add_argument("--run", default="speedrun", help="run name: markers and the report go under <base>/runs/<run>")
parser.add_argument("--restart", action="store_true", help="ignore completed phases and run everything again")
parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray started when none runs")
parser.add_argument("--storage", default=None, help="base dir on storage every node sees (a shared file system path); "
                    "default $NANOCHAT_BASE_DIR: everything (tokenizer, checkpoints, report) goes there")
parser.add_argument("--no-rl", action="store_true", help="skip RL (and the chat eval after it)")

# Settings per preset: how much data, and the flags each phase script gets.
# tiny: the whole pipeline on a 2-core CPU machine in minutes; smoke: the same path, smaller still (tests).
TINY_CHAT = dict(mid_train=["--preset", "tiny"], chat_sft=["--preset", "tiny"], chat_eval=["--preset", "tiny"],
                 chat_rl=["--preset", "tiny"])
PRESETS = {
    "tiny": dict(num_shards=4, tok_max_chars=20_000_000, vocab_size=8192,
                 base_train=["--preset", "tiny"], base_eval=["--max-per-task", "16"], **TINY_CHAT),
    "smoke": dict(num_shards=4, tok_max_chars=2_000_000, vocab_size=1024,
                  base_train=["--preset", "tiny", "--depth", "2", "--head-dim", "32", "--max-seq-len", "128",
                              "--device-batch-size", "4", "--total-batch-size", "1024", "--num-iterations", "20",
                              "--eval-every", "10", "--save-every", "10", "--data-actor-cpus", "0.5"],
                  base_eval=["--max-per-task", "2"],
                  mid_train=["--preset", "tiny", "--num-iterations", "10", "--task-limit", "40"],
                  chat_sft=["--preset", "tiny", "--num-iterations", "8", "--task-limit", "24"],
                  chat_eval=["--preset", "tiny", "--max-problems", "4", "--max-new-tokens", "16"],
                  chat_rl=["--preset", "tiny"]),
}
# GPU presets: the device batches are the plan's (the largest that fits each phase), the shards too (what the
# tokens need after packing waste, measured on a downloaded shard, + 5%): ray_jobs/plan.py
for _name, _depth in (("d20", 20), ("d26", 26), ("d32", 32)):
    PRESETS[_name] = dict(num_shards=None, tok_max_chars=2_000_000_000, vocab_size=65536,
                          base_train=["--depth", str(_depth)], base_eval=[], mid_train=[], chat_sft=[], chat_eval=[], chat_rl=[])


def pick_preset(requested, resources):
    if requested:
        return requested
    gpus = resources.get("GPU", 0)
    if gpus == 0:
        return "tiny"
    import ray
    if all(node["Resources"].get("GPU", 0) == 8 for node in ray.nodes() if node["Alive"] and node["Resources"].get("GPU")):
        return "d20"
    raise SettingsError(f"this cluster has {gpus:g} GPUs but not 8 per node: pick a scale with --preset (tiny, d20, d26, d32)")


def phase_download(num_shards, plan=None):
    """The training shards and the validation shard. num_shards None (GPU presets): as many as the plan's data
    section says the run needs, measured on a first shard downloaded for that."""
    from nanochat.dataset import download_shards
    if num_shards is None:
        download_shards(1, progress=False)
        num_shards = plan_shards(plan)
    paths = download_shards(num_shards, progress=False)
    return {"results": {"shards": len(paths) - 1, "directory": str(paths[0].parent)}}


def plan_shards(plan):
    """Shards the plan's pretraining needs, re-measured now that a shard is here (the plan may have been
    made before any was)."""
    from ray_jobs.plan import phase_settings, model_config, plan_data
    args = phase_settings("base_train", PRESETS[plan["preset"]]["base_train"])
    data = plan_data(args, model_config(args, plan["model"]["vocab_size"]), plan["num_params"], plan["world_size"],
                     plan["phases"]["base_train"]["data"].get("gpu_tokens_per_s", 1e5))
    return data["shards_needed"]


def phase_tok_train(max_chars, vocab_size):
    from ray_jobs import tok_train
    result = tok_train.main(tok_train.parser.parse_args(["--max-chars", str(max_chars), "--vocab-size", str(vocab_size)]))
    return {"settings": {"max_chars": max_chars, "vocab_size": vocab_size}, "results": result}


def phase_tok_eval():
    from ray_jobs import tok_eval
    result = tok_eval.main(tok_eval.parser.parse_args([]))
    names = ["ours", "gpt2", "gpt4"]
    table = tok_eval.markdown_table(result["bytes_per_token"], [n for n in names if n in result["bytes_per_token"]["english"]])
    return {"results": {f"bytes_per_token_{k}": v["ours"] for k, v in result["bytes_per_token"].items()},
            "table": table + "".join(f"\n\n{k}: {v}" for k, v in result["unavailable"].items())}


def make_plan(preset_name, resources):
    """The run's plan (ray_jobs/plan.py) for this cluster: its GPUs per node and node count, its GPU's memory."""
    import ray
    from ray_jobs.plan import plan_run
    if preset_name in ("tiny", "smoke"):
        return plan_run(preset_name)
    from ray_jobs.training import cluster_gpu
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    gpu = cluster_gpu()
    return plan_run(preset_name, gpu_memory_gb=gpu["memory_bytes"] / 2**30 + 1.0, gpus_per_node=int(nodes[0]["Resources"]["GPU"]),
                    nodes=len(nodes))


def plan_markdown(plan):
    from ray_jobs.plan import markdown
    return markdown(plan)


def run_script_phase(phases, name, module, flags, resumable=False):
    """A phase whose script starts its own Ray Train run or Ray tasks from this driver. A Train phase
    that crashed half-way left checkpoints: --resume makes it continue from them. A run stopped on
    request (SIGTERM: `ray job stop`, a spot node going away) is not complete: the driver exits
    without marking it, and the next run resumes it from the checkpoint it wrote."""
    def run():
        args = module.parser.parse_args(flags + (["--resume"] if resumable else []))
        result = module.main(args)
        if result.get("status") == "stopped":
            raise SystemExit(f"phase {name} stopped at step {result.get('step')} on request; its checkpoint is kept: "
                             "run the same command again to resume")
        return module.report_section(dict(result), args)
    return phases.run(name, run)[0]


def main(args):
    log = setup_logging()
    from nanochat.report import get_report
    from ray_jobs.common import PhaseLog, check_shared_storage, init_ray, run_task
    t0 = time.time()
    if args.storage:  # before Ray starts: every task and worker inherits the base dir through project_env()
        os.environ["NANOCHAT_BASE_DIR"] = args.storage
    resources = init_ray(args.num_cpus)
    check_shared_storage(get_base_dir())  # on several nodes, before any phase writes there
    preset_name = pick_preset(args.preset, resources)
    preset = SimpleNamespace(**PRESETS[preset_name])
    run_dir = get_base_dir() / "runs" / args.run
    report = get_report(run_dir / "report")
    phases = PhaseLog(run_dir / "phases", on_complete=report.log)
    if args.restart:
        for marker in (run_dir / "phases").glob("*.done"):
            marker.unlink()
        report.reset()
    log.info("speedrun %r, preset %s, base dir %s", args.run, preset_name, get_base_dir())
    plan = make_plan(preset_name, resources)  # before anything runs: a plan that cannot fit stops here
    report.log("plan", {"table": plan_markdown(plan)})
    log.info("plan:\n%s", plan_markdown(plan))

    def phase(name, fn, *fn_args, **task_options):
        return phases.run(name, run_task, fn, *fn_args, name=name, **task_options)[0]

    def script_phase(name, module, flags, resumable=False):
        return run_script_phase(phases, name, module, flags, resumable)

    phase("download", phase_download, preset.num_shards, plan)
    phase("tok_train", phase_tok_train, preset.tok_max_chars, preset.vocab_size)
    phase("tok_eval", phase_tok_eval)
    from ray_jobs import base_eval, base_train, chat_eval, chat_sft, mid_train
    resumable = not args.restart
    script_phase("base_train", base_train, preset.base_train, resumable)
    script_phase("base_eval", base_eval, preset.base_eval)
    script_phase("mid_train", mid_train, preset.mid_train, resumable)
    script_phase("chat_eval_mid", chat_eval, preset.chat_eval + ["--phase", "mid"])
    script_phase("chat_sft", chat_sft, preset.chat_sft, resumable)
    script_phase("chat_eval_sft", chat_eval, preset.chat_eval + ["--phase", "sft"])
    if not args.no_rl:
        from ray_jobs import chat_rl
        script_phase("chat_rl", chat_rl, preset.chat_rl, resumable)
        script_phase("chat_eval_rl", chat_eval, preset.chat_eval + ["--phase", "rl"])

    path = report.generate()
    summary = {"preset": preset_name, "report": str(path), "wall_seconds": round(time.time() - t0, 1)}
    log.info("speedrun done: report at %s", path)
    return summary


if __name__ == "__main__":
    from nanochat.common import one_line_errors
    args = parser.parse_args()
    with one_line_errors("speedrun"):  # a phase's bad input (a NanochatError, here or in a Ray worker): one line
        print(json.dumps(main(args)))
