"""The optional extras (pyproject.toml): without numba ([fast]) the decoder's numpy passes give the
same bits as numba's compiled loop; without Ray ([sweep]) `duckling sweep` fails with one line naming
the install. A missing package is simulated in a subprocess with sys.modules[name] = None (what
Python does for a module that cannot be imported)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from duckling.recording import codec, kernels

GOLDEN = Path(__file__).parent / "data" / "golden"
WIDTHS = [16, 16, 16, 8, 4, 4, 4, 1, 1]  # uneven groups, like W's 16-row live and 1-row dead groups


def _golden_blocks():
    """Every block file of the format-2 golden recordings (written by duckling's writer; bf16 and
    float32 values, with and without time segments, 64-, 16- and 1-row groups)."""
    files = sorted(GOLDEN.glob("v2*/recording/*.blk"))
    assert files, f"no golden blocks under {GOLDEN}"
    return files


def _training_like_block(dtype, n=64, segment=32, seed=0):
    """A block as the writer makes it from a training run: W's bits (bf16 or float32) drifting a
    little each step, 16-row live groups and 1-row dead groups."""
    rng = np.random.default_rng(seed)
    rows, d = 40, 8
    W = rng.standard_normal((rows, d)).astype(np.float32)
    steps = []
    for _ in range(n):
        W = W + 1e-3 * rng.standard_normal((rows, d)).astype(np.float32)
        steps.append(W.view(np.uint32) >> 16 if dtype == np.uint16 else W.view(np.uint32))
    x = np.stack(steps).astype(dtype).reshape(n, rows * d)
    widths = [16 * d, 16 * d] + [d] * 8
    return x, codec.encode_block(x, range(n), widths, segment=segment)


def _record_sets(n):
    return [None, [0], [n - 1], [n // 2], list(range(0, n, 3)), list(range(n // 2, n))]


def _decode_all(blob, records, decode):
    """Every group of a block at ``records`` (None: all), decoded with ``decode`` as the kernel."""
    saved = kernels.decode_range
    kernels.decode_range = decode  # codec imports kernels.decode_range at each batch
    try:
        h, offsets = codec.read_header(blob, len(blob))
        got = codec.decode_groups(blob, h, offsets, range(len(h["frames"])), records)
        return np.concatenate([got[g] for g in range(len(h["frames"]))], axis=1)
    finally:
        kernels.decode_range = saved


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("segment", [None, 1, 5, 32])
def test_numpy_decode_is_exact(dtype, segment):
    """The numpy path alone (no numba needed) gives back every value of a block, any records."""
    x, blob = _training_like_block(dtype, segment=segment)
    for records in _record_sets(len(x)):
        want = x if records is None else x[records]
        got = _decode_all(blob, records, kernels.decode_range_numpy)
        assert got.dtype == x.dtype and np.array_equal(got, want), records


def test_numpy_decode_wraps_like_the_encoder():
    """Values that wrap around 0 / the top of the width (noise, large steps) come back exactly."""
    rng = np.random.default_rng(3)
    for dtype in (np.uint16, np.uint32):
        x = rng.integers(0, np.iinfo(dtype).max, (9, sum(WIDTHS)), dtype=np.uint64, endpoint=True).astype(dtype)
        blob = codec.encode_block(x, range(9), WIDTHS, segment=4)
        for records in _record_sets(9):
            assert np.array_equal(_decode_all(blob, records, kernels.decode_range_numpy),
                                  x if records is None else x[records]), (dtype, records)


def test_numba_and_numpy_decode_real_blocks_bit_for_bit():
    """The golden recordings' blocks and training-like blocks: both kernels, the same bits."""
    pytest.importorskip("numba")
    assert kernels.COMPILED and kernels.decode_range is kernels.decode_range_numba
    blobs = [p.read_bytes() for p in _golden_blocks()]
    blobs += [_training_like_block(t, segment=s, seed=s or 0)[1] for t in (np.uint16, np.uint32) for s in (None, 32)]
    for blob in blobs:
        h, _ = codec.read_header(blob, len(blob))
        for records in _record_sets(len(h["steps"])):
            fast = _decode_all(blob, records, kernels.decode_range_numba)
            slow = _decode_all(blob, records, kernels.decode_range_numpy)
            assert fast.dtype == slow.dtype and fast.tobytes() == slow.tobytes(), records


