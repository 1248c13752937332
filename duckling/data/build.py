"""TinyStories text -> GPT-2 token counts, and -> ``tokenized_dataset/`` (512-token rows of compact ids).

Sources and splits (the hub's ``roneneldan/TinyStories`` by default; local text, a split folder, the
sample, an iterable of stories) are ``duckling.data.sources``; their names are re-exported here. Text streams in ~1 MB batches through a pool of encoder
threads, one per core (tiktoken releases the GIL), with at most 2 batches per thread in flight, so
memory stays bounded for a 2 GB corpus.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from duckling import config
from duckling.errors import DucklingError
from duckling.files import write_json
from duckling.data.sources import (BATCH_CHARS, EOT_TEXT, MAX_STORY_CHARS, Source,  # noqa: F401 (re-exported)
                                   describe_source, iter_stories, resolve_source)
from duckling.data.vocab import GPT2_EOT, N_GPT2, CompactTokenizer, get_encoding

BUILD_FILE = "duckling_build.json"  # fingerprint + stats, next to HF's own files in the dataset dir
BUILD_FORMAT = 1
UNK_WARN = 0.05  # a build with more unk than this was tokenized with a mapping counted on other text


# --- parallel encoding ---------------------------------------------------------------------------

def _story_ids(enc, story: str) -> np.ndarray:
    """GPT-2 ids of one story as uint32, straight from tiktoken's buffer (no Python int list)."""
    try:
        return enc.encode_to_numpy(story, disallowed_special=())  # = encode_ordinary, GIL released
    except (AttributeError, UnicodeEncodeError):  # tiktoken < 0.8, or lone surrogates
        return np.asarray(enc.encode_ordinary(story), dtype=np.uint32)


def _batches(stories: Iterable[str], chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    batch, size = [], 0
    for s in stories:
        batch.append(s)
        size += len(s)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_stream(stories: Iterable[str], lut: np.ndarray | None = None, num_proc: int | None = None,
                  base: str = config.BASE_ENCODING) -> Iterator[np.ndarray]:
    """Yield, in order, one token array per ~1 MB batch of stories, each story followed by EOT.

    GPT-2 ids (uint32), or compact ids (uint16) when ``lut`` is given. ``num_proc`` encoder threads
    (default: all cores) run in parallel because tiktoken releases the GIL while it encodes; at most
    2 batches per thread are in flight, so memory stays bounded whatever the corpus size.
    """
    enc = get_encoding(base)
    eot = np.array([GPT2_EOT], dtype=np.uint32)

    def encode(batch: list[str]) -> np.ndarray:
        ids = np.concatenate([a for s in batch for a in (_story_ids(enc, s), eot)])  # (n_tokens,)
        return ids if lut is None else lut[ids]

    num_proc = num_proc or os.cpu_count() or 1
    if num_proc <= 1:
        yield from map(encode, _batches(stories))
        return
    with ThreadPoolExecutor(num_proc) as pool:
        pending: deque = deque()
        for batch in _batches(stories):
            pending.append(pool.submit(encode, batch))
            if len(pending) >= 2 * num_proc:  # never read far ahead of the encoders
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def count_tokens(stories, num_proc: int | None = None, progress: bool = False,
                 max_stories: int | None = None, stats: dict | None = None) -> np.ndarray:
    """Occurrences of every GPT-2 id (length 50257) over a corpus; counts[50256] = number of stories.

    ``stories``: a path, None (the default source), a Source, or an iterable of story strings.
    """
    source = stories if isinstance(stories, Source) else resolve_source(stories)
    counts = np.zeros(N_GPT2, dtype=np.int64)
    with _progress(progress, source) as pbar:
        for ids in encode_stream(iter_stories(source, max_stories, stats, pbar), None, num_proc):
            counts += np.bincount(ids, minlength=N_GPT2)
    return counts


def _progress(enabled: bool, source: Source):
    """A tqdm bar over bytes read (files) or stories (hub), or a context that yields None."""
    if not enabled:
        return contextlib.nullcontext()
    from tqdm.auto import tqdm

    total = sum(f.stat().st_size for f in source.files) if source.kind == "files" else None
    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", smoothing=0.1)


# --- tokenized_dataset/ --------------------------------------------------------------------------

def _features():
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("uint16"))})


def _mapping_hash(tokenizer_or_hash) -> str:
    return tokenizer_or_hash if isinstance(tokenizer_or_hash, str) else tokenizer_or_hash.hash


