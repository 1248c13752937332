"""``WRecorder``: the TrainerCallback that records W at every optimizer step into a RecordingWriter.

Order within one update (HF Trainer): on_pre_optimizer_step (clipped grads present) -> optimizer.step
-> on_optimizer_step -> scheduler, zero_grad, global_step += 1 -> on_step_end. We read per-row gradient
norms and the lr before the step, and W, update norms and Adam's second moment after it. All math
runs on W's device; on CUDA the results are copied into pinned buffers without a host sync and a
writer thread waits on a CUDA event before writing them (training blocks when all buffers are in
flight, so no step is ever dropped). On CPU and MPS the write is synchronous.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from .config import N_LIVE, RecordConfig
from .errors import DucklingError
from .model import embedding_matrices
from .recording import check_budget, snapshot_parts
from .writer import RecordingWriter


class _SyncSink:
    """CPU/MPS: write each step as it comes (tensors -> numpy, no extra copy on CPU)."""

    def __init__(self, writer: RecordingWriter):
        self.writer = writer

    def submit(self, step: int, lr: float, tensors: dict, snapshot: bool) -> None:
        host = {k: t.cpu().numpy() for k, t in tensors.items()}
        _append(self.writer, step, lr, host, snapshot)

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


def _append(writer: RecordingWriter, step: int, lr: float, host: dict, snapshot: bool) -> None:
    """host: {"scalars": (n_matrices * 4 * V + d,) float32, "snap/<m>/<ext>": array} as numpy."""
    lay, mats = writer.layout, writer.layout.matrices
    n = len(mats) * 4 * lay.n_rows
    rows = host["scalars"][:n].reshape(len(mats), 4, lay.n_rows)  # (n_matrices, 4, V)
    snap = None
    if snapshot:
        snap = {m: {ext: host[f"snap/{m}/{ext}"].view(dt) for ext, _, dt in lay.parts} for m in mats}
    writer.append_step(step, dict(zip(mats, rows)), host["scalars"][n:], lr, snap)


class _AsyncSink:
    """CUDA: a pool of pinned buffer sets, a bounded queue and one writer thread (also runs on CPU,
    without pinning or events, which the tests use to exercise the thread)."""

    def __init__(self, writer: RecordingWriter, n_buffers: int, cuda: bool):
        self.writer, self.n_buffers, self.error, self.cuda = writer, max(1, n_buffers), None, cuda
        self.reported = False
        self.free: queue.Queue = queue.Queue()
        self.work: queue.Queue = queue.Queue()
        self.n_made = 0
        self.thread = threading.Thread(target=self._run, name="duckling-recorder", daemon=True)
        self.thread.start()

    def _buffers(self, tensors: dict) -> dict:
        if self.free.empty() and self.n_made < self.n_buffers:  # grow the pool lazily up to its size
            self.n_made += 1
            buf = {}
        else:
            buf = self.free.get()  # blocks: training waits for the writer, never drops a step
        for k, t in tensors.items():  # snapshot buffers appear at the first snapshot step
            if k not in buf:
                buf[k] = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda)
        return buf

    def submit(self, step: int, lr: float, tensors: dict, snapshot: bool) -> None:
        self.raise_error(again=True)
        buf = self._buffers(tensors)
        for k, t in tensors.items():
            buf[k].copy_(t, non_blocking=self.cuda)
        event = torch.cuda.Event() if self.cuda else None
        if event is not None:
            event.record()
        self.work.put((buf, event, step, lr, snapshot))

    def _run(self) -> None:
        while (item := self.work.get()) is not None:
            buf, event, step, lr, snapshot = item
            try:
                if self.error is None:  # after a failure, only hand buffers back
                    if event is not None:
                        event.synchronize()
                    _append(self.writer, step, lr, {k: v.numpy() for k, v in buf.items()}, snapshot)
            except BaseException as e:  # surfaced in the training thread by raise_error()
                self.error = e
            finally:
                self.free.put(buf)
                self.work.task_done()
        self.work.task_done()

    def raise_error(self, again: bool = False) -> None:
        """Raise the writer thread's failure (sticky: no later step is written; close() reports it
        only if nobody has yet)."""
        if self.error is not None and (again or not self.reported):
            self.reported = True
            if isinstance(self.error, DucklingError):
                raise self.error
            raise DucklingError(f"the recording writer failed: {self.error!r}. Steps written so far are "
                                f"kept; fix the cause and resume from the last checkpoint.") from self.error

    def drain(self) -> None:
        self.work.join()
        self.raise_error()

    def close(self) -> None:
        self.work.put(None)
        self.thread.join()


class WRecorder(TrainerCallback):
    """Records W (and ``lm_head`` when untied) into ``run_dir/recording`` during ``Trainer.train``.

    Snapshot N = W after N updates; step 0 = initialisation (recorded in on_train_begin unless the
    Trainer resumes at global_step > 0, in which case the recording is truncated to that step and
    continued). Call ``close()`` in a ``finally`` block: the Trainer does not call callbacks on errors.
    """

    default_async: bool | None = None  # writer thread when async_write is None: None = on CUDA only

    def __init__(self, run_dir, record_cfg: RecordConfig | None = None, n_live: int = N_LIVE,
                 probe_ids: torch.Tensor | None = None, extra_meta: dict | None = None,
                 async_write: bool | None = None):
        self.run_dir, self.cfg = Path(run_dir), record_cfg or RecordConfig()
        self.n_live, self.extra_meta = n_live, extra_meta or {}
        self.probe_ids = probe_ids  # (B, T) compact ids of the fixed probe batch, or None
        self.async_write = async_write  # None = a writer thread on CUDA only
        self.writer: RecordingWriter | None = None
        self.sink = None
        self.recorded_steps: list[int] = []  # snapshot steps recorded by this session
        self._hook = None
        self._closed = self._ended = False

    # --- set-up ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.model, self.optimizer = model, optimizer
        self.mats = embedding_matrices(model)  # {"wte": (V, d)[, "lm_head": (V, d)]}
        w = self.mats["wte"]
        V, d = w.shape
        start = state.global_step
        check_budget(self.run_dir, self.cfg, state.max_steps, shape=(V, d), n_live=self.n_live,
                     n_matrices=len(self.mats), start_step=start)
        self.writer = RecordingWriter(
            self.run_dir, shape=(V, d), n_live=self.n_live, precision=self.cfg.dtype,
            every=self.cfg.every, chunk_steps=self.cfg.chunk_steps, matrices=tuple(self.mats),
            extra_meta={"max_steps": state.max_steps, "learning_rate": args.learning_rate,
                        "weight_decay": args.weight_decay,
                        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                        "warmup_steps": args.warmup_steps, "record_config": vars(self.cfg), **self.extra_meta},
            resume_step=start if start > 0 else None)
        self.parts = snapshot_parts(self.cfg.dtype, V, self.n_live)
        cuda = w.device.type == "cuda"
        use_thread = next(x for x in (self.async_write, self.default_async, cuda) if x is not None)
        self.sink = _AsyncSink(self.writer, self.cfg.queue_size, cuda) if use_thread else _SyncSink(self.writer)
        # Preallocated device buffers: the per-step math allocates nothing and launches few kernels.
        dev, n_m = w.device, len(self.mats)
        self.prev = {m: p.detach().float().clone() for m, p in self.mats.items()}  # W_{N-1}, float32
        self.delta = torch.empty(V, d, device=dev)  # W_N - W_{N-1}
        self.scalars = torch.full((n_m * 4 * V + d,), float("nan"), device=dev)  # every float32 of a step
        self.rows = self.scalars[: n_m * 4 * V].view(n_m, 4, V)  # [matrix, norm|update|grad|adam_v, row]
        self.hidden = self.scalars[n_m * 4 * V:]  # (d,) mean ln_f output of the step's batch
        self.bits = {m: torch.empty(sl.stop - sl.start, d, dtype=torch.bfloat16, device=dev)
                     for m in self.mats for ext, sl, _ in self.parts if ext == "u16"}
        self.lr = float("nan")
        # W's parameter group, found once: the scheduler updates its "lr" in place every step
        self._lr_group = next((g for g in getattr(optimizer, "param_groups", [])
                               if any(q is w for q in g["params"])), None)
        self.hidden_sum = torch.zeros(d, device=dev)
        self.hidden_n = 0
        self._hook = model.transformer.ln_f.register_forward_hook(self._on_ln_f)
        if start == 0:
            self._record(0)

    def _on_ln_f(self, module, inputs, output):
        if module.training:  # training forwards only (not eval, not the probe)
            self.hidden_sum += output.detach().float().mean(dim=(0, 1))  # (B, T, d) -> (d,)
            self.hidden_n += 1

    # --- per step -------------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # the async copy of the previous step's buffers is stream-ordered before these writes
        for i, p in enumerate(self.mats.values()):
            if p.grad is None:
                self.rows[i, 2].fill_(float("nan"))
            else:
                torch.linalg.vector_norm(p.grad.detach().float(), dim=1, out=self.rows[i, 2])  # (V,)
        self.lr = float("nan") if self._lr_group is None else self._lr_group["lr"]

    def on_step_end(self, args, state, control, **kwargs):
        self._record(state.global_step, last=state.global_step >= state.max_steps)
        if control.should_save or control.should_training_stop:  # a checkpoint must be covered
            self.sink.drain()

    @torch.no_grad()
    def _record(self, step: int, last: bool = False) -> None:
        snapshot = step % self.cfg.every == 0 or last
        tensors = {"scalars": self.scalars}
        for i, (m, p) in enumerate(self.mats.items()):
            w, r = p.detach().float(), self.rows[i]  # (V, d): no copy for float32 parameters; (4, V)
            torch.linalg.vector_norm(w, dim=1, out=r[0])
            if step == 0 or self.optimizer is None:  # initialisation: no update, gradient or Adam state yet
                r[1].zero_(), r[2].fill_(float("nan")), r[3].fill_(float("nan"))
            else:
                torch.linalg.vector_norm(torch.sub(w, self.prev[m], out=self.delta), dim=1, out=r[1])
                v = self.optimizer.state.get(p, {}).get("exp_avg_sq")
                if v is not None and v.shape == p.shape:
                    torch.mean(v.float(), dim=1, out=r[3])
                else:
                    r[3].fill_(float("nan"))
            self.prev[m].copy_(w)
            if snapshot:
                for ext, sl, _ in self.parts:
                    if ext == "u16":  # round to bf16 on the device: half the bytes to copy
                        tensors[f"snap/{m}/{ext}"] = self.bits[m].copy_(w[sl]).view(torch.int16)
                    else:  # may alias live W: the sync sink writes it now, the async copy is
                        tensors[f"snap/{m}/{ext}"] = w[sl]  # stream-ordered before the next update
        if self.hidden_n:
            torch.div(self.hidden_sum, self.hidden_n, out=self.hidden)
        else:
            self.hidden.fill_(float("nan"))
        self.sink.submit(step, self.lr, tensors, snapshot)
        self.hidden_sum.zero_()
        self.hidden_n = 0
        if snapshot:
            self.recorded_steps.append(step)
        if self.probe_ids is not None and self.cfg.probe_every and step % self.cfg.probe_every == 0:
            self._probe(step)

    @torch.no_grad()
    def _probe(self, step: int) -> None:
        """Dead-token softmax mass on the fixed probe batch (eval mode: no dropout, no RNG use)."""
        was_training = self.model.training
        self.model.eval()
        try:
            ids = self.probe_ids.to(self.mats["wte"].device)
            probs = torch.softmax(self.model(input_ids=ids).logits.float(), dim=-1)  # (B, T, V)
            dead = probs[..., self.n_live:]
            mass, top = dead.sum(-1).mean().item(), dead.max().item()  # one sync per probe
        finally:
            self.model.train(was_training)
        self.sink.drain()  # keep probe.f32 behind the steps it refers to
        self.writer.append_probe(step, mass, top)

    # --- the end --------------------------------------------------------------------------------
    def on_train_end(self, args, state, control, **kwargs):
        self._ended = True
        self.close()

    def close(self, status: str | None = None) -> None:
        """Flush every queued step, close the files and finalise meta.json. Safe to call twice."""
        if self._closed or self.writer is None:
            return
        self._closed = True
        if self._hook is not None:
            self._hook.remove()
        error = None
        try:
            self.sink.drain()
        except DucklingError as e:
            error = e
        finally:
            self.sink.close()
            failed = error is not None or self.writer.failed
            self.writer.close(status or ("failed" if failed else "complete" if self._ended else "interrupted"))
        if error is not None:
            raise error
