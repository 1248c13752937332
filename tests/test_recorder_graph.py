"""The recorder and the compiled step: no graph break or outside-state mutation in the model's graph,
one fused graph for the per-step math, exact values, and no host sync on the training thread.

What a GPU needs (CUDA graphs stay on, no waits) is checked here on the CPU through dynamo's own view
of the code (``torch._dynamo.explain``), so that it cannot regress where no GPU is available.
"""
from __future__ import annotations

import operator
import threading

import numpy as np
import pytest
import torch
import torch._dynamo as dynamo
from transformers import TrainerCallback

from duckling import Recording
from duckling.config import N_LIVE, DataConfig, DucklingConfig, ModelConfig, RecordConfig, TrainConfig
from duckling.training.recorder import WRecorder, _Sink, update_math
from duckling.training.train import train

T = 16


def tiny(max_steps=3, **rec_kw) -> DucklingConfig:
    """A 1-layer, d=16 Duckling (W is 8192 x 16) on CPU, recording every step."""
    return DucklingConfig(
        data=DataConfig(mapping_path="no-such-dir/token_mapping.json"),
        model=ModelConfig(n_layer=1, n_embd=16, n_head=2, n_inner=32, n_positions=T),
        train=TrainConfig(max_steps=max_steps, learning_rate=1e-2, save_steps=2, logging_steps=2,
                          device="cpu", compute_dtype="fp32", compile=False),
        record=RecordConfig(**{"probe_every": 1, **rec_kw}))


def rows_data(n=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, N_LIVE, size=(n, T), dtype=np.uint16)  # (n, T)


def run(cfg, run_dir=None, callbacks=()):
    return train(cfg, dataset=rows_data(), run_dir=run_dir, tokenizer=False, callbacks=callbacks, progress=False)


# --- what dynamo sees ----------------------------------------------------------------------------
_INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def outside_mutations(gm: torch.fx.GraphModule) -> list[str]:
    """In-place writes to a graph input (a tensor the graph did not create: outside state, or a
    parameter written in a forward). Inductor refuses CUDA graphs for such graphs."""
    inputs = {n for n in gm.graph.nodes if n.op == "placeholder"}
    bad = []
    for n in gm.graph.nodes:
        inplace = (n.op == "call_function" and n.target in _INPLACE) or \
                  (n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("__")) or \
                  "out" in n.kwargs
        targets = [n.kwargs["out"]] if "out" in n.kwargs else n.args[:1]
        if inplace and any(t in inputs for t in targets if isinstance(t, torch.fx.Node)):
            bad.append(f"{n.target} on {[t.name for t in targets if isinstance(t, torch.fx.Node)]}")
    return bad


class ExplainStep(TrainerCallback):
    """During training, after the recorder's own step-1 work: explain the model's forward exactly as
    DucklingTrainer.compute_loss called it (the kwargs are captured by wrapping forward)."""

    def __init__(self, model):
        self.model, self.calls, self.result = model, [], None
        self.forward = model.forward
        model.forward = self._spy

    def _spy(self, *args, **kwargs):
        if self.model.training:
            self.calls.append(kwargs)
        return self.forward(*args, **kwargs)

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1:
            self.model.forward = self.forward
            dynamo.reset()
            self.result = dynamo.explain(self.model)(**self.calls[-1])
            dynamo.reset()


@pytest.mark.slow
def test_compiled_forward_with_recorder_has_one_graph_and_no_outside_mutation(tmp_path):
    from duckling.training.model import build_model

    cfg = tiny(max_steps=2)
    model = build_model(cfg.model, seed=0)
    spy = ExplainStep(model)
    rec = Recording(train(cfg, dataset=rows_data(), run_dir=tmp_path / "run", tokenizer=False, model=model,
                          callbacks=[spy], progress=False).run_dir)
    kw = spy.calls[-1]
    assert kw.get("output_hidden_states") == -1  # the recorder's hidden state is a model output
    e = spy.result
    assert (e.graph_count, e.graph_break_count) == (1, 0), [r.reason for r in e.break_reasons]
    assert outside_mutations(e.graphs[0]) == []
    assert np.isfinite(rec.hidden_mean[1:]).all()


