"""docs/tracking.md stays true: its trackers, plots and extras are the code's."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from gptoss_cloud.report.plots import PLOTS
from gptoss_cloud.contract.sections import OutputSection
from gptoss_cloud.trainer.tracking import BACKENDS

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "tracking.md").read_text()


def test_every_tracker_is_documented_with_its_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    allowed = OutputSection.model_fields["report_to"].annotation.__args__[0].__args__
    assert set(allowed) == set(BACKENDS)
    for name in BACKENDS:
        assert f"pip install 'gptoss-cloud[{name}]'" in DOC and name in extras
    assert "pip install 'gptoss-cloud[report]'" in DOC and "report" in extras


def test_the_plot_table_lists_every_plot():
    table = re.findall(r"^\| `(\w+)` \|", DOC.split("| plot | from |")[1].split("\n\n")[0], re.M)
    assert table == [name for name, *_ in PLOTS]


def test_the_eval_check_table_lists_every_check():
    from gptoss_cloud.trainer.evaluation.checks import CHECKS

    table = re.findall(r"^\| `(\w+)` \|", DOC.split("| check | passes when |")[1].split("\n\n")[0], re.M)
    assert table == [*CHECKS, "format_valid"]
