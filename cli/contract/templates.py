"""Dataset URIs that name the tick's data: ``s3://bucket/data/{date}/`` trains on that day's folder.

A recurring run reads new data each tick. The placeholders are filled once, when the run is
submitted, from the run's start time (UTC, the time in its run id), and the run's resolved
``spec.yaml`` holds the expanded URIs: what a run trained on is written down, and a resumed attempt
reads the same data as the first one.

    {date}       2026-12-02        the tick's day
    {yesterday}  2026-12-01        the day before (a 03:00 tick training on the day that ended)
    {hour}       03                the tick's hour
    {tick}       20261202-030000   the tick's time, as in the run id
    {name}       the spec's name

Braces in a dataset path are always placeholders (no escape for a literal brace: an expanded spec
must read back as plain paths). Any other ``{...}`` is an error naming the field, at load time, so a
typo never reaches a pod as a literal folder name.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

PLACEHOLDERS = ("date", "yesterday", "hour", "tick", "name")
_FIELD = re.compile(r"\{([^{}]*)\}|[{}]")


class TemplateError(ValueError):
    """A template with an unknown placeholder or an unpaired brace."""


def placeholders(text: str, where: str = "") -> list[str]:
    """The placeholders ``text`` uses; TemplateError naming ``where`` (the field) for an unknown one or a stray brace."""
    at = f"{where}: " if where else ""
    found = []
    for m in _FIELD.finditer(text):
        tok = m.group(0)
        if tok in ("{", "}"):
            raise TemplateError(f"{at}unpaired {tok!r} in {text!r}")
        name = m.group(1)
        if name not in PLACEHOLDERS:
            raise TemplateError(f"{at}unknown placeholder {{{name}}} in {text!r}; "
                                f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
        found.append(name)
    return found


def values(at: datetime, name: str) -> dict[str, str]:
    at = at.astimezone(timezone.utc)
    return {"date": at.strftime("%Y-%m-%d"), "yesterday": (at - timedelta(days=1)).strftime("%Y-%m-%d"),
            "hour": at.strftime("%H"), "tick": at.strftime("%Y%m%d-%H%M%S"), "name": name}


def expand(text: str, at: datetime, name: str, where: str) -> str:
    placeholders(text, where)
    vals = values(at, name)

    return _FIELD.sub(lambda m: vals[m.group(1)], text)


def has_template(text: str) -> bool:
    return "{" in text or "}" in text


def expand_spec(spec, at: datetime):
    """``spec`` with every dataset path expanded for a run started ``at``; unchanged when none is a template."""
    data = spec.data
    datasets = [d.model_copy(update={"path": expand(d.path, at, spec.name, f"data.datasets[{i}].path")})
                for i, d in enumerate(data.datasets)]
    update = {"datasets": datasets}
    if hasattr(data.validation, "path"):
        update["validation"] = data.validation.model_copy(
            update={"path": expand(data.validation.path, at, spec.name, "data.validation.path")})
    return spec.model_copy(update={"data": data.model_copy(update=update)})


_STAMP = re.compile(r"-(\d{8}-\d{6})-[0-9a-f]{4}$")


def run_time(run_id: str) -> datetime:
    """When a run started, from its id (``<name>-<yyyymmdd>-<hhmmss>-<hex>``, UTC)."""
    m = _STAMP.search(run_id)
    if not m:
        raise TemplateError(f"run id {run_id!r} carries no start time to expand dataset templates with")
    return datetime.strptime(m.group(1), "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)


def expand_for_run(spec, run_id: str):
    """The spec a run trains with: templates filled from the run's start time (a resumed attempt gets
    the first attempt's data). A spec without templates comes back unchanged."""
    if not spec_templates(spec):
        return spec
    return expand_spec(spec, run_time(run_id))


def spec_templates(spec) -> list[str]:
    """Where ``spec`` still holds templates (field names), for commands that cannot expand them."""
    out = [f"data.datasets[{i}].path" for i, d in enumerate(spec.data.datasets) if has_template(d.path)]
    if hasattr(spec.data.validation, "path") and has_template(spec.data.validation.path):
        out.append("data.validation.path")
    return out
