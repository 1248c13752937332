"""What a sweep prints: one line per run state change and one overall bar (runs done, steps done,
aggregate steps/s), instead of one progress bar per run; and the short tables ``duckling sweep`` and
``duckling compare`` print (a value that does not exist yet is "-", never None or NaN)."""
from __future__ import annotations

import math
import sys
import time


def cell(v, digits: int = 4) -> str:
    """One table cell: floats to ``digits`` significant digits, missing values (None, NaN) as "-"."""
    if getattr(getattr(v, "dtype", None), "kind", "") == "f":  # a numpy float32 scalar
        v = float(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.{digits}g}"  # a step stays 10000
    return str(v)


def text_table(rows: list[dict], columns: dict) -> str:
    """A plain, left-aligned terminal table: ``columns`` is {key in each row: header}."""
    body = [[cell(r.get(k)) for k in columns] for r in rows]
    width = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(columns.values())]
    lines = ["  ".join(h.ljust(w) for h, w in zip(columns.values(), width)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, width)).rstrip() for b in body]
    return "\n".join(lines)


def data_lines(spec) -> str:
    """What the runs learn from and are evaluated on, one line each ("training data: PATH: 977 rows x 512
    tokens from 2,316 stories of SOURCE"): said before hours of training, and by --dry-run."""
    from duckling.data.build import describe_dataset  # the driver only: the progress actor stays light

    said = {role: (ds, describe_dataset(ds)) for role, ds in (("training data", spec.dataset),
                                                               ("held-out data", spec.eval_dataset))}
    return "\n".join(f"{role}: {ds}: {what}" for role, (ds, what) in said.items() if what)


class Board:
    def __init__(self, spec, out, manifest, todo, enabled: bool = True):
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.max_steps = {r.name: r.cfg.train.max_steps for r in spec.runs}
        self.n_runs = len(spec.runs)
        self.done = {e["name"] for e in manifest["runs"] if e["status"] == "complete"}
        todo_names = {r.name for r in todo}
        self.step = {n: (self.max_steps[n] if n in self.done else 0) for n in self.max_steps}
        self.start_step: dict = {}  # first step seen this call (a resumed run starts above 0)
        self.running: set = set()
        self.t0 = time.monotonic()
        self.bar = None
        if enabled:
            total = sum(self.max_steps.values())
            print(f"sweep {out}: {self.n_runs} runs ({len(self.done)} complete, {len(todo_names)} to train), "
                  f"{spec.cpus:g} CPU{'s' if spec.cpus != 1 else ''} per run", flush=True)
            if lines := data_lines(spec):  # nothing to say for in-memory arrays
                print(lines, flush=True)
            self.bar = tqdm(total=total, initial=sum(self.step.values()), unit="step", desc="sweep",
                            dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
            self._postfix()

    def _postfix(self):
        if self.bar is not None:
            fresh = sum(self.step[n] - self.start_step.get(n, self.step[n]) for n in self.start_step)
            rate = fresh / max(time.monotonic() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"runs {len(self.done)}/{self.n_runs} done, {len(self.running)} running, "
                                     f"{rate:.1f} steps/s", refresh=False)

    def _line(self, text: str):
        if not self.enabled:
            return
        stamp = time.strftime("%H:%M:%S")
        (self.bar.write if self.bar is not None else print)(f"{stamp} {text}")

    def steps(self, latest: dict):
        """Steps reported by the running tasks: {name: step}."""
        for name, step in latest.items():
            if name in self.done:
                continue
            if name not in self.start_step:
                self.start_step[name] = step
                self.running.add(name)
                how = f"resumed at step {step}" if step else "started"
                self._line(f"{name}: {how}")
            self._advance(name, step)
        self._postfix()
        if self.bar is not None:
            self.bar.refresh()

    def _advance(self, name, step):
        delta = step - self.step[name]
        self.step[name] = step
        if self.bar is not None and delta:
            self.bar.update(delta)

    def event(self, name: str, status: str, error: str | None, res: dict | None = None):
        self.running.discard(name)
        if status == "complete":
            self.done.add(name)
            self._advance(name, max(self.step[name], self.max_steps[name]))
            res = res or {}
            bits = [f"step {res['global_step']}"] if res.get("global_step") is not None else []
            bits += [f"{k.replace('_', ' ')} {res[k]:.3f}" for k in ("loss", "eval_loss") if res.get(k) is not None]
            bits += [f"{res['steps_per_s']:.1f} steps/s"] if res.get("steps_per_s") else []
            bits += ["already complete"] if res.get("skipped") else []
            self._line(f"{name}: complete [{len(self.done)}/{self.n_runs}] {', '.join(bits)}")
        elif status in ("failed", "retrying"):
            first = (error or "").strip().splitlines()
            reason = first[-1] if first else "unknown error"
            self.start_step.pop(name, None)
            self._line(f"{name}: {'failed, retrying' if status == 'retrying' else 'failed'}"
                       f" ({reason[:200]})")
        elif status == "pending":
            self._line(f"{name}: pending (never started)")
        else:
            self._line(f"{name}: {status}")
        self._postfix()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Steps:
    """The progress actor: the latest step of every running run (this module imports nothing heavy,
    so the actor's process stays small)."""

    def __init__(self):
        self.steps = {}
        self.started = {}  # name -> [{"host", "node_id"} of each attempt]

    def start(self, name, where):
        self.started.setdefault(name, []).append(where)
        self.steps.pop(name, None)  # a new attempt reports its own first step

    def starts(self):
        return {k: list(v) for k, v in self.started.items()}

    def update(self, name, step):
        self.steps[name] = step

    def get(self):
        return dict(self.steps)

    def ping(self):
        """A run's watch asks this while its driver lives (the actor dies with the driver)."""
        return True
