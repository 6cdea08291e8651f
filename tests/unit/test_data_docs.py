"""docs/data.md stays true: every example row is valid, the shown mask is what preview prints, and each
other dataset shape tokenizes or is refused as shown."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from typer.testing import CliRunner

from gptoss_cloud.main import app
from gptoss_cloud.contract.sections import DataSection
from gptoss_cloud.trainer.data.harmony import tokenize_row

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "data.md"
SHAPES_HEADING = "\n## Other dataset shapes\n"


class _Part:
    """One part of docs/data.md: the row format (before "Other dataset shapes") or the shapes (from it on)."""

    def __init__(self, shapes: bool):
        self.shapes = shapes

    def read_text(self) -> str:
        text = PAGE.read_text()
        cut = text.index(SHAPES_HEADING)
        return text[cut:] if self.shapes else text[:cut]


DOC = _Part(shapes=False)


def test_every_example_row_tokenizes():
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 7
    for b in blocks:
        seqs = tokenize_row(json.loads(b), DataSection())
        assert seqs and all(s.trained for s in seqs)


def test_shown_mask_matches_preview(tmp_path):
    shown = re.search(r"```text\n(.*?)\n```", DOC.read_text(), re.S).group(1)
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "Is 91 prime?"},
                                          {"role": "assistant", "thinking": "91 / 7 = 13.", "content": "No: 91 = 7 x 13."}]}) + "\n")
    r = CliRunner().invoke(app, ["data", "preview", str(p), "-n", "1"])
    assert r.exit_code == 0, r.output
    assert shown in r.output


# ------------------------------------------------------------ docs/data.md, "Other dataset shapes"
SHAPES = _Part(shapes=True)


def _subsections() -> list[tuple[str, str]]:
    parts = re.split(r"^### (.+)$", SHAPES.read_text(), flags=re.M)
    return list(zip(parts[1::2], parts[2::2]))


def test_every_shape_example_tokenizes_or_is_refused_as_shown():
    import yaml

    from gptoss_cloud.contract.sections import DatasetSource
    from gptoss_cloud.trainer.data.rows import RowError

    accepted = refused = 0
    for title, body in _subsections():
        src = DatasetSource(path="d.jsonl")
        for info, block in re.findall(r"```(json refused|json|yaml|text)\n(.*?)```", body, re.S):
            if info == "yaml":
                data = DataSection(**yaml.safe_load(block)["data"])  # every spec snippet is a valid data section
                if "datasets" in block:
                    src = data.datasets[0].model_copy(update={"path": "d.jsonl"})
            elif info == "json":
                seqs = tokenize_row(json.loads(block), DataSection(), source=src)
                assert seqs and all(s.trained for s in seqs), title
                accepted += 1
            elif info == "json refused":
                with pytest.raises(RowError) as e:
                    tokenize_row(json.loads(block), DataSection(), source=src)
                shown = re.search(r"```json refused\n.*?```\n\n```text\n(.*?)\n```", body, re.S).group(1)
                assert e.value.message == shown, title
                refused += 1
    assert accepted >= 6 and refused >= 1


def test_the_counted_kinds_are_the_ones_listed():
    from gptoss_cloud.trainer.data.notes import KINDS

    table = SHAPES.read_text().split("### What is counted")[1]
    listed = re.findall(r"^\| (converted|dropped|defaulted) \| (.+) \|$", table, re.M)
    assert listed == list(KINDS.values())


def test_the_format_points_at_the_shapes_and_the_readme_at_the_page():
    assert "(#other-dataset-shapes)" in DOC.read_text()
    assert "(docs/data.md)" in (ROOT / "README.md").read_text()


def test_every_documented_shape_through_data_preview_in_a_fresh_process(tmp_path):
    """What `gptoss-cloud data preview --spec` does with the page's rows, each source with its own options."""
    import os
    import subprocess
    import sys

    import yaml

    sources = []
    for n, (title, body) in enumerate(_subsections()):
        opts: dict = {}  # a spec snippet with datasets applies to the rows shown after it
        for k, (info, block) in enumerate(re.findall(r"```(json|yaml)\n(.*?)```", body, re.S)):
            if info == "yaml" and "datasets" in block:
                opts = yaml.safe_load(block)["data"]["datasets"][0]
            elif info == "json":
                p = tmp_path / f"{n}-{k}.jsonl"
                p.write_text(json.dumps(json.loads(block)) + "\n")
                sources.append({**opts, "path": str(p)})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"data": {"datasets": sources, "max_seq_len": 1024}}))
    r = subprocess.run([sys.executable, "-m", "gptoss_cloud", "data", "preview", "--spec", str(spec), "-n", "0"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert r.returncode == 0, r.stderr
    assert re.search(rf"│ rows +│ +{len(sources)} │", r.stdout) and re.search(r"│ skipped rows +│ +0 │", r.stdout)
    for what in ("legacy function calling", "bare property map", "the call that ends a conversation"):
        assert what in r.stdout
