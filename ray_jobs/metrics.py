"""Live numbers for the Ray dashboard: training, data, RL and serving metrics through Ray's own metrics
system (ray.util.metrics). Every node's metrics agent exports them for Prometheus (names get Ray's `ray_`
prefix: nanochat_train_loss -> ray_nanochat_train_loss); the Ray dashboard shows them through Grafana, with
the panels of monitoring/grafana_nanochat.json (see the README's "Watch it").

Every metric is defined here, once (METRICS: name -> kind, description, tag keys). Updates are a few per
optimizer step or per request, never per token: a decode step or a training step costs milliseconds, a
metric update microseconds. Outside a Ray worker or driver (a plain script, a unit test), or with
NANOCHAT_METRICS=0 in the process's environment, updates do nothing. `--wandb` runs log the same names
(without the prefix) to Weights & Biases.
"""
import os
import time

METRICS_ENV = "NANOCHAT_METRICS"  # "0": no metrics from this process (the benches measure their cost so)

# name: (kind, description, tag keys[, histogram boundaries])
RUN_TAGS = ("phase", "run", "rank")
LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
METRICS = {
    # training (every phase); global numbers from rank 0, per-rank times from every rank
    "nanochat_train_loss": ("gauge", "training loss (debiased EMA, as logged)", RUN_TAGS),
    "nanochat_train_lr_mult": ("gauge", "learning-rate multiplier of the schedule", RUN_TAGS),
    "nanochat_train_tokens_per_s": ("gauge", "tokens trained per second, all workers", RUN_TAGS),
    "nanochat_train_mfu": ("gauge", "model FLOPs utilization (0-1) where the GPU's peak is known", RUN_TAGS),
    "nanochat_train_step_seconds": ("gauge", "wall time of the last optimizer step, per rank", RUN_TAGS),
    "nanochat_train_data_wait_seconds": ("gauge", "time the last step waited for its batches, per rank", RUN_TAGS),
    "nanochat_train_val_metric": ("gauge", "the phase's validation metric (val bpb, or its loss)", RUN_TAGS),
    "nanochat_train_step": ("gauge", "optimizer steps done", RUN_TAGS),
    "nanochat_train_tokens_total": ("counter", "tokens trained (loss tokens, all workers)", RUN_TAGS),
    "nanochat_train_restarts_total": ("counter", "(re)starts of the training loop after the first", RUN_TAGS),
    # data pipeline (Ray Data tokenizer pool feeding the trainers)
    "nanochat_data_tokens_per_s": ("gauge", "tokens per second out of the tokenizer pool, per trainer rank", RUN_TAGS),
    "nanochat_data_rows_buffered": ("gauge", "packed rows buffered ahead of the trainer, per rank", RUN_TAGS),
    # RL
    "nanochat_rl_mean_reward": ("gauge", "mean reward of the step's rollouts", RUN_TAGS),
    "nanochat_rl_pass_at_k": ("gauge", "pass@k on the held-out problems at the last eval", RUN_TAGS + ("k",)),
    "nanochat_rl_samples_per_s": ("gauge", "rollout samples per second of the actor pool", RUN_TAGS),
    "nanochat_rl_sync_seconds": ("gauge", "seconds the last weight sync to the actors took", RUN_TAGS),
    "nanochat_rl_rollouts_refused_total": ("counter", "rollouts refused as stale", RUN_TAGS),
    "nanochat_rl_actors_replaced_total": ("counter", "rollout actors replaced after a loss", RUN_TAGS),
    # serving, per replica (the engine) and per ingress (the HTTP API)
    "nanochat_serve_ttft_seconds": ("histogram", "time to first token, from the request reaching a replica",
                                    ("replica",), LATENCY_S),
    "nanochat_serve_time_per_output_token_seconds": ("histogram", "a request's mean time between its tokens "
                                                     "(one observation per request)", ("replica",), LATENCY_S),
    "nanochat_serve_tokens_total": ("counter", "tokens generated", ("replica",)),
    "nanochat_serve_queue_depth": ("gauge", "requests waiting for a batch slot", ("replica",)),
    "nanochat_serve_active_slots": ("gauge", "batch slots decoding", ("replica",)),
    "nanochat_serve_kv_slots_used": ("gauge", "KV-cache slots holding a sequence (prefilling or decoding)", ("replica",)),
    "nanochat_serve_prefix_cache_hit_rate": ("gauge", "prompt tokens served from the prefix cache / looked up",
                                             ("replica",)),
    "nanochat_serve_requests_total": ("counter", "chat completion requests by outcome: ok, 4xx, 5xx, cancelled, "
                                      "timed_out", ("outcome",)),
}
_made = {}


def _ray_ready():
    try:
        import ray
        return ray.is_initialized()
    except ImportError:
        return False


def metric(name):
    """The ray.util.metrics object of METRICS[name] (made once per process), or None outside Ray."""
    if name not in _made:
        if os.environ.get(METRICS_ENV) == "0" or not _ray_ready():
            return None
        from ray.util import metrics
        kind, description, tags, *rest = METRICS[name]
        if kind == "histogram":
            _made[name] = metrics.Histogram(name, description=description, boundaries=rest[0], tag_keys=tags)
        else:
            _made[name] = (metrics.Gauge if kind == "gauge" else metrics.Counter)(name, description=description, tag_keys=tags)
    return _made[name]


def record(name, value, **tags):
    """Set a gauge, add to a counter (value > 0) or observe a histogram; tags as strings. No-op outside Ray."""
    m = metric(name)
    if m is None:
        return
    tags = {k: str(v) for k, v in tags.items()}
    kind = METRICS[name][0]
    if kind == "gauge":
        m.set(value, tags=tags)
    elif kind == "counter":
        if value > 0:
            m.inc(value, tags=tags)
    else:
        m.observe(value, tags=tags)


def short_name(name):
    """The name --wandb logs: nanochat_train_loss -> train/loss."""
    group, _, rest = name.removeprefix("nanochat_").partition("_")
    return f"{group}/{rest}"


class RunMetrics:
    """A phase's numbers, tagged with its phase, run (tag) and rank; logged to wandb too when given a run."""

    def __init__(self, phase, run, rank, wandb_run=None):
        self.tags, self.rank, self.wandb_run = dict(phase=phase, run=run, rank=rank), rank, wandb_run

    def log(self, step=None, **values):
        """values: METRICS names without 'nanochat_' (train_loss=..., rl_mean_reward=...); None values skipped."""
        values = {f"nanochat_{k}": v for k, v in values.items() if v is not None}
        for name, value in values.items():
            record(name, value, **self.tags)
        logged = {short_name(n): v for n, v in values.items() if METRICS[n][0] != "counter"}
        if self.wandb_run is not None and logged:
            self.wandb_run.log(logged, step=step)


class Stopwatch:
    """Accumulates the seconds spent inside `with watch:` blocks (e.g. waiting for data within a step)."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self.t0

    def take(self):
        seconds, self.seconds = self.seconds, 0.0
        return seconds
