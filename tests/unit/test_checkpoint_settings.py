"""The checkpoint section's fault bounds: defaults, refused values, and where they reach the store."""

from __future__ import annotations

import json

import pytest
from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.contract.spec import RunSpec, spec_from_yaml_text
from gptoss_cloud.contract.store.objects import S3Store, open_store
from gptoss_cloud.contract.store.retry import DEFAULT_RETRY_S


def test_defaults_are_minutes_not_half_hours():
    ck = RunSpec().checkpoint
    assert ck.peer_timeout_s == 300 and ck.store_retry_s == 180 == DEFAULT_RETRY_S


@pytest.mark.parametrize("field,bad", [("peer_timeout_s", 0), ("peer_timeout_s", -5), ("peer_timeout_s", 1e9),
                                       ("store_retry_s", -1), ("store_retry_s", "soon")])
def test_bad_values_name_the_field(field, bad):
    with pytest.raises(SpecError, match=field):
        spec_from_yaml_text(json.dumps({"checkpoint": {field: bad}}), "spec.yaml")


def test_retry_budget_reaches_every_child_store():
    st = open_store("s3://bucket/runs", retry_s=7)
    assert isinstance(st, S3Store) and st.retry_s == 7
    assert st.child("r1").child("checkpoints").retry_s == 7
    assert open_store("s3://bucket/runs").retry_s == DEFAULT_RETRY_S
