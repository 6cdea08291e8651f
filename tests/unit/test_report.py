"""`report RUN` and `status`'s loss sparkline, on run homes written in the trainer's record shapes."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptoss_cloud.main import app
from gptoss_cloud.report.html import series
from gptoss_cloud.report.sparkline import loss_line, sparkline
from gptoss_cloud.contract.spec import RunSpec

RUN = "demo-20261202-060000-abcd"


def gpu_run(store: Path, *, steps: int = 200, hostile: bool = False) -> Path:
    """A finished local run home as an 8-GPU run leaves it: step records every 5 steps, eval every 50,
    checkpoints every 100, the merge event and summary.json."""
    home = store / RUN
    home.mkdir(parents=True)
    (home / "spec.yaml").write_text(RunSpec.model_validate({"name": "demo", "optim": {"max_steps": steps}}).to_yaml())
    lines = []
    for step in range(5, steps + 1, 5):
        rec = {"step": step, "loss": 2.0 * math.exp(-step / 80) + 0.5, "lr": 2e-4 * (0.5 + 0.5 * math.cos(math.pi * step / steps)),
               "grad_norm": 1.0, "tokens": step * 4096, "tokens_per_s": 50_000.0 + step, "tokens_per_s_per_gpu": 6_250.0,
               "mfu": 0.31, "mem_allocated_gib": 61.5, "mem_reserved_gib": 70.25, "epoch": step / steps}
        if step % 50 == 0:
            rec["eval_loss"] = rec["loss"] + 0.1
        lines.append(json.dumps(rec))
        if step % 100 == 0:
            lines.append(json.dumps({"event": "checkpoint", "step": step, "mode": "async", "blocking_s": 1.5, "total_s": 40.0,
                                     "bytes": 3 * 2**30, "upload_s": 30.0}))
    lines.append(json.dumps({"event": "merge", "step": steps, "wall_s": 120.0, "bytes_written": 13 * 2**30, "peak_rss_gib": 2.0}))
    if hostile:  # what a corrupted or tampered file may hold: none of it may break or inject into the page
        lines += ['{"step": "<script>alert(1)</script>", "loss": 1}', '{"step": 7, "loss": "NaN"}', "not json at all",
                  json.dumps({"step": 210, "loss": float("nan")}).replace("NaN", "Infinity"), '{"step": true, "loss": 9}',
                  json.dumps({"event": "checkpoint", "step": None, "total_s": 1}),
                  json.dumps({"event": "checkpoint", "step": 150, "mode": "<b>x</b>", "total_s": "slow"})]
    (home / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = {"run_id": RUN, "steps": steps, "final_loss": 0.6, "eval_loss": 0.7, "method": "lora",
               "output": "<img src=x onerror=alert(1)>" if hostile else str(home / "adapter"), "state": "succeeded"}
    (home / "summary.json").write_text(json.dumps(summary))
    return home


def pngs_in(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


def test_report_writes_one_self_contained_page_and_the_pngs_beside_it(tmp_path):
    gpu_run(tmp_path / "store")
    out = tmp_path / "out" / "r.html"
    r = CliRunner().invoke(app, ["report", RUN, "--store", str(tmp_path / "store"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    embedded = pngs_in(page)
    names = ["loss", "lr", "throughput", "mfu", "memory", "checkpoints"]
    assert len(embedded) == len(names)
    for name, data in zip(names, embedded):
        beside = out.with_name(f"r-{name}.png")
        assert beside.read_bytes() == data and png_size(data) == (800, 320), name
    assert "http" not in page.replace(str(tmp_path), "")  # nothing to fetch: readable offline
    assert "<h2>Evaluations</h2>" not in page  # no eval events in this run
    assert re.search(r"<td>100</td><td>async</td><td>1.5</td><td>40</td><td>3</td>", page)  # checkpoint table
    assert "final_loss</td><td>0.6" in page and "wall_s</td><td>120" in page
    assert f"wrote {out} and 6 PNG(s) beside it" in r.output


def test_a_cpu_run_says_what_it_did_not_record_instead_of_drawing_it(tmp_path):
    home = gpu_run(tmp_path)
    rows = [json.loads(line) for line in (home / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "event" not in row:
            row.update(mfu=None, mem_allocated_gib=None, mem_reserved_gib=None)
    (home / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cpu.html"
    r = CliRunner().invoke(app, ["report", str(home), "--out", str(out)])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert len(pngs_in(page)) == 4 and not out.with_name("cpu-memory.png").exists()
    assert "not recorded: the run did not train on a GPU" in page and "not recorded: MFU needs a GPU" in page


def test_untrusted_records_are_skipped_and_every_text_is_escaped(tmp_path):
    gpu_run(tmp_path / "store", hostile=True)
    out = tmp_path / "r.html"
    r = CliRunner().invoke(app, ["report", RUN, "--store", str(tmp_path / "store"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert "<script>" not in page and "<img src=x" not in page and "<b>x</b>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "3 record(s) of metrics.jsonl had no usable step" in page  # the string, bool and None steps


def test_series_keeps_only_finite_numbers_at_whole_steps():
    s = series([{"step": 2, "loss": 1.0, "lr": "high"}, {"step": 1, "loss": float("inf"), "eval_loss": 3.0},
                {"step": -1, "loss": 1.0}, {"step": 3.0, "loss": 1.0}],
               [{"event": "checkpoint", "step": 2, "total_s": "x", "blocking_s": 0.5}, {"event": "other", "step": 1}])
    assert s.steps == [{"step": 2, "loss": 1.0}]
    assert s.evals == [(1, 3.0)]
    assert s.checkpoints == [{"step": 2, "blocking_s": 0.5}]
    assert s.ignored == 3


def test_a_run_without_metrics_is_one_clear_error(tmp_path):
    home = tmp_path / RUN
    home.mkdir()
    (home / "spec.yaml").write_text(RunSpec().to_yaml())
    r = CliRunner().invoke(app, ["report", str(home), "--out", str(tmp_path / "x.html")])
    assert r.exit_code != 0
    assert "has no metrics yet" in str(r.exception.message) and not (tmp_path / "x.html").exists()


def test_a_missing_run_names_where_it_looked(tmp_path):
    r = CliRunner().invoke(app, ["report", "nope", "--store", str(tmp_path)])
    assert r.exit_code != 0 and f"no spec.yaml under {tmp_path}/nope" in r.exception.message


@pytest.mark.parametrize("values, line", [
    ([3, 2, 1], "█▅▁"),
    ([1, 1, 1], "▁▁▁"),
    ([], ""),
    ([1, float("nan"), 2], "▁█"),
])
def test_sparkline(values, line):
    assert sparkline(values) == line


def test_sparkline_buckets_long_series_to_its_width():
    line = sparkline(list(range(1000, 0, -1)), width=10)
    assert len(line) == 10 and line[0] == "█" and line[-1] == "▁"
    assert list(line) == sorted(line, reverse=True)


def test_status_shows_the_loss_sparkline(tmp_path):
    gpu_run(tmp_path)
    r = CliRunner().invoke(app, ["status", RUN, "--store", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("  loss: ")]
    spark = line.split()[1]
    assert len(spark) == 30 and spark[0] == "█" and spark[-1] == "▁"
    assert line.endswith("2.379 -> 0.6642 (steps 5-200)")
    assert loss_line([{"step": 1, "loss": "x"}]) == ""
