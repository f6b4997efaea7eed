"""nanochat.report: report.md from recorded phase results, summary table, plots."""
from nanochat.report import Report, summary_table


def test_report_from_recorded_phases(tmp_path):
    report = Report(tmp_path / "report")
    report.log("tok_train", {"settings": {"vocab_size": 1024}, "results": {"train_seconds": 1.5}, "wall_seconds": 2})
    report.log("base_train", {
        "settings": {"depth": 2}, "results": {"final_loss": 3.25, "val_bpb": 1.7}, "wall_seconds": 100, "gpu_hours": 0.5,
        "curves": {"loss": {"x": [1, 2, 3], "y": [5.0, 4.0, 3.25], "ylabel": "loss"},
                   "val_bpb": {"x": [0, 3], "y": [2.1, 1.7], "ylabel": "bpb"}},
    })
    report.log("base_eval", {"results": {"CORE": 0.0123, "val_bpb_packed": 1.5, "val_bpb_nanochat": 1.625},
                             "definitions": {"CORE": "nanochat's CORE", "val_bpb_nanochat": "as nanochat's seed"}})
    report.log("chat_eval_sft", {"results": {"ARC-Easy": 0.26, "GSM8K": 0.0, "ChatCORE": 0.01},
                                 "definitions": {"ChatCORE": "nanochat's five tasks"}})
    path = report.generate(gpu_hour_usd=2.0)
    text = path.read_text()
    assert "## Environment" in text and "git commit" in text and "torch" in text
    assert "estimated cost $1.00" in text  # 0.5 GPU hours at $2
    assert "total wall time: 1m42.0s" in text
    # sections in pipeline order, with settings and results
    assert text.index("## tok_train") < text.index("## base_train") < text.index("## base_eval")
    assert "- final_loss: 3.25" in text
    # plots are real PNGs, embedded in the markdown
    for name in ("base_train_loss", "base_train_val_bpb"):
        png = tmp_path / "report" / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name}.png)" in text
    # the summary table: CORE for base, chat metrics per stage, '-' where not measured
    assert "| CORE | 0.0123 | - | - | - |" in text
    assert "| ARC-Easy | - | - | 0.2600 | - |" in text
    assert "| ChatCORE | - | - | 0.0100 | - |" in text
    assert "| val_bpb_packed | 1.5000 | - | - | - |" in text and "| val_bpb_nanochat | 1.6250 | - | - | - |" in text
    # what each number follows: under the summary, and in its section
    summary = text[text.index("## Summary"):text.index("## tok_train")]
    assert "- CORE: nanochat's CORE" in summary and "- ChatCORE: nanochat's five tasks" in summary
    assert "- val_bpb_nanochat: as nanochat's seed" in summary and "- val_bpb (base_train): bits per byte on the packed" in summary
    assert "**definitions**" in text[text.index("## base_eval"):]


def test_summary_table_empty():
    rows = summary_table({})
    assert rows[0] == "| metric | base | mid | sft | rl |"
    assert all(r.endswith("| - | - | - | - |") for r in rows[2:])


def test_log_replaces_section_and_reset(tmp_path):
    report = Report(tmp_path)
    report.log("base_eval", {"results": {"CORE": 0.1}})
    report.log("base_eval", {"results": {"CORE": 0.2}})
    assert report.sections()["base_eval"]["results"]["CORE"] == 0.2
    report.reset()
    assert report.sections() == {}
