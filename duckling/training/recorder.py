"""``WRecorder``: the TrainerCallback that records W at every optimizer step into a RecordingWriter.

Order within one update (HF Trainer): forward(s) -> backward -> clip -> on_pre_optimizer_step ->
optimizer.step -> on_optimizer_step -> scheduler, zero_grad, global_step += 1 -> on_step_end.

Nothing of the recorder runs inside the (compiled) model: the Trainer subclass asks the model for its
final hidden state (``output_hidden_states``, after ln_f) and hands it to ``observe_hidden`` outside
the graph. In ``on_optimizer_step`` (clipped gradients still present, W and Adam's state updated, the
lr not yet stepped) one function, ``update_math``, writes every per-step float32 of the update into
preallocated buffers; on CUDA with a compiled model it is itself compiled (a couple of kernels instead
of ~10 per matrix). ``on_step_end`` copies the buffers into a slot of the shared ring of the writer
process (``duckling.recording.process``), which appends and compacts the recording in its own process:
on CUDA a non-blocking copy into the ring registered as pinned memory, handed over once a CUDA event
says it is done (queried on later steps, never synchronized); on CPU and MPS a plain copy. Training
waits only when every slot is in flight, so no step is ever dropped. The dead-token probe is
computed on the device and travels with its step, so the training thread never waits for it.
"""
from __future__ import annotations

import collections
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from duckling.config import N_LIVE, RecordConfig
from duckling.errors import DucklingError
from duckling.training.model import embedding_matrices
from duckling.recording.budget import check_budget
from duckling.recording.layout import snapshot_parts
from duckling.recording.process import WriterProcess, auto_procs, step_fields

NAN = float("nan")


def update_math(ws, prevs, grads, adam_vs, rows, bits, hidden_parts, hidden, first: bool = False) -> None:
    """Every float32 the recorder keeps for one update, written into preallocated buffers.

    ws: the recorded matrices (V, d); prevs: float32 copies of them before the update (refreshed
    here); grads / adam_vs: their clipped gradients and Adam exp_avg_sq (V, d), or None; rows:
    (n_matrices, 4, V) [norm | update_norm | grad_norm | adam_v]; bits: per matrix a list of
    (row slice, bf16 buffer) to round this step's snapshot into, empty when not snapshotting;
    hidden_parts: the (d,) mean final hidden state of each forward of the update; hidden: (d,) their
    mean, NaN when there is none. ``first``: step 0, initialisation (no update, gradient or state).
    Pure tensor code (no host sync, no Python state), so ``torch.compile(fullgraph=True)`` takes it
    whole; eager it computes exactly what the per-op recorder always did.
    """
    for i, w in enumerate(ws):
        w, r = w.detach().float(), rows[i]  # (V, d): no copy for float32 parameters; (4, V)
        torch.linalg.vector_norm(w, dim=1, out=r[0])
        if first:
            r[1].zero_()
        else:
            torch.linalg.vector_norm(w - prevs[i], dim=1, out=r[1])
        if grads[i] is None:
            r[2].fill_(NAN)
        else:
            torch.linalg.vector_norm(grads[i].detach().float(), dim=1, out=r[2])
        if adam_vs[i] is None:
            r[3].fill_(NAN)
        else:
            torch.mean(adam_vs[i].detach().float(), dim=1, out=r[3])
        prevs[i].copy_(w)
        for sl, buf in bits[i]:  # round to bf16 on the device: half the bytes to copy
            buf.copy_(w[sl])
    if hidden_parts:
        h = hidden_parts[0]
        for part in hidden_parts[1:]:  # gradient accumulation: several forwards per update
            h = h + part
        torch.div(h, len(hidden_parts), out=hidden)
    else:
        hidden.fill_(NAN)


def probe_mass(model, ids: torch.Tensor, n_live: int) -> torch.Tensor:
    """(2,) [total dead softmax mass (mean over positions), max dead prob] of ``model`` on ``ids``,
    left on the device. Compiled, transformers' eager-only input checks (a padding scan and a packed-
    sequence scan, each a host sync) are skipped, so nothing waits for the device."""
    probs = torch.softmax(model(input_ids=ids).logits.float(), dim=-1)  # (B, T, V)
    dead = probs[..., n_live:]
    return torch.stack([dead.sum(-1).mean(), dead.max()])