def test_the_mutation_check_catches_the_old_forward_hook():
    """The previous recorder's design: a forward hook on ln_f adding into a tensor of its own."""
    from duckling.training.model import build_model
    from duckling.training.trainer import graph_friendly

    model = graph_friendly(build_model(tiny().model, seed=0)).train()
    hidden_sum = torch.zeros(16)

    def hook(module, inputs, output):
        nonlocal hidden_sum
        hidden_sum += output.detach().float().mean(dim=(0, 1))

    handle = model.transformer.ln_f.register_forward_hook(hook)
    try:
        x = torch.from_numpy(rows_data(2).astype(np.int64))
        dynamo.reset()
        e = dynamo.explain(model)(input_ids=x, labels=x)
    finally:
        handle.remove()
        dynamo.reset()
    assert any(outside_mutations(g) for g in e.graphs)


def _math_args(V=64, d=8, n_live=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(V, d, generator=g)  # noqa: E731
    ws, prevs, grads, vs = [r(), r()], [r(), r()], [r(), None], [r().abs(), r().abs()]
    rows, hidden = torch.full((2, 4, V), float("nan")), torch.full((d,), float("nan"))
    bits = [[(slice(0, n_live), torch.empty(n_live, d, dtype=torch.bfloat16))], []]  # mixed, bf16-less
    parts = [torch.randn(d, generator=g) for _ in range(2)]  # two forwards (gradient accumulation)
    return ws, prevs, grads, vs, rows, bits, parts, hidden


def test_update_math_is_one_graph_and_compiled_matches_eager():
    args = _math_args()
    dynamo.reset()
    e = dynamo.explain(update_math)(*_math_args())
    assert (e.graph_count, e.graph_break_count) == (1, 0), [r.reason for r in e.break_reasons]

    update_math(*args)  # eager: the recorder's CPU path, op for op what it always computed
    ws, prevs, grads, vs, rows, bits, parts, hidden = args
    w0, w1 = _math_args()[0]
    p0, p1 = _math_args()[1]
    norm = torch.linalg.vector_norm
    assert torch.equal(rows[0, 0], norm(w0, dim=1)) and torch.equal(rows[0, 1], norm(w0 - p0, dim=1))
    assert torch.equal(rows[0, 2], norm(grads[0], dim=1)) and torch.isnan(rows[1, 2]).all()
    assert torch.equal(rows[1, 3], torch.mean(vs[1], dim=1)) and torch.equal(rows[1, 1], norm(w1 - p1, dim=1))
    assert torch.equal(prevs[0], w0) and torch.equal(bits[0][0][1], w0[:48].bfloat16())
    assert torch.equal(hidden, (parts[0] + parts[1]) / 2)

    fused = _math_args()
    torch.compile(update_math, fullgraph=True, dynamic=False, backend="aot_eager")(*fused)
    for a, b in zip((fused[1], fused[4], fused[7]), (prevs, rows, hidden)):  # same values, reduction order aside
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0, equal_nan=True)
    assert torch.equal(fused[5][0][0][1], bits[0][0][1])
    dynamo.reset()


# --- exact values through a real run -------------------------------------------------------------
class Reference(TrainerCallback):
    """What the recorder must record, computed independently during the same run."""

    def __init__(self):
        self.h, self.G, self.V, self.lr, self.parts = {}, {}, {}, {}, []

    def on_train_begin(self, args, state, control, model=None, **kw):
        model.transformer.ln_f.register_forward_hook(self._ln_f)

    def _ln_f(self, module, inputs, output):  # eager CPU run: a plain hook is fine here
        if module.training:
            self.parts.append(output.detach().float().mean(dim=(0, 1)))

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        n, w = state.global_step + 1, model.transformer.wte.weight
        self.G[n] = torch.linalg.vector_norm(w.grad.detach(), dim=1)
        self.lr[n] = optimizer.param_groups[0]["lr"]
        self.h[n] = sum(self.parts[1:], self.parts[0]) / len(self.parts)
        self.parts = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        w = model.transformer.wte.weight
        self.V[state.global_step] = torch.mean(optimizer.state[w]["exp_avg_sq"], dim=1)


