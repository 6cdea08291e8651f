"""The README's data section: every example row is valid, and the shown mask is what preview prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from gptoss_cloud.main import app
from gptoss_cloud.spec import DataSection
from gptoss_cloud.trainer.data.harmony import tokenize_row

README = Path(__file__).resolve().parents[2] / "README.md"


class _Section:
    """The README's `## Data` section, up to the next second-level heading."""

    def read_text(self) -> str:
        text = README.read_text()
        start = text.index("\n## Data\n")
        end = text.find("\n## ", start + 1)
        return text[start:end if end != -1 else None]


DOC = _Section()


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