class _Sink:
    """The training process's side of the writer process (``duckling.recording.process``): each
    step's device buffers are copied into a free slot of the shared ring, and the slot is handed over
    with one small message once the copy is complete. On CUDA the ring is registered as pinned memory,
    the copy is non-blocking, and a CUDA event per slot is queried on later steps (never synchronized)
    so that only finished copies are handed over, in order; on CPU and MPS the copy is done at once."""

    def __init__(self, proc: WriterProcess, device: torch.device):
        self.proc, self.cuda = proc, device.type == "cuda"
        self.pending: collections.deque = collections.deque()  # CUDA: (slot, event, message) in flight
        self._registered = None
        if self.cuda:
            self._register()
        tdt = {np.dtype(np.float32): torch.float32, np.dtype(np.uint16): torch.int16}  # u16: bf16 bits
        ring = proc.ring
        self.views = [{k: torch.frombuffer(ring.shm.buf, dtype=tdt[dt], count=int(np.prod(shape)),
                                           offset=ring.field(i, k)[0]).view(shape)
                       for k, shape, dt in ring.fields} for i in range(ring.n)]
        self.events = [torch.cuda.Event() for _ in range(ring.n)] if self.cuda else None

    def _register(self) -> None:
        """Page-lock the ring in place (cudaHostRegister), so that the device writes into the shared
        slots directly; if the driver refuses, the copies are synchronous (correct, slower)."""
        buf = self.proc.ring.shm.buf
        ptr = np.ndarray((len(buf),), np.uint8, buffer=buf).ctypes.data
        rc = torch.cuda.cudart().cudaHostRegister(ptr, len(buf), 0)
        if int(getattr(rc, "value", rc)) == 0:
            self._registered = ptr
        else:
            self.cuda = False
            warnings.warn(f"duckling: cudaHostRegister of the recording ring failed ({rc}); the recorder "
                          f"copies each step synchronously.", stacklevel=2)

    def submit(self, step: int, lr: float, tensors: dict, snapshot: bool) -> None:
        slot = self._acquire()
        dst = self.views[slot]
        for k, t in tensors.items():
            dst[k].copy_(t, non_blocking=self.cuda)
        msg = (step, lr, snapshot, "probe" in tensors)
        if self.cuda:
            self.events[slot].record()
            self.pending.append((slot, self.events[slot], msg))
        else:
            self.proc.hand(slot, *msg)

    def _hand_ready(self, wait: bool = False) -> None:
        """Hand over every slot whose copy has finished (``wait``: all of them, polling)."""
        while self.pending:
            slot, event, msg = self.pending[0]
            if not event.query():
                if not wait:
                    return
                time.sleep(1e-4)
                continue
            self.pending.popleft()
            self.proc.hand(slot, *msg)

    def _acquire(self) -> int:
        """A free slot: copies that have finished are handed over first; training waits only when
        every slot is in flight (on its copy or on the writer), and never drops a step."""
        self._hand_ready()
        while not self.proc.free and self.pending:
            self.proc.check()
            time.sleep(1e-4)  # the oldest copy is still on the device
            self._hand_ready()
        return self.proc.acquire()

    def drain(self) -> None:
        """Every submitted step handed over and written (a checkpoint must be covered)."""
        self._hand_ready(wait=True)
        self.proc.drain()

    def close(self, status: str) -> dict:
        """Hand over the copies in flight, have the writer finish with ``status``, release the ring."""
        try:
            if self.proc.error is None:
                self._hand_ready(wait=True)
        finally:
            for _, event, _ in self.pending or ():  # copies still in flight (the writer failed): they
                event.synchronize()  # land before the ring is unregistered (at close only)
            self.views = self.pending = None  # the ring's memory is exported to them
            if self._registered is not None:
                torch.cuda.cudart().cudaHostUnregister(self._registered)
                self._registered = None
            info = self.proc.close(status)
        return info


