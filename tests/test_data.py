"""tokenized_dataset/: packing, dtype, idempotence, the dead-id check, sources and every bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from duckling import CompactTokenizer
from duckling.cli import main as cli_main
from duckling.data.build import (BUILD_FILE, build_dataset, check_no_dead, count_tokens, iter_stories,
                           load_dataset_dir, resolve_source)
from duckling.errors import DucklingError

from corpus import make_stories, shared_stories, write_corpus

SEQ = 64  # short rows keep the tiny corpora multi-row
@pytest.fixture(scope="module")
def stories(repo_root):
    """The first real stories when the shared data exists, generated ones on a fresh clone."""
    return shared_stories("train", 60) or make_stories(59) + ["The quantum thermodynamics lecture was postponed indefinitely."]


@pytest.fixture
def corpus(tmp_path, stories):
    return write_corpus(tmp_path / "corpus.txt", stories)


def expected_rows(tok, stories, seq):
    flat = np.concatenate([tok.encode(s) + [tok.eot_id] for s in stories])
    n = len(flat) // seq
    return flat[: n * seq].reshape(n, seq)


def test_build_packs_stories_exactly(tok, stories, corpus, tmp_path):
    out = tmp_path / "ds"
    rec = build_dataset(corpus, tok, out, seq_len=SEQ, num_proc=1, progress=False)
    ds = load_dataset_dir(out, tok, fmt=None)
    assert str(ds.features["input_ids"].feature.dtype) == "uint16"
    rows = np.array(ds["input_ids"])  # (n_rows, SEQ)
    np.testing.assert_array_equal(rows, expected_rows(tok, stories, SEQ))
    assert rec["n_rows"] == len(rows) and rec["n_stories"] == len(stories) and rec["dead_check"] == "passed"
    assert rec["n_tokens"] + rec["dropped_tokens"] == sum(len(tok.encode(s)) + 1 for s in stories)
    torch_ds = load_dataset_dir(out, tok.hash)  # a hash works too; torch format gives int64 rows
    assert torch_ds[0]["input_ids"].shape == (SEQ,) and str(torch_ds[0]["input_ids"].dtype) == "torch.int64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "ds"]  # no temp dirs left


def test_encoder_threads_match_serial(tok, corpus, tmp_path):
    a = build_dataset(corpus, tok, tmp_path / "a", seq_len=SEQ, num_proc=1, progress=False)
    b = build_dataset(corpus, tok, tmp_path / "b", seq_len=SEQ, num_proc=2, progress=False)
    assert a["n_rows"] == b["n_rows"]
    np.testing.assert_array_equal(np.array(load_dataset_dir(tmp_path / "a", tok, None)["input_ids"]),
                                  np.array(load_dataset_dir(tmp_path / "b", tok, None)["input_ids"]))


def test_build_is_idempotent(tok, corpus, tmp_path, capsys):
    out = tmp_path / "ds"
    kw = dict(seq_len=SEQ, num_proc=1, progress=False)
    assert build_dataset(corpus, tok, out, **kw)["skipped"] is False
    stamp = (out / BUILD_FILE).stat().st_mtime_ns
    capsys.readouterr()
    assert build_dataset(corpus, tok, out, **kw)["skipped"] is True
    assert "nothing to do" in capsys.readouterr().out and (out / BUILD_FILE).stat().st_mtime_ns == stamp
    assert build_dataset(corpus, tok, out, force=True, **kw)["skipped"] is False
    with open(corpus, "a") as f:  # a changed source is rebuilt
        f.write("One more story about a dog.\n<|endoftext|>\n")
    rec = build_dataset(corpus, tok, out, **kw)
    assert rec["skipped"] is False and load_dataset_dir(out, tok).num_rows == rec["n_rows"]
    assert build_dataset(corpus, tok, out, seq_len=SEQ // 2, num_proc=1, progress=False)["skipped"] is False


def test_a_corpus_the_mapping_was_not_counted_on_is_flagged(tok, corpus, tmp_path, capsys):
    """Text far from TinyStories builds (it is the user's data) but says its unk share is high."""
    build_dataset(corpus, tok, tmp_path / "stories", seq_len=SEQ, num_proc=1, progress=False)
    assert "warning" not in capsys.readouterr().out  # TinyStories-like text: no warning
    code = ["def quaternion_slerp(q0, q1, t): return numpy.einsum('ij,jk->ik', q0, q1) ** t  # Jacobian"] * 40
    rec = build_dataset(write_corpus(tmp_path / "code.txt", code), tok, tmp_path / "code", seq_len=SEQ, num_proc=1,
                        progress=False)
    out = capsys.readouterr().out
    assert rec["unk_fraction"] > 0.05 and f"warning: {rec['unk_fraction']:.0%} of the tokens are unk" in out
    assert "duckling vocab --data CORPUS" in out


def test_cli_build_and_env_source(tok, corpus, tmp_path, monkeypatch, capsys, repo_root):
    monkeypatch.setenv("DUCKLING_DATA", str(corpus))
    out = tmp_path / "ds"
    args = ["build", "--out", str(out), "--mapping", str(repo_root / "token_mapping.json"), "--num-proc", "1"]
    assert cli_main(args) == 0 and "no dead ids" in capsys.readouterr().out
    assert json.loads((out / BUILD_FILE).read_text())["source"] == str(corpus)
    assert cli_main(args) == 0 and "nothing to do" in capsys.readouterr().out


def test_dead_id_check_catches_dead_tokens(tok):
    from datasets import Dataset, Features, List, Value

    feats = Features({"input_ids": List(Value("uint16"))})
    rows = np.zeros((3, 8), np.uint16)
    assert check_no_dead(Dataset.from_dict({"input_ids": rows}, features=feats), tok.n_live, 8)["n_eot"] == 24
    rows[2, 5] = tok.dead_ids[0]
    with pytest.raises(DucklingError, match="row 2"):
        check_no_dead(Dataset.from_dict({"input_ids": rows}, features=feats), tok.n_live, 8)


def test_stories_sources(tmp_path, stories):
    f = tmp_path / "a.txt"
    f.write_text("  first story \n<|endoftext|>\n\n<|endoftext|>second<|endoftext|>\nthird\n", encoding="utf-8")
    assert list(iter_stories(resolve_source(f))) == ["first story", "second", "third"]
    stats = {}
    assert list(iter_stories(resolve_source(f), max_stories=2, stats=stats)) == ["first story", "second"]
    assert stats["n_stories"] == 2
    write_corpus(tmp_path / "b.txt", stories[:5])
    from_folder = count_tokens(tmp_path, num_proc=1)  # a folder: a.txt then b.txt
    from_list = count_tokens(["first story", "second", "third"] + stories[:5], num_proc=1)
    np.testing.assert_array_equal(from_folder, from_list)
    assert from_list[50256] == 8


def test_loading_with_another_mapping_fails(tok, corpus, tmp_path):
    out = tmp_path / "ds"
    build_dataset(corpus, tok, out, seq_len=SEQ, num_proc=1, progress=False)
    other = CompactTokenizer(np.r_[tok.gpt2_ids[:2], tok.gpt2_ids[3:], tok.gpt2_ids[2]], n_live=tok.n_live)
    with pytest.raises(DucklingError, match="another token mapping"):
        load_dataset_dir(out, other)
    with pytest.raises(DucklingError, match="No tokenized dataset"):
        load_dataset_dir(tmp_path / "nope", tok)


def _bad_utf8(d):
    write_corpus(d / "a.txt", make_stories(40))  # good text first: the failure comes mid-build
    (d / "b.txt").write_bytes("Once upon a time, a caf\xe9.\n<|endoftext|>\n".encode("latin-1"))
    return d


@pytest.mark.parametrize("setup,message", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "e.txt").write_text("\n<|endoftext|>\n \n") and d, "no stories"),
    (lambda d: (d / "sub").mkdir() or (d / "sub" / "x.txt").write_text("hi") and d, "subfolders"),
    (_bad_utf8, "not UTF-8"),
    (lambda d: write_corpus(d / "s.txt", ["A dog."]), "too small"),
])
def test_build_bad_input_leaves_nothing(tok, tmp_path, setup, message):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "out" / "ds"
    with pytest.raises(DucklingError, match=message):
        build_dataset(setup(data), tok, out, seq_len=SEQ, num_proc=1, progress=False)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no temp dir left


def test_build_bad_mapping_and_foreign_out(tok, corpus, tmp_path, capsys):
    bad = tmp_path / "m.json"
    bad.write_text('{"format_version": 1}')
    assert cli_main(["build", "--data", str(corpus), "--out", str(tmp_path / "ds"), "--mapping", str(bad)]) == 2
    assert "malformed" in capsys.readouterr().err and not (tmp_path / "ds").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DucklingError, match="not a Duckling dataset"):
        build_dataset(corpus, tok, foreign, seq_len=SEQ, num_proc=1, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_hub_unreachable_says_how_to_use_local_files(tok, tmp_path, monkeypatch):
    monkeypatch.delenv("DUCKLING_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    try:
        datasets.load_dataset_builder("roneneldan/TinyStories")
        pytest.skip("TinyStories is in the local HF cache, so the hub is not needed")
    except Exception:
        pass
    with pytest.raises(DucklingError, match="--data PATH"):
        build_dataset(None, tok, tmp_path / "ds", seq_len=SEQ, num_proc=1, progress=False)
    assert not (tmp_path / "ds").exists()
