"""The compact vocabulary: GPT-2 BPE (tiktoken ``gpt2``) ids -> 8,192 compact ids.

Compact ids 0..N_LIVE-1 are *live*: end-of-text, unknown, then the N_LIVE-2 most frequent GPT-2
tokens of a corpus. Ids N_LIVE..VOCAB_SIZE-1 are *dead*: real GPT-2 tokens (the next most
frequent, then unseen ones by GPT-2 id) that the tokenizer never emits; their occurrences map to
the unknown id. So dead tokens are absent from the training data by construction, yet each dead
row of W still has a name for plots. ``token_mapping.json`` holds the table plus its provenance.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from duckling import config
from duckling.errors import DucklingError
from duckling.files import write_atomic

FORMAT_VERSION = 1
UNK_TEXT = "<|unk|>"  # how the unknown id decodes; it has no GPT-2 id (null in the JSON)
N_GPT2 = 50257  # size of the gpt2 encoding, <|endoftext|> included
GPT2_EOT = 50256


# GPT-2's BPE merges, bundled so that the gpt2 encoding works offline: OpenAI's vocab.bpe, gzipped
# byte for byte (see duckling/bpe/README.md). tiktoken downloads the same file (it pins this sha256).
_BUNDLED_BPE = Path(__file__).parents[1] / "bpe" / "vocab.bpe.gz"
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def get_encoding(name: str = config.BASE_ENCODING):
    """tiktoken's encoding. ``gpt2`` is built from the bundled BPE file (no download, no cache, works
    offline; identical to ``tiktoken.get_encoding("gpt2")``, see tests/test_quickstart.py); any other
    name goes through tiktoken, with a clear error when its files cannot be fetched."""
    if name == "gpt2":
        return _bundled_gpt2()
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # network errors surface as many types
        raise DucklingError(
            f"tiktoken could not load the {name!r} BPE files ({type(e).__name__}: {e}). It downloads "
            "them once and caches them; offline, set TIKTOKEN_CACHE_DIR to a folder that already holds "
            "them or run once with internet access (only 'gpt2' ships with Duckling)."
        ) from e


@functools.cache
def _bundled_gpt2():
    """tiktoken's ``gpt2`` Encoding, with its mergeable ranks read from the bundled vocab.bpe."""
    import tiktoken
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    try:
        raw = gzip.decompress(_BUNDLED_BPE.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DucklingError(f"The bundled GPT-2 BPE file {str(_BUNDLED_BPE)!r} cannot be read ({e}); reinstall "
                            "duckling (pip install -e .) to restore it.") from e
    if hashlib.sha256(raw).hexdigest() != _VOCAB_BPE_SHA256:
        raise DucklingError(f"The bundled GPT-2 BPE file {str(_BUNDLED_BPE)!r} is corrupted (sha256 mismatch); "
                            "reinstall duckling (pip install -e .) to restore it.")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=_ranks_from_vocab_bpe(raw.decode()),
                             special_tokens={ENDOFTEXT: GPT2_EOT}, explicit_n_vocab=N_GPT2)


def _ranks_from_vocab_bpe(text: str) -> dict[bytes, int]:
    """GPT-2's token bytes -> rank, from vocab.bpe: the 256 single bytes, then one token per merge line.

    vocab.bpe spells bytes as printable characters (GPT-2's byte-to-unicode table: printable
    non-space bytes stand for themselves, the other 68 for chr(256 + n) in byte order). This is
    the computation of tiktoken's ``data_gym_to_mergeable_bpe_ranks``, on text instead of a URL.
    """
    shown = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    hidden = [b for b in range(256) if b not in set(shown)]
    char_to_byte = {**{chr(b): b for b in shown}, **{chr(256 + n): b for n, b in enumerate(hidden)}}
    ranks = {bytes([b]): i for i, b in enumerate(shown + hidden)}
    for rank, line in enumerate(text.split("\n")[1:-1], start=len(ranks)):  # line 0: "#version: 0.2"
        first, second = line.split()
        ranks[bytes(char_to_byte[c] for c in first + second)] = rank
    if len(ranks) != GPT2_EOT:
        raise DucklingError(f"The bundled GPT-2 BPE file gives {len(ranks)} tokens, not {GPT2_EOT}; reinstall duckling.")
    return ranks


# --- corpus statistics (notebook 01) -------------------------------------------------------------

