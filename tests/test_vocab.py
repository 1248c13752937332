"""The compact vocabulary: the committed mapping's invariants, round trips, building, bad files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from duckling import CompactTokenizer

from duckling import config
from duckling.cli import main as cli_main
from duckling.errors import DucklingError
from corpus import make_stories, shared_stories
from duckling.data.vocab import GPT2_EOT, N_GPT2, UNK_TEXT, coverage_curve, get_encoding, min_vocab_for_coverage

@pytest.fixture(scope="module")
def stories(repo_root):
    """Real held-out stories when the shared data exists, generated ones on a fresh clone."""
    return shared_stories("valid", 200) or make_stories(199) + ["The quantum thermodynamics lecture was postponed indefinitely."]


def test_committed_mapping_invariants(tok):
    assert (len(tok), tok.n_live, tok.n_dead) == (8192, 6144, 2048)
    assert (tok.eot_id, tok.unk_id) == (config.EOT_ID, config.UNK_ID) == (0, 1)
    assert tok.gpt2_ids[0] == GPT2_EOT and tok.gpt2_ids[1] == -1
    real = tok.gpt2_ids[2:]
    assert len(np.unique(real)) == len(real) and real.min() >= 0 and real.max() < GPT2_EOT
    np.testing.assert_array_equal(tok.live_ids, np.arange(6144))
    np.testing.assert_array_equal(tok.dead_ids, np.arange(6144, 8192))
    # live ids are ordered by corpus frequency; the dead block starts where the live block ends
    assert np.all(np.diff(tok.counts[2:6144]) <= 0) and tok.counts[6143] >= tok.counts[6144]
    prov = tok.provenance
    assert "train" in prov["corpus"] and "valid" not in prov["source"] and prov["n_stories"] > 0
    assert len(prov["text_sha256"]) == 64 and 0.99 < prov["coverage"] <= 1


def test_dead_ids_are_never_emitted(tok):
    assert tok.lut.shape == (N_GPT2,) and tok.lut.max() < tok.n_live
    live = np.arange(2, tok.n_live)
    np.testing.assert_array_equal(tok.lut[tok.gpt2_ids[live]], live)  # live tokens map to themselves
    assert np.all(tok.lut[tok.gpt2_ids[tok.dead_ids]] == tok.unk_id)
    # a dead token's own text, encoded on its own, comes out as unknown
    enc = get_encoding()
    checked = 0
    for d in tok.dead_ids[::97]:
        text = tok.token_text(d)
        if enc.encode_ordinary(text) == [tok.gpt2_ids[d]]:
            assert tok.encode(text) == [tok.unk_id]
            checked += 1
    assert checked >= 5


def test_round_trip_real_stories(tok, stories):
    ids = tok.encode_batch(stories)
    exact = unknown = 0
    for s, x in zip(stories, ids):
        assert x == tok.encode(s) and max(x) < tok.n_live
        if tok.unk_id in x:
            assert UNK_TEXT in tok.decode(x) and tok.decode(x) != s
            unknown += 1
        else:
            assert tok.decode(x) == s
            exact += 1
    assert exact > len(stories) // 2
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.token_text(6144) == tok.id_to_text[6144] and tok.token_text(1) == UNK_TEXT


def test_from_counts_order_and_coverage():
    counts = np.zeros(N_GPT2, np.int64)
    counts[[10, 20, 30, 40]] = [5, 9, 5, 1]  # 20 first, then the tie 10 < 30, then 40
    counts[GPT2_EOT] = 3
    tok = CompactTokenizer.from_counts(counts, {"corpus": "toy"}, n_live=4, n_dead=3)
    assert tok.gpt2_ids.tolist() == [GPT2_EOT, -1, 20, 10, 30, 40, 0]  # dead: next frequent, then unseen by id
    assert tok.counts.tolist() == [3, 6, 9, 5, 5, 1, 0]  # unk counts 30 and 40
    assert tok.provenance["coverage"] == pytest.approx(1 - 6 / 23)
    assert tok.coverage(counts) == pytest.approx(1 - 6 / 23)
    assert tok.encode_batch([""]) == [[]]


def test_coverage_curve():
    counts = np.array([0, 50, 30, 20])
    np.testing.assert_allclose(coverage_curve(counts), [0.5, 0.8, 1.0, 1.0])
    assert [min_vocab_for_coverage(counts, c) for c in (0.5, 0.79, 0.8, 0.995)] == [1, 2, 2, 3]
    with pytest.raises(DucklingError):
        coverage_curve(np.zeros(5))


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "m.json")
    again = CompactTokenizer.from_file(path)
    assert again.hash == tok.hash and np.array_equal(again.counts, tok.counts)
    assert again.provenance == tok.provenance and again.id_to_text == tok.id_to_text
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp file left behind


def _edit(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_text("{not json"), "malformed"),
    (lambda p: p.write_text('{"tokens": 3}'), "malformed"),
    (lambda p: _edit(p, lambda d: d.update(tokens=d["tokens"][:4096], n_live=3072, n_dead=1024)), "sizes"),
    (lambda p: _edit(p, lambda d: d["tokens"][5].update(gpt2_id=d["tokens"][6]["gpt2_id"])), "distinct"),
    (lambda p: _edit(p, lambda d: d["tokens"][5].update(gpt2_id=49999)), "mapping_hash"),
    (lambda p: p.unlink(), "not found"),
])
def test_bad_mapping_files(tok, tmp_path, damage, message):
    path = tok.save(tmp_path / "m.json")
    damage(path)
    with pytest.raises(DucklingError, match=message):
        CompactTokenizer.from_file(path)


def test_cli_vocab(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n<|endoftext|>\n".join(make_stories(50)) + "\n<|endoftext|>\n", encoding="utf-8")
    out = tmp_path / "m.json"
    assert cli_main(["vocab", "--data", str(corpus), "--out", str(out), "--num-proc", "1"]) == 0
    tok = CompactTokenizer.from_file(out)
    assert tok.provenance["n_stories"] == 50 and tok.counts[0] == 50
    assert tok.decode(tok.encode(make_stories(1)[0])) == make_stories(1)[0]
    assert "coverage" in capsys.readouterr().out


@pytest.mark.parametrize("setup,message", [
    (lambda d: d / "missing.txt", "does not exist"),
    (lambda d: (d / "e.txt").write_text("\n<|endoftext|>\n  \n") and d / "e.txt", "no stories"),
    (lambda d: (d / "sub").mkdir() or d, "no .txt files"),
    (lambda d: (d / "l.txt").write_bytes("Once upon a caf\xe9.".encode("latin-1")) and d / "l.txt", "not UTF-8"),
])
def test_cli_vocab_bad_input(tmp_path, capsys, setup, message):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "m.json"
    assert cli_main(["vocab", "--data", str(setup(data)), "--out", str(out), "--num-proc", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".m.json*"))