def test_recorded_fields_are_exact(tmp_path):
    """hidden_mean, grad_norm, adam_v and lr, bit for bit against the same run's own tensors."""
    cfg = tiny(max_steps=3)
    ref = Reference()
    rec = Recording(run(cfg, tmp_path / "run", callbacks=[ref]).run_dir)
    for n in range(1, 4):
        assert np.array_equal(rec.hidden_mean[n], ref.h[n].numpy()), n  # mean ln_f output, bit for bit
        assert np.array_equal(rec.rows("grad_norm")[n], ref.G[n].numpy()), n
        assert np.array_equal(rec.rows("adam_v")[n], ref.V[n].numpy()), n
        assert rec.lr[n] == np.float32(ref.lr[n])
    assert np.isnan(rec.hidden_mean[0]).all()


# --- no host sync on the training thread ---------------------------------------------------------
SYNCS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def test_no_host_sync_on_the_training_thread(tmp_path, monkeypatch):
    """CUDA's path (compiled math and probe, the writer process): the recorder's per-step work, probe
    included, never reads a tensor's value on the training thread and waits for the writer only
    before a checkpoint. (Eager, transformers' own input checks in the probe's forward would.)"""
    monkeypatch.setattr(WRecorder, "fuse", True)
    monkeypatch.setattr(WRecorder, "compile_backend", "aot_eager")
    active = threading.local()
    hits: list[str] = []

    def guard(name):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, **k):
            if getattr(active, "on", False):
                hits.append(name)
            return orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapped)

    for name in SYNCS:
        guard(name)
    for name in ("observe_hidden", "on_optimizer_step", "on_step_end"):
        orig = getattr(WRecorder, name)

        def wrapped(self, *a, _orig=orig, **k):
            active.on = True
            try:
                return _orig(self, *a, **k)
            finally:
                active.on = False
        monkeypatch.setattr(WRecorder, name, wrapped)
    drains = []  # True: a wait for the writer inside the recorder's per-step work
    orig_drain = _Sink.drain
    monkeypatch.setattr(_Sink, "drain", lambda self: (drains.append(getattr(active, "on", False)),
                                                           orig_drain(self)))
    rec = Recording(run(tiny(max_steps=5, probe_every=1), tmp_path / "run").run_dir)
    assert hits == []
    assert sum(drains) == 3  # before checkpoints 2 and 4 and after the last step only
    assert rec.probe[:, 0].tolist() == [0, 1, 2, 3, 4, 5] and rec.scalar_steps.tolist() == list(range(6))


# --- on a GPU (skipped elsewhere): what the CPU checks stand in for --------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_step_keeps_cuda_graphs_and_never_syncs(tmp_path, monkeypatch):
    """A compiled (CUDA graphs) recorded run: no graph break, no CUDA-graph skip, and, after warm-up
    (compilation), not one host sync inside the recorder's per-step work, probe steps included."""
    from torch._dynamo.utils import counters

    calls = {"n": 0}
    for name in ("observe_hidden", "on_optimizer_step", "on_step_end"):
        orig = getattr(WRecorder, name)

        def wrapped(self, *a, _orig=orig, **k):
            calls["n"] += 1
            if calls["n"] <= 40:  # warm-up: the first steps compile
                return _orig(self, *a, **k)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return _orig(self, *a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        monkeypatch.setattr(WRecorder, name, wrapped)
    cfg = tiny(max_steps=40, probe_every=10)
    cfg.train.device, cfg.train.compile, cfg.train.save_steps = "cuda", "auto", 1000
    counters.clear()
    rec = Recording(run(cfg, tmp_path / "run").run_dir)
    assert dict(counters["graph_break"]) == {}
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert rec.probe[:, 0].tolist() == [0, 10, 20, 30, 40] and np.isfinite(rec.hidden_mean[1:]).all()
