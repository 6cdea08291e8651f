"""The training loop: packed micro-batches, a loss averaged over trained tokens counted globally, AdamW.

Loss normalisation: every micro-batch returns the *sum* of its token losses and its trained-token
count. Before the first backward of an optimizer step, the step's trained tokens are summed over all
its micro-batches and all ranks (one all-reduce); each rank then back-propagates
``loss_sum * world_size / global_tokens`` (FSDP averages gradients over ranks), so the update is the
gradient of the mean over every trained token of the step, whatever the packing or the rank split.

The data position (epoch, index into that epoch's seeded order) is a Stateful object, and the loop
hands a checkpointer the whole state at each step (``CheckpointHooks`` below; a no-op by default).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from gptoss_cloud.contract.plan.flops import attended_keys
from gptoss_cloud.contract.sections import OptimSection

from gptoss_cloud.trainer.kernels.loss import IGNORE_INDEX, shift_packed_labels
from gptoss_cloud.trainer.causal_lm import Batch, run_batch
from gptoss_cloud.trainer.parallel import DistInfo, all_reduce_sum


# ------------------------------------------------------------------------------------ data position
class DataPosition:
    """Where the loop is in the data: epoch and index into that epoch's order (Stateful-like).

    The order of epoch ``e`` is a permutation seeded by (seed, e), so (epoch, index) is the whole
    state: restoring it resumes on exactly the next sample.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("the training split is empty: nothing to train on")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            order = list(range(self.num_samples))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._order = order
        return self._order

    def take(self, n: int) -> list[int]:
        """The next ``n`` sample indices (across the epoch boundary if needed)."""
        out = []
        while len(out) < n:
            order = self._epoch_order()
            k = min(n - len(out), self.num_samples - self.index)
            out += order[self.index:self.index + k]
            self.index += k
            if self.index >= self.num_samples:
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return out

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.index / self.num_samples

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint data position was for {state['num_samples']} samples / seed {state['seed']}, "
                f"this run has {self.num_samples} / {self.seed}: the dataset or data.seed changed"
            )
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


# -------------------------------------------------------------------------------------- checkpoint hook
@dataclass
class TrainState:
    """Everything a checkpoint needs; ``step`` counts finished optimizer steps."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: DataPosition
    step: int = 0
    tokens: int = 0  # trained tokens so far, all ranks
    extra: dict = field(default_factory=dict)


@runtime_checkable
class CheckpointHooks(Protocol):
    """What the loop (and ``run_training`` around it) calls on a checkpointer, all of it:
    ``gptoss_cloud.trainer.checkpoint.checkpointer.Checkpointer`` is the real one, ``NoCheckpoints`` the no-op."""

    events: list[dict]  # one record per finished save (this rank's measurements); rank 0's go in the summary

    def restore(self, state: TrainState) -> int:
        """Load the latest checkpoint into ``state`` (in place: module, optimizer, scheduler, data, step);
        returns its step, 0 when starting fresh."""

    def maybe_save(self, step: int, state: TrainState, *, final: bool = False) -> bool:
        """Called after every optimizer step, and once more with ``final=True`` at the end; True if it saved."""

    def before_update(self) -> None:
        """Called before each optimizer step changes the state (an async save may still be copying it)."""

    def close(self) -> None:
        """Called once training ends: a save still in flight is published (or its error raised) first."""


class NoCheckpoints:
    """``CheckpointHooks`` that keep nothing (benchmarks, tests)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def restore(self, state: TrainState) -> int:
        return 0

    def maybe_save(self, step: int, state: TrainState, *, final: bool = False) -> bool:
        return False

    def before_update(self) -> None:
        return None

    def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------- optimizer