class WRecorder(TrainerCallback):
    """Records W (and ``lm_head`` when untied) into ``run_dir/recording`` during ``Trainer.train``.

    Snapshot N = W after N updates; step 0 = initialisation (recorded in on_train_begin unless the
    Trainer resumes at global_step > 0, in which case the recording is truncated to that step and
    continued). Call ``close()`` in a ``finally`` block: the Trainer does not call callbacks on errors.
    The mean final hidden state reaches it through ``observe_hidden`` (``DucklingTrainer.compute_loss``
    calls it for every training forward); under another Trainer that field is NaN.
    """

    defer: bool | None = None  # compact at close: None = on CPU and MPS (benchmarks/recording_size.py)
    writer_setup = None  # a picklable callable the writer process runs first (the tests inject faults)
    fuse: bool | None = None  # compile update_math and the probe: None = on CUDA when the model is compiled
    compile_backend = "inductor"  # (the tests use "aot_eager": same graphs, no code generation)

    def __init__(self, run_dir, record_cfg: RecordConfig | None = None, n_live: int = N_LIVE,
                 probe_ids: torch.Tensor | None = None, extra_meta: dict | None = None):
        self.run_dir, self.cfg = Path(run_dir), record_cfg or RecordConfig()
        self.n_live, self.extra_meta = n_live, extra_meta or {}
        self.probe_ids = probe_ids  # (B, T) compact ids of the fixed probe batch, or None
        self.sink: _Sink | None = None
        self.closing: dict = {}  # the writer's closing facts (close_compaction_s, last_step)
        self.recorded_steps: list[int] = []  # snapshot steps recorded by this session
        self.hidden_parts: list[torch.Tensor] = []  # (d,) per training forward of the current update
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
        cuda = w.device.type == "cuda"
        kwargs = dict(
            shape=(V, d), n_live=self.n_live, dtype=self.cfg.dtype, every=self.cfg.every, matrices=tuple(self.mats),
            extra_meta={"max_steps": state.max_steps, "learning_rate": args.learning_rate,
                        "weight_decay": args.weight_decay,
                        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                        "warmup_steps": args.warmup_steps, "record_config": vars(self.cfg), **self.extra_meta},
            resume_step=start if start > 0 else None)
        self.parts = snapshot_parts(self.cfg.dtype, V, self.n_live)
        probe = self.probe_ids is not None and bool(self.cfg.probe_every)
        procs = auto_procs() if self.cfg.writer_procs == "auto" else int(self.cfg.writer_procs)
        defer = not cuda if self.defer is None else self.defer
        proc = WriterProcess(self.run_dir, kwargs, step_fields(tuple(self.mats), (V, d), self.cfg.dtype,
                                                              self.n_live, probe),
                             self.cfg.queue_size, procs=procs, defer=defer, setup=self.writer_setup)
        try:
            self.sink = _Sink(proc, w.device)
        except BaseException:
            proc.close("failed")
            raise
        fuse = next(x for x in (self.fuse, cuda and bool(getattr(args, "torch_compile", False))) if x is not None)
        compiled = lambda f: torch.compile(f, fullgraph=True, dynamic=False, backend=self.compile_backend)  # noqa: E731
        self.math = compiled(update_math) if fuse else update_math
        self.probe_fn = compiled(probe_mass) if fuse else probe_mass
        # Preallocated device buffers: the per-step math allocates little and syncs nothing.
        dev, n_m = w.device, len(self.mats)
        self.prev = [p.detach().float().clone() for p in self.mats.values()]  # W_{N-1}, float32
        self.scalars = torch.full((n_m * 4 * V + d,), NAN, device=dev)  # every float32 of a step
        self.rows = self.scalars[: n_m * 4 * V].view(n_m, 4, V)  # [matrix, norm|update|grad|adam_v, row]
        self.hidden = self.scalars[n_m * 4 * V:]  # (d,) mean final hidden state of the step's batch
        self.bits = [[(sl, torch.empty(sl.stop - sl.start, d, dtype=torch.bfloat16, device=dev))
                      for ext, sl, _ in self.parts if ext == "u16"] for _ in self.mats]
        self.probe_dev = None if self.probe_ids is None else self.probe_ids.to(dev)  # once: H2D syncs
        self.lr = NAN
        self.step_ready = None  # (step, snapshot) whose buffers on_optimizer_step filled
        # W's parameter group, found once: the scheduler updates its "lr" in place every step
        self._lr_group = next((g for g in getattr(optimizer, "param_groups", [])
                               if any(q is w for q in g["params"])), None)
        self.hidden_parts = []
        if start == 0:
            self._compute(0, first=True, snapshot=True, math=update_math)
            self._submit(0)
            self.sink.drain()  # step 0 on disk before the first update: a disk that cannot take it stops the run at 0

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        """(B, T, d) final hidden state (after ln_f) of one training forward, outside the graph."""
        self.hidden_parts.append(hidden.detach().float().mean(dim=(0, 1)))  # (d,), stays on the device

    # --- per step -------------------------------------------------------------------------------
    def on_optimizer_step(self, args, state, control, **kwargs):
        # clipped gradients still present, W and Adam's state updated, the lr not yet stepped
        step = state.global_step + 1
        self.lr = NAN if self._lr_group is None else self._lr_group["lr"]
        self._compute(step, first=False, snapshot=step % self.cfg.every == 0 or step >= state.max_steps,
                      math=self.math)

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_ready is None or self.step_ready[0] != state.global_step:  # no on_optimizer_step
            self._compute(state.global_step, first=False, math=update_math,  # (another Trainer loop)
                          snapshot=state.global_step % self.cfg.every == 0 or state.global_step >= state.max_steps)
        self._submit(state.global_step)
        if control.should_save or control.should_training_stop:  # a checkpoint must be covered
            self.sink.drain()

    @torch.no_grad()
    def _compute(self, step: int, first: bool, snapshot: bool, math) -> None:
        """Fill the step's device buffers (the async copy of the previous step's buffers is
        stream-ordered before these writes)."""
        ps = list(self.mats.values())
        grads = [None if first else p.grad for p in ps]
        vs = [None] * len(ps)
        if not first and self.optimizer is not None:
            vs = [self.optimizer.state.get(p, {}).get("exp_avg_sq") for p in ps]
            vs = [v if v is not None and v.shape == p.shape else None for v, p in zip(vs, ps)]
        math([p.detach() for p in ps], self.prev, grads, vs, self.rows,
             self.bits if snapshot else [[] for _ in ps], self.hidden_parts, self.hidden, first=first)
        self.hidden_parts = []
        self.step_ready = (step, snapshot)

    @torch.no_grad()
    def _submit(self, step: int) -> None:
        """Hand step ``step``'s buffers (and the probe, when due) to the sink."""
        _, snapshot = self.step_ready
        tensors = {"scalars": self.scalars}
        if snapshot:
            for (m, p), bits in zip(self.mats.items(), self.bits):
                rounded = iter(buf for _, buf in bits)
                for ext, sl, _ in self.parts:  # float32 parts alias live W: the sync sink writes them
                    # now, the async copy is stream-ordered before the next update
                    tensors[f"snap/{m}/{ext}"] = next(rounded).view(torch.int16) if ext == "u16" \
                        else p.detach().float()[sl]
            self.recorded_steps.append(step)
        if self.probe_dev is not None and self.cfg.probe_every and step % self.cfg.probe_every == 0:
            tensors["probe"] = self._probe()
        self.sink.submit(step, NAN if step == 0 else self.lr, tensors, snapshot)
        self.step_ready = None

    @torch.no_grad()
    def _probe(self) -> torch.Tensor:
        """The probe on the fixed batch, in eval mode (no dropout, no RNG use), with the uncompiled
        model object (the Trainer's compiled training graph is not touched)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.probe_fn(self.model, self.probe_dev, self.n_live)
        finally:
            self.model.train(was_training)

    # --- the end --------------------------------------------------------------------------------
    def on_train_end(self, args, state, control, **kwargs):
        self._ended = state.global_step >= state.max_steps  # else stopped early (Ctrl-C): interrupted
        self.close()

    def close(self, status: str | None = None) -> None:
        """Hand over every step in flight, have the writer process write them, compact and finalise
        meta.json, and wait for it to exit. Safe to call twice; the writer's failure is raised."""
        if self._closed or self.sink is None:
            return
        self._closed = True
        status = status or ("failed" if self.sink.proc.error else "complete" if self._ended else "interrupted")
        self.closing = self.sink.close(status)
