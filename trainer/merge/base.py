"""What a merge reads: the published checkpoint (verified against its manifest) and, for LoRA, the base weights."""

from __future__ import annotations

import json
from pathlib import Path
import torch
import torch.distributed.checkpoint as dcp
from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.store.fetch import download_prefix, local_output
from gptoss_cloud.contract.outputs import home_says_signed
from gptoss_cloud.contract.shapes import HUB_IDS
from gptoss_cloud.contract.store.objects import LocalStore, is_remote, join, open_store
from gptoss_cloud.trainer.checkpoint.resume import make_fetcher
from gptoss_cloud.trainer.checkpoint.manifest import KEY_ENV, CheckpointError, list_published, parse_step, read_manifest, signing_key, step_dir
from gptoss_cloud.trainer.checkpoint.safety import FetchingReader, SafeLoadPlanner, safe_load_metadata


class Source:
    """One published checkpoint, read lazily: only the files (and byte ranges) a tensor needs."""

    def __init__(self, ref: str, cache: Path):
        ref = ref.rstrip("/")
        step = parse_step(ref.rsplit("/", 1)[-1])
        if step is not None:  # .../checkpoints/step-N
            self.ckpts = open_store(ref.rsplit("/", 1)[0])
            self.home = ref.rsplit("/", 2)[0]
        else:  # a run home: the newest published checkpoint
            self.home = ref
            self.ckpts = open_store(join(ref, "checkpoints"))
            published = list_published(self.ckpts)
            if not published:
                raise CheckpointError(f"no published checkpoint under {self.ckpts.uri}",
                                      hint="a checkpoint counts once its manifest.json is written; is the run still saving?")
            step = published[0]
        self.step = step
        self.where = f"{self.ckpts.uri.rstrip('/')}/{step_dir(step)}"
        self.signed = home_says_signed(self.home)
        if self.signed and signing_key() is None:
            raise CheckpointError(f"{self.where}: the run's spec says its checkpoints are signed (cluster.checkpoint_key_secret), "
                                  f"but {KEY_ENV} is not set here; refusing to merge it unverified",
                                  hint=f"export {KEY_ENV}=<the key in that Secret> (the merge Job gets it from the Secret)")
        self.manifest = read_manifest(self.ckpts, step, signing_key())
        self.folder = (Path(self.ckpts.root) if isinstance(self.ckpts, LocalStore) else cache) / step_dir(step)
        self.fetch = make_fetcher(self.ckpts, step, self.folder, self.manifest, self.where)
        self.fetch([".metadata"])
        self.metadata = safe_load_metadata((self.folder / ".metadata").read_bytes(), f"{self.where}/.metadata")

    def text(self, rel: str) -> str | None:
        if rel not in self.manifest.files:
            return None
        self.fetch([rel])
        return (self.folder / rel).read_text()

    def model_entries(self) -> dict[str, tuple[tuple, torch.dtype]]:
        """The checkpoint's model tensors by transformers name: (shape, dtype). Experts trained in
        several FSDP2 units (``parallelism.expert_units``) are listed joined, as one tensor per name."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from gptoss_cloud.trainer.kernels.expert_units import join_unit_entries

        # The loop trains a wrapper holding the model as ``lm``: names are given without that prefix.
        self._dcp_key = {k[len("model."):].removeprefix("lm."): k[len("model."):]
                         for k in self.metadata.state_dict_metadata if k.startswith("model.")}
        stored = {k[len("model."):].removeprefix("lm."): (tuple(m.size), m.properties.dtype)
                  for k, m in self.metadata.state_dict_metadata.items()
                  if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        try:
            joined, self._parts = join_unit_entries(stored)
        except ValueError as e:
            raise CheckpointError(f"{self.where}: {e}") from None
        self._stored = stored
        return joined

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        self.model_entries()
        stored = [p for n in names for p in self._parts.get(n, [n])]
        missing = [n for n in stored if n not in self._stored]
        if missing:
            raise CheckpointError(f"{self.where}: no tensor {missing[0]} in the checkpoint")
        sd = {"model": {self._dcp_key[n]: torch.empty(self._stored[n][0], dtype=self._stored[n][1]) for n in stored}}
        dcp.load(sd, storage_reader=FetchingReader(str(self.folder), self.fetch, self.where),
                 planner=SafeLoadPlanner(allow_partial_load=True), no_dist=True)
        got = {n: sd["model"][self._dcp_key[n]] for n in stored}
        return {n: torch.cat([got.pop(p) for p in self._parts[n]]) if n in self._parts else got.pop(n) for n in names}


class BaseWeights:
    """A Hugging Face folder of safetensors, read one tensor at a time (MXFP4 experts dequantized)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        idx = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
        self.where: dict[str, str] = {}
        self._handles = {}
        for f in files:
            h = safe_open(str(folder / f), framework="pt")
            self._handles[f] = h
            for k in h.keys():
                self.where[k] = f

    def dtype(self) -> torch.dtype:
        """The dtype of the base's plain (not MXFP4) weights; the merge works in it."""
        codes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        for k, f in self.where.items():
            if not k.endswith(("_blocks", "_scales")):
                return codes.get(self._handles[f].get_slice(k).get_dtype(), torch.bfloat16)
        return torch.bfloat16

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if name in self.where:
            return self._handles[self.where[name]].get_tensor(name).to(dtype)
        if name + "_blocks" in self.where:  # published checkpoints keep experts in MXFP4
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            # transformers dequantizes straight into the (experts, in, out) layout its GptOssExperts uses
            return convert_moe_packed_tensors(*self.packed(name), dtype=dtype)
        raise GptossError(f"base weights in {self.folder} have no tensor {name!r}")

    def location(self, name: str) -> str:
        """The file holding ``name`` (dense, or its MXFP4 blocks), for messages."""
        return str(self.folder / self.where.get(name, self.where.get(name + "_blocks", "?")))

    def is_packed(self, name: str) -> bool:
        """Whether the base holds the expert weight ``name`` in MXFP4 (``name_blocks`` + ``name_scales``)."""
        return name not in self.where and name + "_blocks" in self.where

    def packed_shapes(self, name: str) -> tuple[tuple, tuple]:
        """The stored shapes of ``name``'s blocks and scales, checked against each other without reading them:
        uint8 both, blocks (..., groups, 16) and scales (..., groups)."""
        b, s = name + "_blocks", name + "_scales"
        if s not in self.where:
            raise GptossError(f"{self.folder / self.where[b]}: {b} has no {s} beside it in the base weights")
        sl = {k: self._handles[self.where[k]].get_slice(k) for k in (b, s)}
        shape = {k: tuple(int(d) for d in sl[k].get_shape()) for k in (b, s)}
        files = f"{b} in {self.folder / self.where[b]}, {s} in {self.folder / self.where[s]}"
        if sl[b].get_dtype() != "U8" or sl[s].get_dtype() != "U8":
            raise GptossError(f"MXFP4 blocks and scales must be uint8: {b} is {sl[b].get_dtype()}, {s} is {sl[s].get_dtype()} ({files})")
        if len(shape[b]) < 2 or shape[b][-1] != 16 or shape[b][:-1] != shape[s]:
            raise GptossError(f"MXFP4 {b} {shape[b]} does not match {s} {shape[s]}: blocks must be (..., groups, 16) "
                              f"over scales (..., groups) ({files})")
        return shape[b], shape[s]

    def packed(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert weight ``name`` as the base stores it: (blocks, scales), bytes untouched."""
        self.packed_shapes(name)
        get = lambda k: self._handles[self.where[k]].get_tensor(k)  # noqa: E731
        return get(name + "_blocks"), get(name + "_scales")


def base_config(folder: Path) -> dict | None:
    """A base folder's config.json, or None when it has none that parses (``merged.holds_mxfp4`` reads it)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def resolve_base(home: str, model_name: str | None, base: str | None, cache: Path, signed: bool = False) -> Path | None:
    """Base weights: an explicit --base, else the run's <home>/base/ (verified against its manifest),
    else the spec's model.name."""
    if not base and (folder := local_output(join(home, "base"), cache / "base", signed=signed)) is not None:
        return folder
    candidates = [base] if base else [model_name]
    for ref in candidates:
        if not ref:
            continue
        if is_remote(ref):
            s = open_store(ref)
            if not download_prefix(s, "", cache / "base", where=ref) and not (cache / "base").is_dir():
                continue
            return cache / "base"
        p = Path(ref.removeprefix("file://"))
        if (p / "config.json").is_file():
            return p
        if ref in HUB_IDS or ("/" in ref and not p.exists()):
            try:
                from huggingface_hub import snapshot_download

                from gptoss_cloud.contract.hub_files import WEIGHT_INCLUDE

                # The same files (and HF_HUB_CACHE) as the trainer and the pod's init container.
                return Path(snapshot_download(HUB_IDS.get(ref, ref), allow_patterns=list(WEIGHT_INCLUDE)))
            except Exception as e:  # offline, not installed, gated
                raise GptossError(f"cannot fetch base weights {ref!r} from the hub ({type(e).__name__})",
                                  hint="pass --base with a local folder or s3:// prefix holding the base model") from None
    return None