def make_optimizer(params: Sequence[nn.Parameter], optim: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` names (trainer/optim.py: fused AdamW or torchao's low-bit AdamW)."""
    from gptoss_cloud.trainer.optim import make_optimizer as build

    return build(params, optim, device)


def lr_factor(step: int, total: int, optim: OptimSection) -> float:
    """Linear warmup to 1, then constant or cosine down to ``min_lr_ratio`` at ``total``."""
    warm = optim.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if optim.schedule == "constant":
        return 1.0
    span = max(1, total - warm)
    progress = min(1.0, (step - warm) / span)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, optim: OptimSection):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, optim))


def total_steps(optim: OptimSection, num_samples: int, world_size: int) -> int:
    if optim.max_steps:
        return optim.max_steps
    per_step = world_size * optim.micro_batch_size * optim.grad_accum
    return max(1, math.ceil((optim.epochs or 1.0) * num_samples / per_step))


# -------------------------------------------------------------------------------------------- loop
@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float
    trained_tokens: int  # this step, all ranks
    processed_tokens: int  # packed positions this step, all ranks
    seconds: float
    aux_loss: float | None = None
    eval_loss: float | None = None
    # The step split (Loop.step_split): building the micro-batches (+ the token-count all-reduce),
    # forward+backward of every micro-batch, and clipping + optimizer + scheduler step.
    data_s: float | None = None
    fwd_bwd_s: float | None = None
    optimizer_s: float | None = None
    # (query, key) pairs the full and sliding attention layers computed this step, all ranks: the
    # attention term of the step's FLOPs (flops.flops_from_pairs).
    attended_full: int = 0
    attended_sliding: int = 0


@dataclass
class LoopResult:
    steps: int
    final_loss: float | None
    eval_loss: float | None
    tokens: int
    seconds: float
    history: list[StepStats]


@dataclass
class Loop:
    """One run's loop. ``samples`` and ``val_samples`` are PackedSample-like objects (full lists on every rank)."""

    module: nn.Module
    config: Any  # the GptOssConfig, for the attention masks
    optimizer: torch.optim.Optimizer
    optim: OptimSection
    info: DistInfo
    samples: Sequence[Any]
    val_samples: Sequence[Any] = ()
    compute_dtype: torch.dtype = torch.float32
    shuffle: bool = True
    checkpointer: CheckpointHooks = field(default_factory=NoCheckpoints)
    on_step: Callable[[StepStats, TrainState], None] | None = None
    on_eval: Callable[[int, float], None] | None = None
    steps: int = 0
    autocast: bool = False  # bf16 autocast (single-GPU path without FSDP mixed precision)
    # optim.step_split: time each step's phases (StepStats.data_s / fwd_bwd_s / optimizer_s). On a GPU
    # this synchronizes the device before and after the optimizer step, so it is off unless asked for.
    step_split: bool = False

    def __post_init__(self) -> None:
        self.steps = self.steps or total_steps(self.optim, len(self.samples), self.info.world_size)
        self.scheduler = make_scheduler(self.optimizer, self.steps, self.optim)
        self.state = TrainState(self.module, self.optimizer, self.scheduler, DataPosition(len(self.samples), self.optim.seed, self.shuffle))
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.aux_coef = self.optim.router_aux_loss_coef
        self._token_counts: dict[int, tuple[int, int, int, int]] = {}

    # ------------------------------------------------------------------------------------ one step
    def _micro_batches(self) -> tuple[list[Batch], list[int]]:
        """This rank's micro-batches, and the sample indices every rank trains on this step."""
        mb, W, r = self.optim.micro_batch_size, self.info.world_size, self.info.rank
        out, everyone = [], []
        for _ in range(self.optim.grad_accum):
            step_idx = self.state.data.take(mb * W)
            idx = step_idx[r * mb:(r + 1) * mb]
            out.append(Batch.from_samples([self.samples[i] for i in idx], self.info.device))
            everyone += step_idx
        return out, everyone

    def _tokens(self, i: int) -> tuple[int, int, int, int]:
        """(trained, processed, full-attention pairs, sliding-attention pairs) of sample ``i``, counted on
        the host once. Every rank holds every sample, so each rank sums the whole step's counts itself:
        no collective and no device sync before the forward."""
        got = self._token_counts.get(i)
        if got is None:
            s = self.samples[i]
            targets = shift_packed_labels(torch.tensor([s.labels], dtype=torch.long), [list(s.seq_lens)])
            window = getattr(self.config, "sliding_window", None) or len(s.input_ids)
            got = self._token_counts[i] = (int((targets != IGNORE_INDEX).sum()), len(s.input_ids),
                                           *attended_keys(s.seq_lens, window))
        return got

    def _forward(self, batch: Batch):
        ctx = torch.autocast(self.info.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            return run_batch(self.module, batch, self.config, self.compute_dtype)

    def train_step(self) -> StepStats:
        t0 = time.perf_counter()
        self.module.train()
        batches, everyone = self._micro_batches()
        counts = [self._tokens(i) for i in everyone]
        trained_global, processed_global = sum(c[0] for c in counts), sum(c[1] for c in counts)
        t_data = time.perf_counter()
        scale = self.info.world_size / max(1, trained_global)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
        for b in batches:
            ls, _, aux = self._forward(b)
            total = ls * scale
            if self.aux_coef and aux is not None:
                total = total + self.aux_coef * aux / len(batches)
                aux_sum += aux.detach().double() / len(batches)
            total.backward()
            loss_sum += ls.detach().double()
        split = self.step_split
        if split:
            self._sync()  # backward's kernels (and FSDP's gradient reduce-scatters) finish here
        t_bwd = time.perf_counter()
        norm = self._clip()  # a device tensor: reading it here would stall the launch of the optimizer step
        self.checkpointer.before_update()  # an async save may still be copying the state this step changes
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if split:
            self._sync()
        t_opt = time.perf_counter()
        grad_norm = float(norm)
        loss_global = float(all_reduce_sum(loss_sum, self.info)) / max(1, trained_global)
        aux_mean = None
        if self.aux_coef:
            aux_mean = float(all_reduce_sum(aux_sum, self.info)) / self.info.world_size
        self.state.step += 1
        self.state.tokens += trained_global
        stats = StepStats(self.state.step, loss_global, self.scheduler.get_last_lr()[0], grad_norm, trained_global,
                          processed_global, time.perf_counter() - t0, aux_mean,
                          attended_full=sum(c[2] for c in counts), attended_sliding=sum(c[3] for c in counts))
        if split:
            stats.data_s, stats.fwd_bwd_s, stats.optimizer_s = (round(t_data - t0, 4), round(t_bwd - t_data, 4),
                                                                round(t_opt - t_bwd, 4))
        return stats

    def _sync(self) -> None:
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)

    def _clip(self) -> torch.Tensor:
        max_norm = self.optim.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        full = getattr(norm, "full_tensor", None)
        return full() if callable(full) else norm

    # ------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over every trained token of the validation split (rows spread over ranks)."""
        if not self.val_samples:
            return None
        self.module.eval()
        W, r = self.info.world_size, self.info.rank
        n = len(self.val_samples)
        rows = list(range(r, n, W))
        # Every rank runs the same number of forwards (FSDP all-gathers in lockstep); extras count 0.
        per_rank = math.ceil(n / W)
        acc = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        mb = self.optim.micro_batch_size
        for start in range(0, per_rank, mb):
            idx = rows[start:start + mb]
            real = bool(idx)
            batch = Batch.from_samples([self.val_samples[i] for i in (idx or [0])], self.info.device)
            ls, cnt, _ = self._forward(batch)
            if real:
                acc[0] += ls.double()
                acc[1] += cnt.double()
        all_reduce_sum(acc, self.info)
        self.module.train()
        return float(acc[0] / acc[1]) if acc[1] > 0 else None

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> LoopResult:
        torch.manual_seed(self.optim.seed)
        self.checkpointer.restore(self.state)
        t0 = time.perf_counter()
        history: list[StepStats] = []
        eval_loss = None
        while self.state.step < self.steps:
            stats = self.train_step()
            history.append(stats)
            ev = self.optim.eval_every
            if ev and stats.step % ev == 0 and stats.step < self.steps:
                stats.eval_loss = eval_loss = self.evaluate()
            if self.on_step:
                self.on_step(stats, self.state)
            self.checkpointer.maybe_save(stats.step, self.state)
        eval_loss = self.evaluate()
        if self.on_eval and eval_loss is not None:
            self.on_eval(self.state.step, eval_loss)
        self.checkpointer.maybe_save(self.state.step, self.state, final=True)
        return LoopResult(self.state.step, history[-1].loss if history else None, eval_loss, self.state.tokens,
                          time.perf_counter() - t0, history)

