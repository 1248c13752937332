"""`duckling quickstart` and what it ships: the bundled sample, the mapping copy, GPT-2's BPE offline."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from duckling import quickstart as Q
from duckling.data import vocab
from duckling.data.build import iter_stories, resolve_source
from duckling.errors import DucklingError

pytestmark = pytest.mark.xdist_group("quickstart")  # its module fixtures are built once, on one worker

GPT2_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")
SAMPLE = Path(vocab.__file__).parents[1] / "sample"
# text that exercises the pattern: contractions, digits, unicode, runs of spaces, the EOT string
TRICKY = ("Once upon a time, Lily's cat didn't say 'meow' 123456 times.\n\n  Tabs\tand   spaces  \n"
          "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F986 ducklings <|endoftext|> The end.  ")


# --- GPT-2's BPE, bundled ------------------------------------------------------------------------

def _tiktoken_gpt2():
    """tiktoken's own gpt2 encoding from its cache, or a skip (never a download in the tests)."""
    import tiktoken

    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache or not all(os.path.isfile(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest()))
                            for u in GPT2_URLS):
        pytest.skip("no tiktoken cache with the gpt2 files to compare against (TIKTOKEN_CACHE_DIR)")
    return tiktoken.get_encoding("gpt2")


def test_bundled_bpe_equals_tiktoken_gpt2():
    ref, enc = _tiktoken_gpt2(), vocab.get_encoding("gpt2")
    assert enc is not ref  # ours is built from duckling/bpe, not taken from tiktoken's registry
    assert enc._mergeable_ranks == ref._mergeable_ranks  # all 50,256 token byte strings and ranks
    assert (enc._pat_str, enc._special_tokens, enc.n_vocab) == (ref._pat_str, ref._special_tokens, ref.n_vocab)
    story = (SAMPLE / "tinystories_sample.txt").read_text(encoding="utf-8")[:20000]
    for text in (TRICKY, story):
        assert enc.encode_ordinary(text) == ref.encode_ordinary(text)
        assert enc.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
    assert enc.decode(enc.encode_ordinary(TRICKY)) == TRICKY


def test_get_encoding_works_offline_without_a_cache(tmp_path, monkeypatch):
    import tiktoken.load
    import tiktoken.registry

    def no_network(*a, **k):
        raise ConnectionError("network blocked by the test")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)  # every tiktoken download fails
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # nothing loaded earlier in this process
    vocab._bundled_gpt2.cache_clear()
    enc = vocab.get_encoding()
    assert enc.encode_ordinary("Once upon a time") == [7454, 2402, 257, 640]
    assert enc.decode([7454, 2402, 257, 640, 50256]) == "Once upon a time<|endoftext|>"
    assert list(tmp_path.iterdir()) == []  # nothing was written to tiktoken's cache
    with pytest.raises(DucklingError, match="TIKTOKEN_CACHE_DIR"):  # other encodings still need tiktoken
        vocab.get_encoding("r50k_base")


def test_corrupted_bundled_bpe_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "vocab.bpe.gz"
    bad.write_bytes(gzip.compress(b"#version: 0.2\nh e\n"))
    monkeypatch.setattr(vocab, "_BUNDLED_BPE", bad)
    vocab._bundled_gpt2.cache_clear()
    try:
        with pytest.raises(DucklingError, match="corrupted.*reinstall"):
            vocab.get_encoding()
    finally:
        vocab._bundled_gpt2.cache_clear()


# --- the bundled sample and mapping ----------------------------------------------------------------

def test_sample_is_what_its_readme_says():
    path = SAMPLE / "tinystories_sample.txt"
    stats: dict = {}
    stories = list(iter_stories(resolve_source("sample"), stats=stats))
    readme = (SAMPLE / "README.md").read_text(encoding="utf-8")
    claimed = re.search(r"\*\*([\d,]+) stories, ([\d,]+) bytes\*\*", readme)
    assert claimed, "README.md must state the story count and size as '**N stories, B bytes**'"
    n, size = (int(g.replace(",", "")) for g in claimed.groups())
    assert (len(stories), stats["n_stories"], path.stat().st_size) == (n, n, size) == (500, 500, 407_519)
    assert size <= 500_000 and hashlib.sha256(path.read_bytes()).hexdigest() in readme
    assert resolve_source("sample").files == [path]
    assert "CDLA-Sharing-1.0" in readme and "Community Data License Agreement" in (SAMPLE / "LICENSE").read_text()


def test_bundled_mapping_is_the_committed_one(repo_root):
    assert gzip.decompress(Q.BUNDLED_MAPPING.read_bytes()) == (repo_root / "token_mapping.json").read_bytes(), \
        "token_mapping.json changed: refresh duckling/sample/token_mapping.json.gz (gzip -9n < token_mapping.json)"


