"""The trainer itself as a benchmark step: one run under torchrun, measured from outside, and its summary.

    python -m gptoss_cloud.trainer.bench.runs train SPEC --nproc 2 --run-id ID --out DIR [--set KEY=VALUE] [--drop-home]
    python -m gptoss_cloud.trainer.bench.runs summary DIR
    python -m gptoss_cloud.trainer.bench.runs collect REPORT DIR

``train`` writes the resolved spec (with ``--set`` overrides, e.g. ``checkpoint.async_save=true``) to
``DIR/ID.yaml``, runs ``torchrun --standalone -m gptoss_cloud.trainer`` on it, and samples the rank
processes' resident memory every second (``DIR/ID.mem.tsv``: time, summed and largest RSS in KiB, count;
``DIR/ID.free.txt``: the host's memory every 10 s), since the trainer's own metrics see one rank only.
It then copies the run's ``metrics.jsonl`` and ``summary.json`` beside them, records the sizes of the
checkpoints and the merge (``DIR/ID.du.txt``), and with ``--drop-home`` removes the run's home (the next
run needs the disk). ``summary`` prints every run under DIR: the step split, checkpoints, the merge and
the host memory. ``collect`` copies the small files of the runs a ``gptoss-cloud rehearse`` report names.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

SMALL_FILES = ("metrics.jsonl", "summary.json", "spec.yaml")
MEM_HEADER = "t\tsum_rss_kib\tmax_rss_kib\tprocs"
FREE_EVERY = 10  # memory samples between two records of the host's free memory


# --------------------------------------------------------------------------- memory of the ranks
def _follows(words: list[str], first: str, second: str) -> bool:
    return any(a == first and b == second for a, b in zip(words, words[1:]))


def is_rank_process(cmdline: str, run_id: str) -> bool:
    """A trainer rank of this run (``-m gptoss_cloud.trainer ... --run-id ID``): not torchrun's agent, which
    holds the same arguments, nor this launcher (``-m gptoss_cloud.trainer.bench.runs``)."""
    words = cmdline.split()
    return (_follows(words, "-m", "gptoss_cloud.trainer") and _follows(words, "--run-id", run_id)
            and "torch.distributed.run" not in words)


def rank_rss_row(t: int, procs: Iterable[tuple[int, str]], run_id: str) -> str:
    """One line of mem.tsv from (rss KiB, command line) pairs."""
    rss = [kib for kib, cmd in procs if is_rank_process(cmd, run_id)]
    return f"{t}\t{sum(rss)}\t{max(rss, default=0)}\t{len(rss)}"


def _processes() -> Iterator[tuple[int, str]]:
    """(VmRSS KiB, command line) of every process this user can read, from /proc."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            rss = next((int(line.split()[1]) for line in (d / "status").read_text().splitlines()
                        if line.startswith("VmRSS:")), None)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or a kernel thread
        if rss is not None and cmd:
            yield rss, cmd


def _host_memory() -> str:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable", "Cached", "SwapTotal", "SwapFree"):
            fields[key] = f"{int(rest.split()[0]) / 2**20:.1f} GiB"
    return time.strftime("%H:%M:%S ") + ", ".join(f"{k} {v}" for k, v in fields.items())


class MemorySampler(threading.Thread):
    def __init__(self, run_id: str, mem: Path, free: Path, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.run_id, self.mem, self.free, self.every_s = run_id, mem, free, every_s
        self.done = threading.Event()

    def run(self) -> None:
        with open(self.mem, "w") as m, open(self.free, "w") as f:
            m.write(MEM_HEADER + "\n")
            n = 0
            while not self.done.is_set():
                m.write(rank_rss_row(int(time.time()), _processes(), self.run_id) + "\n")
                m.flush()
                if n % FREE_EVERY == 0 and Path("/proc/meminfo").exists():
                    f.write(_host_memory() + "\n")
                    f.flush()
                n += 1
                self.done.wait(self.every_s)


# ------------------------------------------------------------------------------------ one run
def parse_sets(pairs: list[str]) -> dict:
    """KEY=VALUE (dotted spec keys) with YAML values, parsed as the spec file's values are."""
    from gptoss_cloud.contract import safe_yaml

    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {p!r}: expected KEY=VALUE, e.g. checkpoint.async_save=true")
        out[key] = safe_yaml.load(value, f"--set {p}")
    return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def train(spec_path: Path, nproc: int, run_id: str, out: Path, sets: dict, drop_home: bool) -> int:
    from gptoss_cloud.contract.runs import check_run_id, run_home
    from gptoss_cloud.contract.spec import load_spec
    from gptoss_cloud.contract.store.objects import is_remote, open_store

    check_run_id(run_id)
    spec = load_spec(spec_path, overrides=sets)
    home = run_home(spec.output.store, run_id)
    if is_remote(home) and drop_home:
        raise ValueError(f"--drop-home removes local run homes only; {home} is remote")
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / f"{run_id}.yaml"
    resolved.write_text(spec.to_yaml())
    if not is_remote(home) and Path(home).exists():
        shutil.rmtree(home)  # an earlier run of this benchmark: a fresh home, or the trainer would resume it
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "gptoss_cloud.trainer", str(resolved), "--run-id", run_id]
    print(f"== {run_id}: {nproc} GPU(s), spec {spec_path}{''.join(f', {k}={v}' for k, v in sets.items())}", flush=True)
    sampler = MemorySampler(run_id, out / f"{run_id}.mem.tsv", out / f"{run_id}.free.txt")
    sampler.start()
    try:
        with open(out / f"{run_id}.log", "w") as log:
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
    finally:
        sampler.done.set()
        sampler.join()
    print("".join((out / f"{run_id}.log").read_text().splitlines(keepends=True)[-3:]), end="")
    store = open_store(home)
    for name in ("metrics.jsonl", "summary.json"):
        if store.exists(name):
            store.download_file(name, str(out / f"{run_id}.{name}"))
    if not is_remote(home):
        sizes = [f"{_dir_bytes(Path(home) / d) / 1e9:.2f} GB\t{Path(home) / d}" for d in ("checkpoints", "merged")]
        (out / f"{run_id}.du.txt").write_text("\n".join(sizes) + "\n")
        print("\n".join(sizes))
        if drop_home:
            shutil.rmtree(home, ignore_errors=True)
    if rc != 0:
        print(f"{run_id}: the trainer exited {rc}; see {out / (run_id + '.log')}", file=sys.stderr)
    return rc


