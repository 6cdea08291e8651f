"""Where a merge's files go and how the weights are laid out in them: streamed safetensors shards with
their index, the adapter on its own, and the folder's manifest, written last (signed with the checkpoint
key when one is set)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from gptoss_cloud.contract.outputs import entries as output_entries
from gptoss_cloud.contract.outputs import publish as publish_output
from gptoss_cloud.contract.outputs import replace_local
from gptoss_cloud.contract.store.objects import is_remote, open_store

from gptoss_cloud.trainer.checkpoint import shards as st
from gptoss_cloud.trainer.checkpoint.manifest import signing_key
from gptoss_cloud.trainer.merge.base import Source


class Sink:
    """Where output files go: the local folder itself, or S3 through a one-file staging folder."""

    def __init__(self, out: str, stage: Path):
        self.remote = is_remote(out)
        self.store = open_store(out)
        self.dir = stage / "out" if self.remote else Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.written: list[str] = []
        self.entries: dict[str, dict] = {}
        self.bytes = 0

    def path(self, name: str) -> Path:
        return self.dir / name

    def done(self, name: str) -> None:
        self.bytes += (self.dir / name).stat().st_size
        self.entries.update(output_entries(self.dir, [name]))  # hashed here, before it leaves this machine
        if self.remote:
            self.store.upload_file(self.dir / name, name)
            (self.dir / name).unlink()
        self.written.append(name)

    def publish(self) -> None:
        """The folder's manifest, last: signed with the checkpoint key when one is set."""
        if self.remote:
            publish_output(self.store, self.entries, signing_key())
        else:
            replace_local(self.dir, self.entries, signing_key())


def write_model(sink: Sink, entries, get: Callable[[str], torch.Tensor], shard_bytes: int) -> list[str]:
    shards = st.plan_shards(entries, shard_bytes)
    names = st.shard_names(len(shards))
    for shard, fname in zip(shards, names):
        st.write_shard(sink.path(fname), shard, get)
        sink.done(fname)
    st.write_index(sink.path("model.safetensors.index.json"), shards, names)
    sink.done("model.safetensors.index.json")
    return names



def write_adapter(src: Source, adapter_cfg: dict, out: str, tmp: Path) -> None:
    """The adapter on its own, in peft's format (adapter_model.safetensors + adapter_config.json)."""
    from safetensors.torch import save_file

    keys = sorted(src.model_entries())
    tensors = src.load(keys)  # adapters are small: all at once
    renamed = {k.replace(".default.", ".").replace(".default", ""): v.contiguous() for k, v in tensors.items()}
    sink = Sink(out, tmp / "adapter")
    save_file(renamed, str(sink.path("adapter_model.safetensors")), metadata={"format": "pt"})
    sink.done("adapter_model.safetensors")
    sink.path("adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
    sink.done("adapter_config.json")
    sink.publish()