def test_hub_failure_never_falls_back_to_the_sample(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.delenv("DUCKLING_DATA", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DucklingError, match="--data"):
        next(iter_stories(resolve_source(None)))


# --- the quickstart itself -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qs(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    return out, Q.quickstart(out, steps=5, progress=False)


@pytest.mark.slow
def test_quickstart_writes_data_recording_report_and_summary(qs):
    from datasets import load_from_disk

    from duckling.data.build import check_no_dead
    from duckling.recording.reader import Recording

    out, d = qs
    assert set(d) >= {"out", "dataset_dir", "run_dir", "report_dir", "steps", "recorded_steps", "steps_per_s",
                      "recording_bytes", "seconds", "data", "loss", "headline", "figures", "full_run", "reused"}
    assert (d["steps"], d["recorded_steps"], d["reused"]) == (5, 6, False) and d["recording_bytes"] > 0
    # the dataset: the whole sample, every token checked live
    assert d["data"]["n_stories"] == 500 and d["data"]["n_rows"] == 185
    stats = check_no_dead(load_from_disk(d["dataset_dir"]), 6144, 512)
    assert stats["n_rows"] == 185 and 0 < stats["n_unk"] < 0.01 * stats["n_tokens"]
    # the recording: W after every step 0..5
    rec = Recording(d["run_dir"])
    np.testing.assert_array_equal(rec.steps, np.arange(6))
    # the report: real PNGs, the headline numbers, the loss
    names = {os.path.basename(f) for f in d["figures"]}
    assert {"norms.png", "drift.png", "collapse.png", "detectability.png", "loss.png"} <= names
    for f in d["figures"]:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(d["headline"]) == set(Q.HEADLINE) and d["headline"]["dead_norm_over_null"] > 0
    assert d["loss"]["final"] is not None and 8.0 < d["loss"]["first_logged"] < 9.5  # ~ln(8192) = 9.01
    assert json.loads((out / Q.SUMMARY_FILE).read_text()) == d
    text = Q.format_summary(d)
    assert "dead_norm_over_null" in text and d["report_dir"] in text and "duckling train" in text


@pytest.mark.slow
def test_quickstart_reuses_a_finished_folder_and_refuses_others(qs, tmp_path, capsys):
    out, d = qs
    mtime = (out / "run").stat().st_mtime_ns
    again = Q.quickstart(out, progress=False)  # no steps given: show the finished one
    assert again == {**d, "reused": True} and (out / "run").stat().st_mtime_ns == mtime
    assert "already holds a finished quickstart" in Q.format_summary(again)
    with pytest.raises(DucklingError, match="5-step quickstart.*--out"):
        Q.quickstart(out, steps=7, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DucklingError, match="no finished quickstart"):
        Q.quickstart(tmp_path / "other", steps=5, progress=False)
    with pytest.raises(DucklingError, match="--steps"):
        Q.quickstart(tmp_path / "new", steps=0, progress=False)


@pytest.mark.slow
def test_report_cli_prints_rounded_headline_numbers_with_their_meanings(qs, tmp_path, capsys):
    from duckling.cli import main

    out, d = qs
    assert main(["report", d["run_dir"], "--out", str(tmp_path / "rep")]) == 0
    text, err = capsys.readouterr()
    for k, what in Q.HEADLINE.items():
        assert f"  {k} = " in text and f"({what})" in text, k
    assert "loss at the last logged step: training " in text
    assert "attention_mask" not in text + err and "Loading weights" not in err  # no transformers noise
    values = re.findall(r" = (\S+)   \(", text)
    assert len(values) == len(Q.HEADLINE)
    for v in values:  # rounded to 4 significant digits, not repr'd floats
        assert v == "n/a" or len(v.split("e")[0].lstrip("-").replace(".", "").lstrip("0")) <= 4, v


def test_help_gives_the_default_numbers(capsys):
    from duckling.analysis.metrics import MAX_POINTS
    from duckling.cli import main

    for argv, want in ((["quickstart", "--help"], f"default {Q.DEFAULT_STEPS:,}"),
                       (["report", "--help"], f"default {MAX_POINTS};")):
        with pytest.raises(SystemExit):
            main(argv)
        assert want in " ".join(capsys.readouterr().out.split()), argv


def test_full_run_line_states_the_recording_size_and_the_disk_check():
    line = Q.FULL_RUN[1]
    assert f"--max-steps {Q.FULL_STEPS}" in line and "~2 GB of recording" in line
    gb = Q._disk_check_gb(Q.FULL_STEPS)  # the uncompressed bound the disk check reserves (~23 GB)
    assert f"~{gb:.0f} GB free" in line and gb > 5 * Q.FULL_RUN_GB
