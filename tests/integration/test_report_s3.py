"""`report` and `status` on a run whose home is on S3 (a real moto server), read through the store."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from gptoss_cloud.main import app
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import join, open_store

RUN = "s3run-20261202-060000-abcd"


def test_report_reads_an_s3_home(tmp_path, s3_bucket):
    st = open_store(join(s3_bucket, RUN))
    st.write_bytes("spec.yaml", RunSpec.model_validate({"name": "s3run"}).to_yaml().encode())
    rows = [{"step": s, "loss": 3.0 / s, "lr": 1e-4, "tokens_per_s": 100.0} for s in range(1, 11)]
    rows.append({"event": "checkpoint", "step": 10, "mode": "sync", "blocking_s": 2.0, "total_s": 2.0, "bytes": 1024})
    st.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    st.write_bytes("summary.json", json.dumps({"steps": 10, "final_loss": 0.3}).encode())
    out = tmp_path / "s3.html"
    r = CliRunner().invoke(app, ["report", RUN, "--store", s3_bucket, "--out", str(out)])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert f"home: <code>{join(s3_bucket, RUN)}</code>" in page and page.count("data:image/png;base64,") == 4
    assert sorted(p.name for p in tmp_path.glob("s3-*.png")) == ["s3-checkpoints.png", "s3-loss.png", "s3-lr.png", "s3-throughput.png"]
    r = CliRunner().invoke(app, ["status", RUN, "--store", s3_bucket])
    assert r.exit_code == 0, r.output
    assert "  loss: █▄▃▂▂▂▁▁▁▁  3 -> 0.3 (steps 1-10)" in r.stdout
