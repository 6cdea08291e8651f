"""DataSection -> packed train/validation samples, cached so that a multi-rank run tokenizes once.

The cache key is (content of every source, the data section, the vocabulary + renderer), so any change
to the data or to how it is rendered makes a new entry. Writes are atomic (unique temporary file, then
rename): build_datasets may run on several ranks at once and a reader never sees half a file. The
trainer lets rank 0 build, barriers, and the other ranks then read the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from gptoss_cloud.contract.errors import DataError

from gptoss_cloud.trainer.data.harmony import TokenizedSequence, tokenize_row
from gptoss_cloud.trainer.data.notes import Notes
from gptoss_cloud.trainer.data.pack import PackedSample, PackStats, pack
from gptoss_cloud.trainer.data.rows import RowError
from gptoss_cloud.trainer.data.sources import SourceRows, load_source
from gptoss_cloud.trainer.data.vocab import vocab_hash

if TYPE_CHECKING:
    from gptoss_cloud.contract.sections import DataSection, DatasetSource

CACHE_FORMAT = 2  # 2: statistics carry the notes
DEFAULT_CACHE_DIR = Path("~/.cache/gptoss-cloud/data")
log = logging.getLogger("gptoss_cloud.trainer.data")


@dataclass
class DataStats:
    rows: int = 0  # input rows used (after mixing weights)
    skipped_rows: int = 0  # malformed rows left out (on_error: skip)
    sequences: int = 0  # produced by tokenization, before packing
    packed: int = 0  # sequences that made it into samples
    samples: int = 0  # packed samples of max_seq_len tokens
    tokens: int = 0  # real (non-padding) tokens in the samples
    trained_tokens: int = 0
    dropped: int = 0  # over max_seq_len, overlong: drop
    truncated: int = 0  # over max_seq_len, overlong: truncate
    untrained: int = 0  # sequences with no trained token, left out
    # What was converted, dropped or defaulted in the rows used (each distinct row once): notes.Notes as JSON.
    notes: dict = field(default_factory=dict)

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0


@dataclass
class Datasets:
    train: list[PackedSample]
    validation: list[PackedSample]
    stats: DataStats
    validation_stats: DataStats = field(default_factory=DataStats)


# ---------------------------------------------------------------------------------- tokenizing
def tokenize_rows(rows: Iterable[tuple[int, object]], src: "DatasetSource", name: str, data: "DataSection",
                  errors: list[RowError], notes: Notes | None = None) -> list[TokenizedSequence]:
    """Tokenize (row index, raw row) pairs in order. Malformed rows raise, or are appended to ``errors``
    under ``on_error: skip``; what accepted rows had converted, dropped or defaulted goes to ``notes``."""
    out: list[TokenizedSequence] = []
    for index, raw in rows:
        try:
            if isinstance(raw, RowError):
                raise raw
            out += tokenize_row(raw, data, index=index, source=src, source_name=name, notes=notes)
        except RowError as e:
            if data.on_error == "fail":
                raise
            errors.append(e)
    return out


def check_skipped(errors: list[RowError], total: int, data: "DataSection") -> None:
    """With on_error: skip, fail when more than max_skip_fraction of the rows were malformed."""
    if total and errors and len(errors) / total > data.max_skip_fraction:
        first = "; ".join(e.message for e in errors[:3])
        raise DataError(
            f"{len(errors)} of {total} rows are malformed ({len(errors) / total:.1%} > data.max_skip_fraction "
            f"{data.max_skip_fraction:.1%}); first: {first}",
            hint="fix the rows, or raise data.max_skip_fraction",
        )


# Above this many distinct rows, tokenize in worker processes (rank 0 builds while the others wait).
PARALLEL_MIN_ROWS = 4000
CHUNK_ROWS = 1000

Ref = tuple[int, int]  # (source index, row index)


Chunk = tuple[dict[Ref, list[TokenizedSequence]], dict[Ref, RowError], dict[Ref, Notes]]


def _tokenize_chunk(items: list[tuple[Ref, object]], srcs: list[tuple[str, "DatasetSource"]], data: "DataSection",
                    fail_fast: bool) -> Chunk:
    done: dict[Ref, list[TokenizedSequence]] = {}
    bad: dict[Ref, RowError] = {}
    notes: dict[Ref, Notes] = {}
    for ref, raw in items:
        name, src = srcs[ref[0]]
        mine = Notes()
        try:
            if isinstance(raw, RowError):
                raise raw
            done[ref] = tokenize_row(raw, data, index=ref[1], source=src, source_name=name, notes=mine)
        except RowError as e:
            if fail_fast:
                raise
            bad[ref], done[ref] = e, []
        if mine:
            notes[ref] = mine
    return done, bad, notes


def _tokenize_refs(refs: list[Ref], sources: list[tuple[SourceRows, "DatasetSource"]], data: "DataSection"):
    """Tokenize each distinct row once; in parallel worker processes for large inputs."""
    srcs = [(s.name, src) for s, src in sources]
    items = [(ref, sources[ref[0]][0].rows[ref[1]]) for ref in refs]
    workers = min(os.cpu_count() or 1, 16, len(items) // CHUNK_ROWS)
    if len(items) < PARALLEL_MIN_ROWS or workers < 2:
        return _tokenize_chunk(items, srcs, data, fail_fast=data.on_error == "fail")
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    done: dict[Ref, list[TokenizedSequence]] = {}
    bad: dict[Ref, RowError] = {}
    notes: dict[Ref, Notes] = {}
    chunks = [items[i : i + CHUNK_ROWS] for i in range(0, len(items), CHUNK_ROWS)]
    # spawn, not fork: the caller may be a trainer process with threads (and CUDA) already running.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for d, b, n in pool.map(_tokenize_chunk, chunks, [srcs] * len(chunks), [data] * len(chunks),
                                [False] * len(chunks)):
            done.update(d)
            bad.update(b)
            notes.update(n)
    if bad and data.on_error == "fail":
        raise bad[next(r for r in refs if r in bad)]  # the first malformed row in input order
    return done, bad, notes


# ---------------------------------------------------------------------------------- selection
def _split(n: int, fraction: float, seed: int, salt: int) -> set[int]:
    """Row indices held out for validation (seeded, per source so weights never leak them)."""
    if n < 2:
        return set()
    k = min(n - 1, max(1, round(n * fraction)))
    return set(random.Random(f"{seed}:val:{salt}").sample(range(n), k))


def _weighted(indices: list[int], weight: float, seed: int, salt: int) -> list[int]:
    """Weight w: every row floor(w) times, plus a seeded sample of the fraction (0.5: half the rows)."""
    whole, frac = int(weight), weight - int(weight)
    out = indices * whole
    if frac:
        k = round(len(indices) * frac)
        out += sorted(random.Random(f"{seed}:mix:{salt}").sample(indices, k))
    return out


# ---------------------------------------------------------------------------------- the build
def _section_key(data: "DataSection") -> dict:
    d = data.model_dump(mode="json")
    d.pop("cache_dir", None)  # where the cache lives does not change what is in it
    return d


def cache_key(data: "DataSection", loaded: list[SourceRows] | None = None, val: SourceRows | None = None) -> str:
    from gptoss_cloud.contract.sections import DatasetSource

    loaded = loaded if loaded is not None else [load_source(s) for s in data.datasets]
    if val is None and isinstance(data.validation, DatasetSource):
        val = load_source(data.validation)
    h = hashlib.sha256()
    h.update(json.dumps(_section_key(data), sort_keys=True).encode())
    for s in loaded + ([val] if val else []):
        h.update(s.content_hash.encode())
    h.update(vocab_hash().encode())
    h.update(str(CACHE_FORMAT).encode())
    return h.hexdigest()[:24]


def _cache_dir(data: "DataSection", cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or data.cache_dir or DEFAULT_CACHE_DIR).expanduser()


def cache_path(data: "DataSection", *, cache_dir: str | Path | None = None) -> Path:
    """Where build_datasets stores (or finds) the packed data for this data section."""
    return _cache_dir(data, cache_dir) / f"{cache_key(data)}.json"


def build_datasets(data: "DataSection", *, cache_dir: str | Path | None = None, use_cache: bool = True,
                   log_notes: bool = True) -> Datasets:
    """Load, validate, tokenize, mix, split and pack; read from / write to the cache.

    The run's log gets one warning per kind of conversion in the statistics' notes (``log_notes``)."""
    from gptoss_cloud.contract.sections import DatasetSource

    loaded = [load_source(s) for s in data.datasets]
    val_src = load_source(data.validation) if isinstance(data.validation, DatasetSource) else None
    path = _cache_dir(data, cache_dir) / f"{cache_key(data, loaded, val_src)}.json"
    out = None
    if use_cache and path.is_file():
        try:
            out = _read(path)
        except (OSError, ValueError, KeyError):
            pass  # unreadable (e.g. another version's leftovers): rebuild and overwrite
    if out is None:
        out = _build(data, loaded, val_src)
        if use_cache:
            _write(path, out)
    for line in Notes.from_json(out.stats.notes).lines() if log_notes else []:
        log.warning("training data: %s", line)
    return out


def _build(data: "DataSection", loaded: list[SourceRows], val_src: SourceRows | None) -> Datasets:
    errors: list[RowError] = []
    fraction = data.validation if isinstance(data.validation, float) else None
    train_refs: list[tuple[int, int]] = []  # (source, row)
    val_refs: list[tuple[int, int]] = []
    for i, s in enumerate(loaded):
        held = _split(len(s.rows), fraction, data.seed, i) if fraction else set()
        val_refs += [(i, r) for r in range(len(s.rows)) if r in held]
        keep = [r for r in range(len(s.rows)) if r not in held]
        train_refs += [(i, r) for r in _weighted(keep, data.datasets[i].weight, data.seed, i)]
    if data.shuffle:
        random.Random(f"{data.seed}:shuffle").shuffle(train_refs)

    # Tokenize each distinct row once; repeated rows (weights > 1) reuse the result.
    sources = list(zip(loaded, data.datasets))
    if val_src is not None:
        sources.append((val_src, data.validation))
        val_refs = [(len(loaded), r) for r in range(len(val_src.rows))]
    distinct = sorted(set(train_refs + val_refs))  # input order: on_error fail names the first bad row
    done, bad_errors, row_notes = _tokenize_refs(distinct, sources, data)
    bad = set(bad_errors)
    errors += [bad_errors[r] for r in distinct if r in bad_errors]
    check_skipped(errors, len(done), data)

    def assemble(refs: list[tuple[int, int]], shuffle: bool) -> tuple[list[PackedSample], DataStats]:
        seqs = [seq for ref in refs for seq in done[ref]]
        ps = PackStats()
        notes = Notes()
        for ref in sorted(set(refs) & row_notes.keys()):  # input order: `first` names the earliest row
            notes.update(row_notes[ref])
        samples = pack(seqs, data.max_seq_len, overlong=data.overlong, stats=ps)
        if shuffle:
            random.Random(f"{data.seed}:samples").shuffle(samples)
        st = DataStats(rows=len(refs) - sum(1 for r in refs if r in bad), skipped_rows=len({r for r in refs if r in bad}),
                       sequences=len(seqs), packed=ps.sequences, samples=len(samples), dropped=ps.dropped,
                       truncated=ps.truncated, untrained=ps.untrained, notes=notes.to_json())
        for p in samples:
            real = sum(p.seq_lens[: len(p.rows)])
            st.tokens += real
            st.trained_tokens += sum(1 for x in p.labels[:real] if x != -100)
        return samples, st

    train, stats = assemble(train_refs, data.shuffle)
    validation, vstats = assemble(val_refs, False)
    if not train:
        raise DataError(
            f"no training samples: {stats.rows} rows gave {stats.sequences} sequences, {stats.dropped} over "
            f"max_seq_len {data.max_seq_len}, {stats.untrained} without trained tokens",
            hint="raise data.max_seq_len or set data.overlong: truncate" if stats.dropped else None,
        )
    return Datasets(train, validation, stats, vstats)


# ---------------------------------------------------------------------------------- cache I/O
def _write(path: Path, ds: Datasets) -> None:
    def enc(samples: list[PackedSample]) -> list[dict]:
        return [{"input_ids": p.input_ids, "labels": p.labels, "seq_lens": p.seq_lens, "rows": p.rows} for p in samples]

    doc = {"format": CACHE_FORMAT, "train": enc(ds.train), "validation": enc(ds.validation),
           "stats": asdict(ds.stats), "validation_stats": asdict(ds.validation_stats)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, path)  # atomic: concurrent builders each replace with identical content
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> Datasets:
    doc = json.loads(path.read_text())
    if doc.get("format") != CACHE_FORMAT:
        raise ValueError("cache format")

    def dec(items: list[dict]) -> list[PackedSample]:
        return [PackedSample(d["input_ids"], d["labels"], [p for n in d["seq_lens"] for p in range(n)], d["seq_lens"],
                             d["rows"]) for d in items]

    return Datasets(dec(doc["train"]), dec(doc["validation"]), DataStats(**doc["stats"]),
                    DataStats(**doc["validation_stats"]))