# --------------------------------------------------------------------------------- summaries
def run_summary(run_id: str, rows: list[dict], mem_rows: list[list[str]]) -> list[str]:
    """What one trainer run measured: per-step split, checkpoints, merge, and the ranks' host memory."""
    from gptoss_cloud.trainer.checkpoint.stats import checkpoint_line

    lines = [f"## {run_id}"]
    steps = [r for r in rows if "loss" in r and "optimizer_s" in r]
    for r in steps:
        lines.append(f"step {r['step']}: {r['step_s']:.2f}s = data {r['data_s']:.2f} + fwd+bwd {r['fwd_bwd_s']:.2f} + "
                     f"optimizer {r['optimizer_s']:.2f} ({100 * r['optimizer_share']:.0f}%); "
                     f"{r['tokens_per_s_per_gpu']:.0f} tok/s/GPU, GPU peak {r['mem_reserved_gib'] or 0:.1f} GiB reserved")
    late = steps[1:] or steps  # the first step includes warm-up
    if late:
        n, total = len(late), sum(r["step_s"] for r in late)
        lines.append(f"mean of steps {late[0]['step']}-{late[-1]['step']}: {total / n:.2f}s/step, optimizer "
                     f"{100 * sum(r['optimizer_s'] for r in late) / total:.0f}%, "
                     f"{sum(r['tokens_per_s_per_gpu'] for r in late) / n:.0f} tok/s/GPU")
    for r in rows:
        if r.get("event") == "checkpoint":
            lines.append(checkpoint_line(r))  # the trainer's own one-line form of the event
        elif r.get("event") == "merge":
            lines.append(f"merge: {r['wall_s']}s, {r['bytes_written'] / 1e9:.2f} GB written, peak host memory "
                         f"{r['peak_rss_gib']} GiB ({r['peak_rss_scope']}; {r['rss_start_gib']} GiB at start)")
    if mem_rows:
        lines.append(f"host RSS of the ranks: peak sum {max(int(v[1]) for v in mem_rows) / 2**20:.1f} GiB, "
                     f"peak single rank {max(int(v[2]) for v in mem_rows) / 2**20:.1f} GiB")
    return lines


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
    return rows


def read_mem_tsv(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    if not lines or lines[0] != MEM_HEADER:
        raise ValueError(f"{path}: expected the header {MEM_HEADER!r}")
    return [line.split("\t") for line in lines[1:] if line.strip()]


def summary(out: Path) -> list[str]:
    runs = sorted(out.glob("*.metrics.jsonl"))
    if not runs:
        raise ValueError(f"{out}: no <run-id>.metrics.jsonl to summarise")
    lines: list[str] = []
    for f in runs:
        rid = f.name[: -len(".metrics.jsonl")]
        lines += run_summary(rid, read_jsonl(f), read_mem_tsv(out / f"{rid}.mem.tsv")) + [""]
    return lines


def collect(report: Path, out: Path) -> list[Path]:
    """The small files (metrics, summary, spec) of the runs a rehearse report names, beside it."""
    from gptoss_cloud.contract.store.objects import open_store

    try:
        rep = json.loads(report.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{report}: no rehearse report to collect from ({e})") from None
    homes = [rep["home"]] + ([rep["reference"]["home"]] if rep.get("reference") else [])
    out.mkdir(parents=True, exist_ok=True)
    got = []
    for home in homes:
        st, run = open_store(home), home.rstrip("/").rsplit("/", 1)[-1]
        for key in SMALL_FILES:
            if st.exists(key):
                st.download_file(key, str(out / f"{run}.{key}"))
                got.append(out / f"{run}.{key}")
    return got


# ---------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptoss_cloud.trainer.bench.runs", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="one trainer run under torchrun, its host memory sampled")
    t.add_argument("spec", type=Path)
    t.add_argument("--nproc", type=int, required=True, help="GPUs (torchrun processes)")
    t.add_argument("--run-id", required=True)
    t.add_argument("--out", type=Path, required=True, help="folder for the log, metrics and memory samples")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="spec override, e.g. checkpoint.async_save=true (repeatable)")
    t.add_argument("--drop-home", action="store_true", help="remove the run home afterwards (local store)")
    s = sub.add_parser("summary", help="summarise every trainer run in a folder")
    s.add_argument("out", type=Path)
    c = sub.add_parser("collect", help="copy the small files of a rehearsal's runs beside its report")
    c.add_argument("report", type=Path)
    c.add_argument("out", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    from gptoss_cloud.contract.errors import GptossError

    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "train":
            if args.nproc < 1:
                raise ValueError(f"--nproc must be at least 1, not {args.nproc}")
            return train(args.spec, args.nproc, args.run_id, args.out, parse_sets(args.sets), args.drop_home)
        if args.cmd == "summary":
            print("\n".join(summary(args.out)))
        else:
            for f in collect(args.report, args.out):
                print(f)
    except (ValueError, OSError, GptossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
