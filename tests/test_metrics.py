"""The metrics table and the Grafana dashboard shipped for it (no Ray here: the scrapes that check the values
live with the runs that produce them, in test_base_train, test_chat_rl and test_serve)."""
import json

from conftest import DASHBOARD, dashboard_metrics
from ray_jobs.metrics import METRICS, RunMetrics, record, short_name


def test_dashboard_queries_exactly_the_metrics_the_code_defines():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])  # Grafana needs unique ids
    assert all(p["targets"] and p["title"] and p["datasource"]["uid"] == "${datasource}" for p in panels)
    assert all(t["expr"] and t["refId"] for p in panels for t in p["targets"])
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "phase", "run"} <= variables
    assert dashboard_metrics() == set(METRICS)  # every metric has a panel, every panel a defined metric
    for p in panels:  # a histogram is read through its buckets, a counter as a sum or a rate
        for t in p["targets"]:
            for name, (kind, *_) in METRICS.items():
                if f"ray_{name}" in t["expr"] and kind == "histogram":
                    assert "histogram_quantile" in t["expr"] and f"ray_{name}_bucket" in t["expr"], t["expr"]


def test_outside_ray_updates_do_nothing_and_wandb_gets_the_short_names():
    record("nanochat_train_loss", 1.0, phase="base", run="x", rank=0)  # no Ray in this process: a no-op, no error
    logged = []

    class FakeWandb:  # stands in for a Weights & Biases run (no account here)
        def log(self, data, step=None):
            logged.append((data, step))
    RunMetrics("base", "x", 0, FakeWandb()).log(7, train_loss=2.5, train_tokens_total=100, train_mfu=None)
    assert logged == [({"train/loss": 2.5}, 7)]  # counters and missing values are not logged
    assert short_name("nanochat_serve_ttft_seconds") == "serve/ttft_seconds"