def coverage_curve(counts: np.ndarray) -> np.ndarray:
    """coverage[k-1] = fraction of all token occurrences covered by the k most frequent tokens."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise DucklingError("The token counts are all zero: the corpus is empty. Pass a corpus with text.")
    return np.cumsum(np.sort(counts)[::-1]) / total  # (n_tokens,)


def min_vocab_for_coverage(counts: np.ndarray, coverage: float = 0.995) -> int:
    """The fewest most-frequent tokens whose occurrences reach ``coverage`` of the corpus."""
    curve = coverage_curve(counts)
    return int(min(np.searchsorted(curve, coverage - 1e-12) + 1, len(curve)))


# --- the mapping ---------------------------------------------------------------------------------

def _table_hash(gpt2_ids: list, n_live: int, base: str) -> str:
    """sha256 of the canonical id table: what a dataset or run must agree on to be compatible."""
    canon = json.dumps({"base_encoding": base, "n_live": n_live, "gpt2_ids": gpt2_ids}, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


class CompactTokenizer:
    """GPT-2 BPE followed by a lookup table into the compact vocabulary.

    ``gpt2_ids[c]`` is the GPT-2 id of compact id ``c`` (-1 for the unknown token), ``counts[c]`` its
    corpus count (for unknown: the occurrences of every non-live token). ``lut`` maps any GPT-2 id to
    its compact id, UNK for everything outside the live set, so dead ids can never be emitted.
    """

    def __init__(self, gpt2_ids, counts=None, provenance: dict | None = None,
                 n_live: int = config.N_LIVE, base_encoding: str = config.BASE_ENCODING):
        self.gpt2_ids = np.asarray(gpt2_ids, dtype=np.int64)  # (vocab,)
        self.counts = np.zeros(len(self.gpt2_ids), np.int64) if counts is None else np.asarray(counts, np.int64)
        self.n_live = int(n_live)
        self.n_dead = len(self.gpt2_ids) - self.n_live
        self.base_encoding = base_encoding
        self.provenance = dict(provenance or {})
        self.eot_id, self.unk_id = config.EOT_ID, config.UNK_ID
        self._enc = get_encoding(base_encoding)
        self.id_to_text = [UNK_TEXT if g < 0 else _token_text(self._enc, int(g)) for g in self.gpt2_ids]
        self.lut = np.full(N_GPT2, self.unk_id, dtype=np.uint16)  # gpt2 id -> compact id
        live = self.gpt2_ids[: self.n_live]
        self.lut[live[live >= 0]] = np.flatnonzero(live >= 0)
        self.hash = _table_hash([int(g) if g >= 0 else None for g in self.gpt2_ids], self.n_live, base_encoding)

    # sizes and id sets
    def __len__(self) -> int:
        return len(self.gpt2_ids)

    @property
    def vocab_size(self) -> int:
        return len(self)

    @property
    def live_ids(self) -> np.ndarray:
        return np.arange(self.n_live)

    @property
    def dead_ids(self) -> np.ndarray:
        return np.arange(self.n_live, len(self))

    def token_text(self, compact_id: int) -> str:
        return self.id_to_text[int(compact_id)]

    def __repr__(self) -> str:
        return f"CompactTokenizer(live={self.n_live}, dead={self.n_dead}, hash={self.hash[:12]})"

    # encoding and decoding
    def map_gpt2(self, gpt2_ids) -> np.ndarray:
        """GPT-2 ids -> compact ids (uint16); every non-live token becomes unk."""
        return self.lut[np.asarray(gpt2_ids, dtype=np.int64)]

    def encode(self, text: str) -> list[int]:
        """Text -> compact ids. ``<|endoftext|>`` inside ``text`` is ordinary text, as in the corpus."""
        return self.map_gpt2(self._enc.encode_ordinary(text)).tolist()

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        batch = self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads or os.cpu_count() or 1)
        return [self.map_gpt2(ids).tolist() for ids in batch]

    def decode(self, ids) -> str:
        """Compact ids -> text; unknown ids become ``<|unk|>``, end-of-text ``<|endoftext|>``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise DucklingError(f"decode got ids outside 0..{len(self) - 1}; pass compact ids from this tokenizer.")
        g = self.gpt2_ids[ids]
        # Decode runs between unknown ids as bytes so multi-token UTF-8 characters survive.
        out, run = [], []
        for x in g.tolist():
            if x < 0:
                out += [self._enc.decode_bytes(run), UNK_TEXT.encode()]
                run = []
            else:
                run.append(x)
        out.append(self._enc.decode_bytes(run))
        return b"".join(out).decode("utf-8", errors="replace")

    # building, saving, loading
    @classmethod
    def from_counts(cls, counts: np.ndarray, provenance: dict | None = None,
                    n_live: int = config.N_LIVE, n_dead: int = config.N_DEAD) -> "CompactTokenizer":
        """Build from GPT-2 token counts (length 50257; counts[50256] = number of stories).

        Order: EOT, UNK, then every other GPT-2 id by descending count, ties by GPT-2 id, so unseen
        tokens come last in GPT-2 id order. The first n_live-2 are live, the next n_dead dead.
        """
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (N_GPT2,):
            raise DucklingError(f"Token counts must have one entry per GPT-2 id ({N_GPT2}), got shape {counts.shape}.")
        ids = np.arange(N_GPT2)
        ids = ids[ids != GPT2_EOT]
        order = ids[np.lexsort((ids, -counts[ids]))]  # by -count, then gpt2 id
        n_reg = n_live - 2
        live, dead = order[:n_reg], order[n_reg: n_reg + n_dead]
        gpt2 = np.concatenate([[GPT2_EOT, -1], live, dead])
        total = int(counts.sum())
        unk_count = total - int(counts[GPT2_EOT]) - int(counts[live].sum())
        tok_counts = np.concatenate([[counts[GPT2_EOT], unk_count], counts[live], counts[dead]])
        prov = dict(provenance or {})
        prov.setdefault("n_tokens", total)
        prov["coverage"] = round(1.0 - unk_count / max(total, 1), 6)
        prov["distinct_tokens"] = int((counts > 0).sum())
        prov["min_vocab_for_99.5%"] = min_vocab_for_coverage(counts, 0.995) if total else None
        return cls(gpt2, tok_counts, prov, n_live=n_live)

    def coverage(self, counts: np.ndarray) -> float:
        """Fraction of the token occurrences in ``counts`` (per GPT-2 id) that map to a live id."""
        counts = np.asarray(counts, dtype=np.int64)
        live = self.gpt2_ids[: self.n_live]
        return float(counts[live[live >= 0]].sum() / max(int(counts.sum()), 1))

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "base_encoding": self.base_encoding,
            "vocab_size": len(self), "n_live": self.n_live, "n_dead": self.n_dead,
            "special_ids": {"eot": self.eot_id, "unk": self.unk_id},
            "mapping_hash": self.hash,
            "provenance": self.provenance,
            "tokens": [{"id": i, "gpt2_id": (int(g) if g >= 0 else None), "text": t, "count": int(c)}
                       for i, (g, t, c) in enumerate(zip(self.gpt2_ids, self.id_to_text, self.counts))],
        }

    def save(self, path) -> Path:
        """Write the JSON (one token per line, so diffs stay readable) atomically."""
        d = self.to_dict()
        tokens = d.pop("tokens")
        head = json.dumps(d, indent=2, ensure_ascii=False)[:-2]  # drop the closing "\n}"
        body = ",\n".join("    " + json.dumps(t, ensure_ascii=False) for t in tokens)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, f'{head},\n  "tokens": [\n{body}\n  ]\n}}\n')
        return path

    @classmethod
    def from_file(cls, path=None) -> "CompactTokenizer":
        """Load and validate ``token_mapping.json`` (default: config's mapping_path)."""
        path = Path(path or config.DataConfig().mapping_path)
        if not path.is_file():
            raise DucklingError(
                f"Token mapping {str(path)!r} not found. Use the committed token_mapping.json at the repo's top "
                "level, or build one with `duckling vocab --data PATH --out FILE`.")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            tokens = d["tokens"]
            gpt2 = [-1 if t["gpt2_id"] is None else int(t["gpt2_id"]) for t in tokens]
            ids = [int(t["id"]) for t in tokens]
            counts = [int(t.get("count", 0)) for t in tokens]
            n_live, n_dead, base = int(d["n_live"]), int(d["n_dead"]), d["base_encoding"]
            version, specials, stored_hash = d["format_version"], d["special_ids"], d["mapping_hash"]
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise DucklingError(
                f"Token mapping {str(path)!r} is malformed ({type(e).__name__}: {e}). Restore the committed "
                "token_mapping.json (git checkout token_mapping.json) or rebuild it with `duckling vocab`.") from e
        problems = []
        if version != FORMAT_VERSION:
            problems.append(f"format_version {version} (expected {FORMAT_VERSION})")
        if (n_live, n_dead, len(tokens)) != (config.N_LIVE, config.N_DEAD, config.VOCAB_SIZE):
            problems.append(f"sizes live={n_live} dead={n_dead} total={len(tokens)} (expected "
                            f"{config.N_LIVE}/{config.N_DEAD}/{config.VOCAB_SIZE})")
        if ids != list(range(len(tokens))):
            problems.append("token ids are not 0..N-1 in order")
        if specials != {"eot": config.EOT_ID, "unk": config.UNK_ID} or gpt2[:2] != [GPT2_EOT, -1]:
            problems.append("special ids are not eot=0 (<|endoftext|>) and unk=1 (null gpt2_id)")
        real = gpt2[2:]
        if any(g < 0 or g >= N_GPT2 or g == GPT2_EOT for g in real) or len(set(real)) != len(real):
            problems.append(f"gpt2_ids must be distinct ids in 0..{N_GPT2 - 2}")
        if not problems and _table_hash([None if g < 0 else g for g in gpt2], n_live, base) != stored_hash:
            problems.append("mapping_hash does not match the id table (the file was edited by hand?)")
        if problems:
            raise DucklingError(
                f"Token mapping {str(path)!r} is invalid: {'; '.join(problems)}. Duckling needs "
                f"{config.N_LIVE} live + {config.N_DEAD} dead ids; restore the committed token_mapping.json "
                "or rebuild it with `duckling vocab --data PATH`.")
        return cls(gpt2, counts, d.get("provenance", {}), n_live=n_live, base_encoding=base)


def _token_text(enc, gpt2_id: int) -> str:
    # Byte-level tokens may be partial UTF-8; backslash escapes keep them unambiguous.
    return enc.decode_single_token_bytes(gpt2_id).decode("utf-8", errors="backslashreplace")
