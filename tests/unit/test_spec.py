import pytest
import yaml

from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.contract.spec import SPEC_VERSION, RunSpec, load_spec
from gptoss_cloud.starter import STARTER_SPEC


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_defaults_without_any_file(tmp_path):
    s = load_spec(None, environ={}, user_config=tmp_path / "none.yaml")
    assert s == RunSpec()
    assert s.cluster.backend == "local" and s.output.store == "./runs"


def test_precedence_flag_env_file_user_default(tmp_path):
    user = write(tmp_path, "user.yaml", {"cluster": {"backend": "k8s", "namespace": "ml"}, "output": {"store": "s3://u/p"}})
    spec = write(tmp_path, "spec.yaml", {"cluster": {"namespace": "team"}, "model": {"name": "20b"}})
    s = load_spec(spec, environ={}, user_config=user)
    assert (s.cluster.backend, s.cluster.namespace, s.output.store) == ("k8s", "team", "s3://u/p")
    s = load_spec(spec, environ={"GPTOSS_NAMESPACE": "envns", "GPTOSS_OPTIM__LR": "1e-5"}, user_config=user)
    assert s.cluster.namespace == "envns" and s.optim.lr == 1e-5
    s = load_spec(spec, overrides={"cluster.namespace": "flagns", "model.name": None}, environ={"GPTOSS_NAMESPACE": "envns"}, user_config=user)
    assert s.cluster.namespace == "flagns" and s.model.name == "20b"


def test_unknown_key_is_an_error_naming_the_field(tmp_path):
    spec = write(tmp_path, "spec.yaml", {"optim": {"learning_rate": 1e-4}})
    with pytest.raises(SpecError) as e:
        load_spec(spec, environ={}, user_config=tmp_path / "none")
    assert "optim.learning_rate" in str(e.value) and "unknown key" in str(e.value)


def test_bad_literal_names_allowed_values(tmp_path):
    spec = write(tmp_path, "spec.yaml", {"method": {"kind": "qlora"}})
    with pytest.raises(SpecError) as e:
        load_spec(spec, environ={}, user_config=tmp_path / "none")
    msg = str(e.value)
    assert "method.kind" in msg and "'lora'" in msg and "'full'" in msg and "qlora" in msg


def test_lora_rank_must_be_positive(tmp_path):
    spec = write(tmp_path, "spec.yaml", {"method": {"lora": {"r": 0}}})
    with pytest.raises(SpecError, match=r"method\.lora\.r"):
        load_spec(spec, environ={}, user_config=tmp_path / "none")


def test_newer_spec_version_is_refused(tmp_path):
    spec = write(tmp_path, "spec.yaml", {"version": SPEC_VERSION + 1})
    with pytest.raises(SpecError, match="newer than this gptoss-cloud understands"):
        load_spec(spec, environ={}, user_config=tmp_path / "none")


def test_yaml_syntax_error_names_line(tmp_path):
    spec = write(tmp_path, "spec.yaml", "model:\n  name: [20b\n")
    with pytest.raises(SpecError, match=r"spec\.yaml:\d+:\d+"):
        load_spec(spec, environ={}, user_config=tmp_path / "none")


def test_starter_spec_loads_and_round_trips(tmp_path):
    spec = write(tmp_path, "spec.yaml", STARTER_SPEC)
    s = load_spec(spec, environ={}, user_config=tmp_path / "none")
    assert s.model.name == "20b" and s.output.merge is True
    again = RunSpec.model_validate(yaml.safe_load(s.to_yaml()))
    assert again == s
