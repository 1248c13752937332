"""Where stories come from, and which split: the hub's ``roneneldan/TinyStories``, local text (a .txt
file, a folder of them, or a split folder with train/, validation/ (valid/, val/) and test/ subfolders),
the bundled sample, or an iterable of strings; streamed as stripped stories (``iter_stories``)."""
from __future__ import annotations

import codecs
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from duckling import config
from duckling.errors import DucklingError

EOT_TEXT = "<|endoftext|>"
BATCH_CHARS = 1 << 20  # text per worker task: big enough to amortise IPC, small enough to bound memory
MAX_STORY_CHARS = 64 << 20  # a "story" this long means the file has no <|endoftext|> separators


@dataclass
class Source:
    """Where stories come from: ``files`` (local .txt), ``hub`` (name + split) or ``stories`` (an iterable)."""

    kind: str
    files: list[Path] = field(default_factory=list)
    name: str = config.HUB_DATASET
    split: str = "train"
    stories: Iterable[str] | None = None

    def identity(self) -> dict | None:
        """What decides whether a build is up to date; None = unknown (an iterable), always rebuild."""
        if self.kind == "files":
            return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]}
        if self.kind == "hub":
            return {"hub": self.name, "split": self.split}
        return None


# Split names and the folder names that hold each split's text in a local split folder.
SPLITS = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}


def canonical_split(split: str) -> str:
    """'valid' and 'val' -> 'validation'; other names unchanged."""
    return next((name for name, aliases in SPLITS.items() if split in aliases), split)


def _split_folders(path: Path) -> dict[str, Path]:
    """{split: subfolder} of a split folder (subfolders named train/, validation/ or valid/ or val/, test/)."""
    if not path.is_dir():
        return {}
    found = {}
    for name, aliases in SPLITS.items():
        for a in aliases:
            if (path / a).is_dir():
                found.setdefault(name, path / a)
    return found


def resolve_source(data=None, split: str = "train") -> Source:
    """``data``: a path, ``"sample"``, an iterable of stories, or None ($DUCKLING_DATA, else the hub).

    ``"sample"`` is the 500-story TinyStories sample bundled with the package (duckling/sample/), only
    ever when asked for by name: a hub failure is an error, never a silent switch to the sample. A
    local folder that is literally called ``sample`` is reached as ``./sample``.

    Splits are real for local text too. A *split folder* (subfolders ``train/``, ``validation/`` (or
    ``valid/``, ``val/``), ``test/``) gives each split its own text: ``split`` picks the subfolder, and
    a split it lacks is an error. A plain text file or folder of .txt files is one text set: passed as
    ``data`` it is the text of the split asked for (the file given for it); reached through
    $DUCKLING_DATA it is the training text, and any other split is an error (that variable names the
    corpus, so building "validation" from it would write the training rows again).
    """
    split = canonical_split(split)
    from_env = data is None and bool(os.environ.get("DUCKLING_DATA"))
    if data is None:
        data = os.environ.get("DUCKLING_DATA") or None
    if data is None:
        return Source("hub", split=split)
    if isinstance(data, str) and data == "sample":
        if split != "train":
            raise DucklingError(f"The bundled sample is one 500-story text set with no {split!r} split. Pass the "
                                f"{split} text itself with --data PATH, or a folder with train/ and {split}/ "
                                "subfolders.")
        sample = Path(__file__).parents[1] / "sample" / "tinystories_sample.txt"
        if not sample.is_file():
            raise DucklingError(f"The bundled sample {str(sample)!r} is missing; reinstall duckling "
                                "(pip install -e .) to restore it.")
        return Source("files", files=[sample])
    if not isinstance(data, (str, os.PathLike)):
        return Source("stories", stories=data)
    path = Path(data).expanduser()
    if not path.exists():
        raise DucklingError(
            f"Data path {str(path)!r} does not exist. Pass a .txt file or a folder of .txt files (stories "
            "separated by <|endoftext|> lines) with --data or $DUCKLING_DATA, or leave both unset to use "
            f"the hub's {config.HUB_DATASET}.")
    where = f"$DUCKLING_DATA ({str(path)!r})" if from_env else repr(str(path))
    folders = _split_folders(path)
    if folders:
        if split not in folders:
            raise DucklingError(
                f"{where} is a split folder with {', '.join(f'{k} ({v.name}/)' for k, v in folders.items())} but no "
                f"{split!r} split: add a {split}/ subfolder of .txt files, or pass the {split} text itself with "
                "--data PATH.")
        path = folders[split]
    elif split != "train" and from_env:
        raise DucklingError(
            f"{where} is one text set (no train/ and {split}/ subfolders), read as the training text: it cannot "
            f"give the {split!r} split, and building from it would write training rows as held-out ones. Pass the "
            f"{split} text with --data PATH --split {split}, or point DUCKLING_DATA at a folder with train/ and "
            f"{split}/ (or valid/) subfolders.")
    if path.is_file():
        return Source("files", files=[path], split=split)
    files = sorted(p for p in path.glob("*.txt") if p.is_file())
    if not files:
        subs = sorted({p.parent.name for p in path.glob("*/*.txt")})
        hint = f" Its subfolders {subs} hold .txt files: pass one of them." if subs else ""
        raise DucklingError(
            f"Folder {str(path)!r} has no .txt files.{hint} A corpus is a .txt file or a folder of .txt files "
            "with stories separated by <|endoftext|> lines.")
    return Source("files", files=files, split=split)


