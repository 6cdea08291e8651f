"""Benchmark suites: the suite file, the runner, the trainer-run steps, and docs/benchmarks.md citing them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptoss_cloud.main import app
from gptoss_cloud.trainer.bench import runs as R
from gptoss_cloud.suites import parse as S
from gptoss_cloud.suites import run as SR

REPO = Path(__file__).resolve().parents[2]
SUITES = S.load_suites()
STEPS = [(suite, step) for suite in SUITES.values() for step in suite.steps]
CITED = re.compile(r"gptoss-cloud bench --suite (?!NAME\b)([A-Za-z0-9._-]+)")  # NAME: the placeholder in prose


def one(text: str) -> dict:
    return S.parse_suites(text, "test.toml")


GOOD_STEP = '[[suite.s.step]]\nname = "a"\nrun = ["gptoss-cloud", "bench", "--model", "tiny"]\n'


# ------------------------------------------------------------------------------------- the suite file
def test_the_shipped_suites_parse_and_name_what_they_need():
    assert len(SUITES) >= 20
    for s in SUITES.values():
        assert s.description and s.gpus >= 1 and s.steps
    assert SUITES["offload-ckpt"].gpus == 2 and [st.name for st in SUITES["offload-ckpt"].steps] == ["sync", "async", "summary"]
    assert SUITES["rehearse"].s3_server and not SUITES["smoke"].s3_server


def test_the_suite_file_is_package_data():
    assert re.search(r'"gptoss_cloud.suites" = \[[^\]]*"suites.toml"', (REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("text, message", [
    ('[suite.s]\ndescription = "d"\ngpus = 1\nflavour = "x"\n' + GOOD_STEP, r"suite 's': unknown key\(s\) flavour"),
    ('[suite.s]\ndescription = "d"\ngpus = 1\n', r"suite 's': no steps"),
    ('[suite.s]\ndescription = "d"\ngpus = 1\nstep = []\n', r"suite 's': no steps"),
    ('[suite.s]\ngpus = 1\n' + GOOD_STEP, r"suite 's': description is required"),
    ('[suite.s]\ndescription = "d"\ngpus = 0\n' + GOOD_STEP, r"suite 's': gpus must be"),
    ('[suite.s]\ndescription = "d"\ngpus = 1\n[[suite.s.step]]\nname = "a"\nrun = ["bash", "-c", "echo"]\n',
     r"suite 's', step 'a': a step starts with 'gptoss-cloud' or 'python -m', not 'bash'"),
    ('[suite.s]\ndescription = "d"\ngpus = 1\n[[suite.s.step]]\nname = "a"\nrun = ["python", "-c", "print(1)"]\n',
     r"suite 's', step 'a': python runs only '-m pytest' or '-m gptoss_cloud.<module>'"),
    ('[suite.s]\ndescription = "d"\ngpus = 1\n[[suite.s.step]]\nname = "a"\nrun = ["python", "-m", "torch.distributed.run"]\n',
     r"suite 's', step 'a': python runs only"),
    ('[suite.s]\ndescription = "d"\ngpus = 1\n[[suite.s.step]]\nname = "a"\nrun = []\n',
     r"suite 's', step 'a': run must be a non-empty list"),
    ('[suite.s]\ndescription = "d"\ngpus = 1\n[[suite.s.step]]\nname = "a"\nrun = ["gptoss-cloud"]\nshell = true\n',
     r"suite 's', step 'a': unknown key\(s\) shell"),
    ('[suite.s]\ndescription = "d"\ngpus = 1\n[[suite.s.step]]\nrun = ["gptoss-cloud", "bench"]\n',
     r"suite 's', step 1: name must be"),
    ('[suite.s]\ndescription = "d"\ngpus = 1\n' + GOOD_STEP + GOOD_STEP, r"suite 's', step 'a': two steps share this name"),
    ('[suite.s]\ndescription = "d"\ngpus = 1\n[[suite.s.step]]\nname = "a"\nrun = ["gptoss-cloud", "bench", "--out", "x.json"]\n',
     r"suite 's', step 'a': leave --out to the runner"),
    ('[suite.s]\ndescription = "d"\ngpus = 1\n[[suite.s.step]]\nname = "a"\nrun = ["gptoss-cloud", "bench"]\ntimeout_s = 0\n',
     r"suite 's', step 'a': timeout_s must be a positive number"),
    ('[suite.s]\ndescription = "d"\ngpus = 1\n[[suite.s.step]]\nname = "a"\nrun = ["gptoss-cloud", "bench"]\nenv = { A = 1 }\n',
     r"suite 's', step 'a': env must be a table of strings"),
    ('[suites.s]\ndescription = "d"\n', r"test.toml: unknown top-level key\(s\) suites"),
    ('[suite.s\n', r"test.toml: not valid TOML"),
])
def test_a_bad_suite_is_refused_naming_the_suite_and_step(text, message):
    with pytest.raises(S.SuiteError, match=message):
        one(text)


def test_an_unknown_suite_lists_the_known_ones():
    with pytest.raises(S.SuiteError, match=r"no suite 'perf9'; the suites are: .*perf3-defaults"):
        S.get_suite("perf9", SUITES)


# ------------------------------------------------------------------- every step parses as it would run
def _bench_options(params: dict):
    from gptoss_cloud.trainer.bench.run import BenchOptions

    val = lambda v: v.value if hasattr(v, "value") else v  # noqa: E731 - typer hands enums over
    return BenchOptions(
        model=val(params["model"]), layers=params["layers"], method=val(params["method"]), seq=params["seq"],
        steps=params["steps"], warmup=params["warmup"], ours=params["ours"], baseline=params["baseline"],
        gpus=params["gpus"], offload=params["offload"], base_format=val(params["base_format"]),
        recompute=val(params["recompute"]), dequant=val(params["dequant"]), compile=params["compile_layers"],
        variant_specs=list(params["variant"] or []) or None, in_process=params["in_process"])


@pytest.mark.parametrize("suite, step", STEPS, ids=[f"{s.name}/{st.name}" for s, st in STEPS])
def test_every_step_parses_through_its_program_without_running(suite, step, tmp_path):
    S.check_step(suite, step)
    run = list(step.run)
    if run[0] == "gptoss-cloud":
        params = S.check_cli_args(run[1:], "here")
        assert params, f"{suite.name}/{step.name}: parsed to nothing"
        if run[1] == "bench":
            _bench_options(params).validate()  # the variant strings, offload vs GPUs, the model shape
            assert params["gpus"] <= suite.gpus, f"{suite.name}/{step.name}: --gpus {params['gpus']}, the suite {suite.gpus}"
        elif run[1] == "rehearse":
            assert params["nodes"] * params["gpus_per_node"] <= suite.gpus
            assert Path(REPO, params["spec"]).is_file()
    elif run[2] == "pytest":
        from _pytest.config import _prepareconfig

        config = _prepareconfig([*run[3:], "--junitxml", str(tmp_path / "x.xml")])  # raises UsageError on a bad flag
        try:
            assert all(Path(REPO, a).exists() for a in config.args if not a.startswith("-"))
        finally:
            config._ensure_unconfigure()
    elif run[2] == "gptoss_cloud.trainer.bench.export":
        from gptoss_cloud.trainer.bench import export as X

        X.build_parser().parse_args([S._fill(a, suite, tmp_path) for a in run[3:]])  # exits on a bad flag
    else:
        assert run[2] == "gptoss_cloud.trainer.bench.runs", f"{suite.name}/{step.name}: a new module; check its parser here"
        args = R.build_parser().parse_args([S._fill(a, suite, tmp_path) for a in run[3:]])
        if args.cmd == "train":
            assert (REPO / args.spec).is_file()
            assert args.nproc <= suite.gpus
            if "CUDA_VISIBLE_DEVICES" in step.env:
                assert len(step.env["CUDA_VISIBLE_DEVICES"].split(",")) == args.nproc
            from gptoss_cloud.contract.spec import load_spec

            load_spec(REPO / args.spec, overrides=R.parse_sets(args.sets), environ={})


def test_a_step_with_a_bad_option_is_caught_naming_the_suite_and_step():
    suite = one('[suite.s]\ndescription = "d"\ngpus = 1\n[[suite.s.step]]\nname = "a"\n'
                'run = ["gptoss-cloud", "bench", "--model", "30b"]\n')["s"]
    with pytest.raises(S.SuiteError, match=r"suite 's', step 'a': gptoss-cloud bench: .*'30b'"):
        S.check_step(suite, suite.steps[0])
    suite = one('[suite.s]\ndescription = "d"\ngpus = 1\n[[suite.s.step]]\nname = "a"\n'
                'run = ["python", "-m", "gptoss_cloud.trainer.no_such_module"]\n')["s"]
    with pytest.raises(S.SuiteError, match=r"suite 's', step 'a': no module gptoss_cloud.trainer.no_such_module"):
        S.check_step(suite, suite.steps[0])


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    for name in ("perf3-defaults", "offload-ckpt", "gpu-tests", "rehearse"):
        res = CliRunner().invoke(app, ["bench", "--suite", name, "--dry-run", "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        lines = res.output.strip().splitlines()
        assert lines[0].startswith(f"# {name}: ")
        assert sum(sys.executable in line for line in lines) == len(SUITES[name].steps)
        assert not (tmp_path / name).exists()
    res = CliRunner().invoke(app, ["bench", "--suite", "perf3-defaults", "--dry-run", "--out", str(tmp_path)])
    assert f"--out {tmp_path}/20b-lora-4k-defaults.json" in res.output


def test_list_names_every_suite():
    res = CliRunner().invoke(app, ["bench", "--list"])
    assert res.exit_code == 0
    assert [line.split()[0] for line in res.output.strip().splitlines()] == list(SUITES)


def test_suite_options_do_not_mix_with_a_single_benchmarks_options():
    from gptoss_cloud.contract.errors import GptossError

    res = CliRunner().invoke(app, ["bench", "--suite", "smoke", "--model", "120b", "--dry-run"])
    assert isinstance(res.exception, GptossError)  # main() prints it as one line and exits 1
    assert str(res.exception).startswith("--model cannot be combined with --suite")
    res = CliRunner().invoke(app, ["bench", "--suite", "perf9", "--dry-run"])
    assert isinstance(res.exception, GptossError) and "no suite 'perf9'" in str(res.exception)


# --------------------------------------------------------------------------------------- the runner
def test_each_step_runs_with_this_interpreter_and_its_report_under_out(tmp_path):
    bench = SUITES["perf3-defaults"]
    argv = S.step_argv(bench, bench.steps[0], tmp_path)
    assert argv[:3] == [sys.executable, "-m", "gptoss_cloud"] and argv[-2:] == ["--out", str(tmp_path / "20b-lora-4k-defaults.json")]
    reh = SUITES["rehearse"]
    argv = S.step_argv(reh, reh.steps[0], tmp_path)
    assert argv[-4:] == ["--out", str(tmp_path / "rehearse.json"), "--out-dir", str(tmp_path / "rehearse")]
    assert str(S.work_dir(reh) / "reference-runs") in argv
    tests = SUITES["gpu-tests"]
    argv = S.step_argv(tests, tests.steps[0], tmp_path)
    assert argv[:3] == [sys.executable, "-m", "pytest"] and argv[-2:] == ["--junitxml", str(tmp_path / "gpu-tests.xml")]
    ck = SUITES["offload-ckpt"]
    assert S.step_argv(ck, ck.steps[2], tmp_path)[-2:] == ["summary", str(tmp_path)]


def test_the_gpu_environment_keeps_the_machines_own_settings(tmp_path):
    suite = SUITES["offload-ckpt"]
    env = S.step_env(suite, suite.steps[0], {"PATH": "/bin"}, tmp_path)
    assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"], env["PYTHONUNBUFFERED"]) == ("0", "1", "1")
    assert env["PATH"] == "/bin" and not any(k.startswith("GPTOSS_") for k in env)   # settings travel in the spec
    env = S.step_env(suite, suite.steps[0], {"NCCL_NVLS_ENABLE": "1", "PYTHONUNBUFFERED": ""}, tmp_path)
    assert env["NCCL_NVLS_ENABLE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    reh = SUITES["rehearse"]
    assert S.step_env(reh, reh.steps[0], {}, tmp_path)["TMPDIR"] == str(S.work_dir(reh))


def test_visible_gpus_follow_cuda_visible_devices():
    assert SR.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert SR.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert SR.visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == 0


def test_a_suite_needing_more_gpus_than_the_machine_has_starts_nothing(tmp_path):
    with pytest.raises(S.SuiteError, match=r"suite 'smoke' needs 2 GPU\(s\); this machine shows 1"):
        SR.run_suite(SUITES["smoke"], tmp_path / "out", gpus=1)
    assert not (tmp_path / "out").exists()


def _suite_of(steps: str) -> S.Suite:
    return one('[suite.cpu]\ndescription = "steps that run on a CPU"\ngpus = 1\n' + steps)["cpu"]


def test_the_runner_stops_at_the_first_failing_step_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    suite = _suite_of(
        '[[suite.cpu.step]]\nname = "table"\nrun = ["python", "-m", "gptoss_cloud.trainer.bench.rederive"]\n'
        '[[suite.cpu.step]]\nname = "nothing-to-summarise"\n'
        f'run = ["python", "-m", "gptoss_cloud.trainer.bench.runs", "summary", "{tmp_path / "empty"}"]\n'
        '[[suite.cpu.step]]\nname = "never"\nrun = ["python", "-m", "gptoss_cloud.trainer.bench.rederive"]\n')
    out, echoed = tmp_path / "out", []
    with pytest.raises(S.SuiteError) as e:
        SR.run_suite(suite, out, echo=echoed.append, gpus=1)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == f"suite 'cpu', step 'nothing-to-summarise' failed (exit 1); see {out / 'nothing-to-summarise.log'}"
    assert "| report | variant |" in (out / "table.log").read_text()
    assert "no <run-id>.metrics.jsonl to summarise" in (out / "nothing-to-summarise.log").read_text()
    assert not (out / "never.log").exists()
    rec = json.loads((out / "suite.json").read_text())
    assert [(s["name"], s["returncode"]) for s in rec["steps"]] == [("table", 0), ("nothing-to-summarise", 1)]
    assert any("| report | variant |" in line for line in echoed)


def test_a_step_past_its_timeout_is_stopped_and_fails(tmp_path):
    test = tmp_path / "test_slow.py"
    test.write_text("import time\n\ndef test_slow():\n    time.sleep(60)\n")
    suite = _suite_of('[[suite.cpu.step]]\nname = "slow"\n'
                      f'run = ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "{test}"]\ntimeout_s = 3\n')
    t0 = __import__("time").monotonic()
    with pytest.raises(S.SuiteError, match=r"suite 'cpu', step 'slow' failed \(timed out after 3 s\)"):
        SR.run_suite(suite, tmp_path / "out", echo=lambda _: None, gpus=1)
    assert __import__("time").monotonic() - t0 < 40


def test_the_local_s3_server_holds_the_bucket_and_collect_reads_runs_from_it(tmp_path, monkeypatch):
    import boto3

    with SR.s3_server() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3")
        s3.put_object(Bucket=S.S3_BUCKET, Key="runs/rid/metrics.jsonl", Body=b'{"step": 1}\n')
        report = tmp_path / "report.json"
        report.write_text(json.dumps({"home": f"s3://{S.S3_BUCKET}/runs/rid"}))
        assert [p.name for p in R.collect(report, tmp_path / "out")] == ["rid.metrics.jsonl"]
    assert (tmp_path / "out" / "rid.metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_suite_with_an_s3_server_gives_its_steps_the_endpoint(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"home": f"s3://{S.S3_BUCKET}/runs/none"}))
    suite = one('[suite.s3]\ndescription = "d"\ngpus = 1\ns3_server = true\n[[suite.s3.step]]\nname = "collect"\n'
                f'run = ["python", "-m", "gptoss_cloud.trainer.bench.runs", "collect", "{report}", "{{out}}"]\n')["s3"]
    SR.run_suite(suite, tmp_path / "out", echo=lambda _: None, gpus=1,
                environ={"PATH": "/usr/bin:/bin", "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_PROFILE": "mine"})
    rec = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert rec["steps"][0]["returncode"] == 0


# ------------------------------------------------------------------------------ trainer-run steps
def test_rank_memory_counts_only_this_runs_ranks():
    procs = [(1000, "python -m gptoss_cloud.trainer spec.yaml --run-id r1"),
             (3000, "python -m gptoss_cloud.trainer spec.yaml --run-id r1"),
             (9000, "python -m torch.distributed.run --nproc-per-node 2 -m gptoss_cloud.trainer spec.yaml --run-id r1"),
             (5000, "python -m gptoss_cloud.trainer spec.yaml --run-id r2"),
             (7000, "python -m gptoss_cloud.trainer spec.yaml --run-id r10"),
             (300, "python -m gptoss_cloud.trainer.bench.runs train spec.yaml --nproc 2 --run-id r1 --out o")]
    assert R.rank_rss_row(7, procs, "r1") == "7\t4000\t3000\t2"
    assert R.rank_rss_row(7, [], "r1") == "7\t0\t0\t0"


@pytest.mark.slow
def test_a_trainer_run_is_measured_from_outside_and_summarised(tmp_path):
    """The tiny model on 2 CPU processes (gloo) through the same launcher the GPU suites use."""
    out, store = tmp_path / "out", tmp_path / "store"
    rc = R.main(["train", str(REPO / "examples" / "local-tiny.yaml"), "--nproc", "2", "--run-id", "bench-t", "--out", str(out),
                 "--set", "optim.max_steps=2", "--set", f"output.store={store}", "--set", "output.merge=false",
                 "--set", "data.max_seq_len=128", "--set", "optim.log_every=1", "--set", "checkpoint.every_steps=2",
                 "--drop-home"])
    assert rc == 0, (out / "bench-t.log").read_text()[-3000:]
    assert "max_steps: 2" in (out / "bench-t.yaml").read_text()
    assert [r["step"] for r in R.read_jsonl(out / "bench-t.metrics.jsonl") if "loss" in r] == [1, 2]
    mem = R.read_mem_tsv(out / "bench-t.mem.tsv")
    assert max(int(v[3]) for v in mem) == 2 and max(int(v[1]) for v in mem) > 100 * 1024  # both ranks, > 100 MiB
    assert "checkpoints" in (out / "bench-t.du.txt").read_text()
    assert not (store / "bench-t").exists()  # --drop-home
    lines = R.summary(out)
    assert lines[0] == "## bench-t" and any(line.startswith("checkpoint step 2 (sync)") for line in lines)
    assert any(line.startswith("host RSS of the ranks: peak sum") for line in lines)


def test_spec_overrides_are_yaml_values():
    from gptoss_cloud.contract.spec import load_spec

    sets = R.parse_sets(["checkpoint.async_save=true", "optim.lr=1e-5", "model.layers=2"])
    spec = load_spec(REPO / "examples" / "h100x2-120b-L1-full-offload.yaml", overrides=sets, environ={})
    assert (spec.checkpoint.async_save, spec.optim.lr, spec.model.layers) == (True, 1e-5, 2)
    with pytest.raises(ValueError, match="--set 'async_save': expected KEY=VALUE"):
        R.parse_sets(["async_save"])


def test_a_run_summary_has_the_step_split_checkpoints_merge_and_host_memory():
    step = {"loss": 12.0, "data_s": 0.01, "fwd_bwd_s": 0.59, "optimizer_share": 0.8, "mem_reserved_gib": 48.5}
    rows = [dict(step, step=1, step_s=9.0, optimizer_s=8.4, tokens_per_s_per_gpu=400.0),
            dict(step, step=2, step_s=3.0, optimizer_s=2.4, tokens_per_s_per_gpu=1400.0),
            dict(step, step=3, step_s=2.0, optimizer_s=1.4, tokens_per_s_per_gpu=1600.0),
            {"event": "checkpoint", "step": 2, "mode": "async", "blocking_s": 8.4, "write_s": 39.2, "total_s": 66.4,
             "bytes": 2 * 1024**3, "files": 7},
            {"event": "merge", "wall_s": 62.6, "bytes_written": 17.5e9, "peak_rss_gib": 50.6, "peak_rss_scope": "merge",
             "rss_start_gib": 38.7}]
    lines = R.run_summary("run-a", rows, [["1", str(40 * 2**20), str(30 * 2**20), "2"], ["2", str(60 * 2**20), str(33 * 2**20), "2"]])
    assert lines[0] == "## run-a"
    assert lines[1].startswith("step 1: 9.00s = data 0.01 + fwd+bwd 0.59 + optimizer 8.40 (80%)")
    assert "mean of steps 2-3: 2.50s/step, optimizer 76%, 1500 tok/s/GPU" in lines
    assert any(line.startswith("checkpoint step 2 (async): blocked 8.4") for line in lines)
    assert "merge: 62.6s, 17.50 GB written, peak host memory 50.6 GiB (merge; 38.7 GiB at start)" in lines
    assert lines[-1] == "host RSS of the ranks: peak sum 60.0 GiB, peak single rank 33.0 GiB"


def test_summary_reads_a_runs_files_and_refuses_bad_ones(tmp_path):
    (tmp_path / "r.metrics.jsonl").write_text(json.dumps({"event": "merge", "wall_s": 1, "bytes_written": 1e9,
                                                          "peak_rss_gib": 2, "peak_rss_scope": "merge", "rss_start_gib": 1}) + "\n")
    (tmp_path / "r.mem.tsv").write_text(R.MEM_HEADER + "\n1\t2048\t1024\t2\n")
    assert R.summary(tmp_path)[:2] == ["## r", "merge: 1s, 1.00 GB written, peak host memory 2 GiB (merge; 1 GiB at start)"]
    (tmp_path / "r.mem.tsv").write_text("time rss\n")
    with pytest.raises(ValueError, match=r"r.mem.tsv: expected the header"):
        R.summary(tmp_path)
    (tmp_path / "r.metrics.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"r.metrics.jsonl:1: not a JSON line"):
        R.summary(tmp_path)


def test_collect_copies_the_small_files_of_a_rehearsals_runs(tmp_path):
    for run in ("rid", "rid-ref"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "metrics.jsonl").write_text(f"{run}\n")
        (tmp_path / "runs" / run / "summary.json").write_text("{}")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"home": str(tmp_path / "runs" / "rid"), "reference": {"home": str(tmp_path / "runs" / "rid-ref")}}))
    got = R.collect(report, tmp_path / "out")
    assert sorted(p.name for p in got) == ["rid-ref.metrics.jsonl", "rid-ref.summary.json", "rid.metrics.jsonl", "rid.summary.json"]
    assert (tmp_path / "out" / "rid-ref.metrics.jsonl").read_text() == "rid-ref\n"
    assert R.main(["collect", str(tmp_path / "missing.json"), str(tmp_path / "out")]) == 1


# ----------------------------------------------------------------------------- docs and scripts
def test_docs_cite_every_suite_and_only_suites_that_exist():
    cited = set(CITED.findall((REPO / "docs" / "benchmarks.md").read_text()))
    assert cited - set(SUITES) == set(), "docs/benchmarks.md cites suites that do not exist"
    assert set(SUITES) - cited == set(), "suites that docs/benchmarks.md does not cite"


def test_docs_cite_no_removed_script():
    text = (REPO / "docs" / "benchmarks.md").read_text()
    for script in re.findall(r"scripts/[\w.-]+", text):
        assert (REPO / script).exists(), f"docs/benchmarks.md cites {script}, which does not exist"


# A heredoc (<<WORD, <<-WORD; not a here-string <<<) is how the old scripts carried Python source.
HEREDOC = re.compile(r"(?<!<)<<-?\s*['\"]?\w+")


def test_no_script_embeds_python_in_a_heredoc():
    for f in sorted((REPO / "scripts").iterdir()):
        if f.suffix == ".sh":
            for i, line in enumerate(f.read_text().splitlines(), 1):
                assert not HEREDOC.search(line), f"{f.name}:{i} holds a heredoc: {line.strip()}"


def test_the_heredoc_check_catches_the_forms_the_old_scripts_used():
    for line in ['"$PY" - "$OUT" <<\'PY\'', "python3 - <<EOF", 'cat <<-"END"']:
        assert HEREDOC.search(line), line
    assert not HEREDOC.search('exec "$PY" -m gptoss_cloud bench --suite "$SUITE" --out "$OUT" "$@"')
    assert not HEREDOC.search('grep x <<< "$text"')