def _read_build_file(path: Path) -> dict | None:
    try:
        return json.loads((path / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return None


def describe_dataset(path) -> str:
    """One line on what a built dataset holds: "977 rows x 512 tokens from 2,316 stories of SOURCE" (its
    duckling_build.json); "" for anything else (an array, a folder without the file)."""
    rec = _read_build_file(Path(path)) if isinstance(path, (str, os.PathLike)) else None
    if not rec or "n_rows" not in rec:
        return ""
    stories = f"{rec['n_stories']:,} stories of " if rec.get("n_stories") is not None else ""
    return f"{rec['n_rows']:,} rows x {rec.get('seq_len')} tokens from {stories}{rec.get('source')}"


def check_no_dead(ds, n_live: int = config.N_LIVE, seq_len: int | None = None) -> dict:
    """Scan every token of a built dataset (memory-mapped, chunk by chunk): no id may be >= n_live.

    Returns token statistics; raises DucklingError naming the first offending row.
    """
    n_rows = n_tokens = n_unk = n_eot = 0
    for chunk in ds.data.column("input_ids").chunks:  # pyarrow ListArray chunks
        if seq_len is not None and len(chunk) and not np.all(chunk.value_lengths().to_numpy() == seq_len):
            raise DucklingError(f"Dataset rows are not all {seq_len} tokens long; rebuild it with `duckling build --force`.")
        ids = chunk.flatten().to_numpy()  # (rows * seq_len,) uint16, zero-copy
        if ids.size and ids.max() >= n_live:
            bad = n_rows + int(np.argmax(ids >= n_live)) // max(seq_len or 1, 1)
            raise DucklingError(
                f"Dead token ids (>= {n_live}) occur in the dataset, first near row {bad}: it was not built by "
                "this mapping's tokenizer. Rebuild it with `duckling build --force`.")
        n_rows, n_tokens = n_rows + len(chunk), n_tokens + ids.size
        n_unk += int(np.count_nonzero(ids == config.UNK_ID))
        n_eot += int(np.count_nonzero(ids == config.EOT_ID))
    return {"n_rows": n_rows, "n_tokens": n_tokens, "n_unk": n_unk, "n_eot": n_eot}


def _write_rows(source: Source, tok: CompactTokenizer, arrow_path: Path, seq_len: int, max_stories, num_proc,
                stats: dict, pbar) -> int:
    """Encode, pack into (rows, seq_len) uint16 blocks and append them to one Arrow file; returns rows."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    carry = np.empty(0, np.uint16)  # tokens waiting for the next row
    n_rows = 0
    with ArrowWriter(features=_features(), path=str(arrow_path)) as writer:
        for ids in encode_stream(iter_stories(source, max_stories, stats, pbar), tok.lut, num_proc):
            buf = np.concatenate([carry, ids])
            n = len(buf) // seq_len
            if n:
                offsets = np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int32)
                rows = pa.ListArray.from_arrays(offsets, pa.array(buf[: n * seq_len]))  # (n, seq_len)
                writer.write_table(pa.table({"input_ids": rows}))
                n_rows += n
            carry = buf[n * seq_len:]
        writer.finalize()
    stats["dropped_tokens"] = int(len(carry))  # the trailing partial row
    return n_rows


def _save_quietly(ds, path: Path) -> None:
    """save_to_disk without its own progress bar (ours already covered the build)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        ds.save_to_disk(str(path))
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def build_dataset(data=None, tokenizer=None, out=None, seq_len: int | None = None, split: str = "train",
                  max_stories: int | None = None, num_proc: int | None = None, force: bool = False,
                  progress: bool = True) -> dict:
    """Tokenize ``data`` with ``tokenizer`` and save ``out`` (HF save_to_disk) of seq_len-token rows.

    Idempotent: if ``out`` was built from the same source, mapping and seq_len, nothing is done. The
    output appears atomically (built next to it, then renamed); a failed build leaves nothing behind.
    Returns the build record (also saved as ``out/duckling_build.json``) with ``skipped`` set.
    """
    from datasets import Dataset, load_from_disk

    dcfg = config.DataConfig()
    tok = tokenizer if isinstance(tokenizer, CompactTokenizer) else CompactTokenizer.from_file(tokenizer or dcfg.mapping_path)
    out = Path(out or dcfg.dataset_dir)
    seq_len = seq_len or config.ModelConfig().n_positions
    source = data if isinstance(data, Source) else resolve_source(data, split)
    ident = source.identity()
    fingerprint = None if ident is None else hashlib.sha256(json.dumps(
        [BUILD_FORMAT, tok.hash, seq_len, max_stories, ident], sort_keys=True).encode()).hexdigest()
    if out.exists():
        old = _read_build_file(out)
        if old is None:
            raise DucklingError(
                f"{str(out)!r} exists and is not a Duckling dataset (no {BUILD_FILE}). Choose another --out, "
                "or move that folder away; Duckling will not overwrite it.")
        if fingerprint is not None and old.get("fingerprint") == fingerprint and not force:
            print(f"{out} is up to date ({old['n_rows']:,} rows from {old['source']}); nothing to do "
                  "(--force rebuilds).")
            return {**old, "skipped": True}
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    done = False
    try:
        (tmp / "work").mkdir(parents=True)
        stats: dict = {}
        with _progress(progress, source) as pbar:
            n_rows = _write_rows(source, tok, tmp / "work" / "rows.arrow", seq_len, max_stories, num_proc, stats, pbar)
        if n_rows == 0:
            raise DucklingError(
                f"The corpus is too small: {stats.get('n_stories', 0)} stories do not fill one {seq_len}-token row. "
                "Pass more text.")
        _save_quietly(Dataset.from_file(str(tmp / "work" / "rows.arrow")), tmp / "ds")
        checked = check_no_dead(load_from_disk(str(tmp / "ds")), tok.n_live, seq_len)  # on the files as written
        record = {"format_version": BUILD_FORMAT, "fingerprint": fingerprint, "mapping_hash": tok.hash,
                  "source": describe_source(source), "split": source.split, "seq_len": seq_len, "max_stories": max_stories,
                  "n_stories": stats["n_stories"], "text_sha256": stats["sha256"], **checked,
                  "unk_fraction": checked["n_unk"] / checked["n_tokens"], "dropped_tokens": stats["dropped_tokens"],
                  "dead_check": "passed"}
        write_json(tmp / "ds" / BUILD_FILE, record)
        if out.exists():  # replace an older Duckling dataset: move it aside, swap, and put it back on failure
            os.replace(out, tmp / "old")
        try:
            os.replace(tmp / "ds", out)
        except OSError:
            if (tmp / "old").exists():
                os.replace(tmp / "old", out)
            raise
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made if not done else ():  # a failed build leaves no folder it created behind
            with contextlib.suppress(OSError):
                p.rmdir()
    print(f"wrote {out}: {record['n_rows']:,} rows x {seq_len} tokens from {record['n_stories']:,} stories, "
          f"unk {record['unk_fraction']:.3%}, no dead ids (checked every token)")
    if record["unk_fraction"] > UNK_WARN:
        print(f"warning: {record['unk_fraction']:.0%} of the tokens are unk, outside the mapping's live tokens "
              "(TinyStories gives under 1%): the mapping was counted on other text. For this corpus, count its own "
              "with `duckling vocab --data CORPUS --out MAPPING` and build with --mapping MAPPING.")
    return {**record, "skipped": False}


def load_dataset_dir(path=None, tokenizer_or_hash=None, fmt: str | None = "torch"):
    """Load a built ``tokenized_dataset/`` (memory-mapped) and check it was built by this mapping.

    ``tokenizer_or_hash``: a CompactTokenizer, its ``hash``, or None to skip the check.
    """
    from datasets import load_from_disk

    path = Path(path or config.DataConfig().dataset_dir)
    if not path.is_dir():
        raise DucklingError(f"No tokenized dataset at {str(path)!r}. Build it with `duckling build --data PATH "
                            f"--out {path}` (or without --data to use the hub).")
    record = _read_build_file(path)
    if record is None:
        raise DucklingError(f"{str(path)!r} is not a Duckling dataset (no readable {BUILD_FILE}). Rebuild it with "
                            f"`duckling build --out {path} --force` after moving it away.")
    if tokenizer_or_hash is not None and record.get("mapping_hash") != _mapping_hash(tokenizer_or_hash):
        raise DucklingError(
            f"{str(path)!r} was built with another token mapping (hash {str(record.get('mapping_hash'))[:12]}, "
            f"this one is {_mapping_hash(tokenizer_or_hash)[:12]}): its ids mean different tokens. Rebuild it with "
            "`duckling build --mapping YOUR_MAPPING --force`, or load the mapping it was built with.")
    ds = load_from_disk(str(path))
    if fmt:
        ds.set_format(fmt, columns=["input_ids"])
    return ds