def describe_source(source: Source) -> str:
    if source.kind == "files":
        return ", ".join(str(f) for f in source.files[:3]) + (f" (+{len(source.files) - 3} files)" if len(source.files) > 3 else "")
    if source.kind == "hub":
        return f"hub:{source.name} split={source.split}"
    return "an iterable of stories"


def _read_file(path: Path, pbar=None) -> Iterator[str]:
    """Stream one file's stories (text between <|endoftext|> markers), 1 MB at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # strict: non-UTF-8 text fails loudly
    buf, pos = "", 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(BATCH_CHARS)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise DucklingError(
                    f"{str(path)!r} is not UTF-8 text (byte {pos + e.start}: {e.reason}). Convert it, e.g. "
                    "`iconv -f latin1 -t utf-8 IN > OUT`, or move it out of the corpus folder.") from e
            pos += len(chunk)
            if pbar is not None:
                pbar.update(len(chunk))
            *parts, buf = (buf + text).split(EOT_TEXT)
            yield from parts
            if len(buf) > MAX_STORY_CHARS:
                raise DucklingError(
                    f"{str(path)!r} has over {MAX_STORY_CHARS >> 20}M characters without an {EOT_TEXT} "
                    f"line. Separate stories with a line holding exactly {EOT_TEXT}.")
            if not chunk:
                break
    yield buf


def _hub_stories(source: Source, pbar=None) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(source.name, split=source.split)
    except (ValueError, KeyError) as e:
        if not any(w in str(e).lower() for w in ("unknown split", "bad split")):
            raise _hub_unreachable(source, e) from e
        raise DucklingError(f"The hub's {source.name!r} has no split {source.split!r} ({str(e)[:200]}): pass one of "
                            "its splits with --split (TinyStories: train, validation).") from e
    except Exception as e:  # offline, DNS, 404, offline-mode flags: all mean "use local files"
        raise _hub_unreachable(source, e) from e
    if pbar is not None:
        pbar.reset(total=len(ds))
        pbar.unit = " stories"
    for batch in ds.iter(batch_size=1000):
        if pbar is not None:
            pbar.update(len(batch["text"]))
        yield from batch["text"]


def _hub_unreachable(source: Source, e: BaseException) -> DucklingError:
    return DucklingError(
        f"Could not load {source.name!r} (split {source.split!r}) from the Hugging Face hub "
        f"({type(e).__name__}: {str(e)[:200]}). Without internet, pass local text instead: --data PATH "
        "(DUCKLING_DATA=PATH; in a notebook, the DATA parameter), a .txt file or folder of .txt files with "
        f"stories separated by {EOT_TEXT} lines, or --data sample (DATA = \"sample\") for the bundled "
        "500-story sample.")


def iter_stories(source: Source, max_stories: int | None = None, stats: dict | None = None,
                 pbar=None) -> Iterator[str]:
    """Stripped, non-empty stories. ``stats`` gets n_stories, n_chars and a sha256 of the text."""
    if source.kind == "files":
        raw = (s for f in source.files for s in _read_file(f, pbar))
    elif source.kind == "hub":
        raw = _hub_stories(source, pbar)
    else:
        raw = iter(source.stories)
    h, n, chars = hashlib.sha256(), 0, 0
    for s in raw:
        s = s.strip()
        if not s:
            continue
        if max_stories is not None and n >= max_stories:
            break
        h.update(s.encode())
        h.update(b"\0")
        n, chars = n + 1, chars + len(s)
        if pbar is not None and source.kind == "stories":
            pbar.update(len(s))
        yield s
    if stats is not None:
        stats.update(n_stories=n, n_chars=chars, sha256=h.hexdigest())
    if n == 0:
        raise DucklingError(
            f"The corpus {describe_source(source)} holds no stories (it is empty or only separators). "
            f"Pass text files with stories separated by {EOT_TEXT} lines.")