def _without(module: str, code: str, cwd=None) -> subprocess.CompletedProcess:
    """``code`` run in a fresh Python where ``module`` cannot be imported."""
    prog = f"import sys\nsys.modules[{module!r}] = None\n{code}"
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_without_numba_the_reader_imports_and_decodes_with_numpy():
    res = _without("numba", """
import numpy as np
import duckling.recording.reader
from duckling.recording import codec, kernels
assert not kernels.COMPILED and kernels.decode_range is kernels.decode_range_numpy
x = (np.arange(20 * 12, dtype=np.uint32).reshape(20, 12) * 2654435761).astype(np.uint16)
blob = codec.encode_block(x, range(20), [4, 4, 4], segment=8)
h, offsets = codec.read_header(blob, len(blob))
got = codec.decode_groups(blob, h, offsets, [0, 1, 2], [3, 9, 10, 19])
assert np.array_equal(np.concatenate([got[0], got[1], got[2]], axis=1), x[[3, 9, 10, 19]])
assert 'numba' not in [m.split('.')[0] for m, v in sys.modules.items() if v is not None]
print('numpy decode ok')
""")
    assert res.returncode == 0 and "numpy decode ok" in res.stdout, res.stderr


def _spec(tmp_path, repo_root) -> list[str]:
    """`duckling sweep` arguments for a valid spec (2 grid points) into tmp_path/sw."""
    (tmp_path / "data").mkdir()
    spec = tmp_path / "spec.toml"
    spec.write_text(f'dataset = "data"\nmapping = {str(repo_root / "token_mapping.json")!r}\n'
                    '[base]\n"train.max_steps" = 20\n'  # small: the plan's disk check must pass on any machine
                    '[grid]\n"train.weight_decay" = [0.0, 0.1]\n', encoding="utf-8")
    return ["sweep", str(spec), "--out", str(tmp_path / "sw")]


def test_sweep_without_ray_names_the_extra(tmp_path, repo_root):
    """`duckling sweep` of a valid spec without Ray: exit 2, one line naming pip install
    'duckling[sweep]', no traceback, and no sweep folder made."""
    args = _spec(tmp_path, repo_root)
    res = _without("ray", f"from duckling.cli import main\nsys.exit(main({args!r}))")
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("duckling sweep: error: ") and "pip install 'duckling[sweep]'" in err, err
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_sweep_dry_run_needs_no_ray(tmp_path, repo_root):
    """A dry run only plans (it imports the model for the parameter count: seconds), so Ray is not needed."""
    args = [*_spec(tmp_path, repo_root), "--dry-run", "--no-progress"]
    res = _without("ray", f"from duckling.cli import main\nsys.exit(main({args!r}))")
    assert res.returncode == 0 and "weight_decay=0.1__seed=" in res.stdout, (res.stdout, res.stderr)
    assert not (tmp_path / "sw").exists()


def test_relative_links_in_the_docs_resolve(repo_root):
    """Every relative link and image of the committed markdown (README, CHANGELOG, docs/, the package's
    READMEs) names a file or folder that exists: moving results must move the links with them."""
    import re
    import subprocess

    files = subprocess.run(["git", "ls-files", "*.md"], cwd=repo_root, capture_output=True, text=True).stdout.split()
    assert "README.md" in files
    broken = []
    for name in files:
        text = re.sub(r"```.*?```", "", (repo_root / name).read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (repo_root / name).parent.joinpath(path).exists():
                broken.append(f"{name}: {target}")
    assert not broken, broken
