"""Text for the tests: the shared TinyStories slice when it sits beside the repo, else generated
TinyStories-like stories (a fresh clone without ../shared/data must still pass)."""
from __future__ import annotations

import random
from pathlib import Path

SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
WORDS = ("the a little dog cat girl boy park ball tree happy sad big red saw played ran jumped said "
         "friend mom sun day was and with to her his they went home").split()


def make_stories(n: int, seed: int = 0) -> list[str]:
    """``n`` generated two-paragraph stories of live words."""
    rng = random.Random(seed)
    return [f"Once upon a time, {' '.join(rng.choices(WORDS, k=rng.randint(20, 60)))}.\n"
            f"\"{rng.choice(['Look', 'Yes', 'Wow'])}!\" said {rng.choice(['Lily', 'Tom', 'Sue'])}." for _ in range(n)]


def shared_stories(split: str, n: int, skip: int = 0) -> list[str] | None:
    """Stories ``skip..skip+n`` of the shared ``split`` (train | valid), or None when it is absent."""
    from duckling.data.build import iter_stories, resolve_source

    folder = SHARED_TEXT / split
    if not (folder.is_dir() and any(folder.glob("*.txt"))):
        return None
    return list(iter_stories(resolve_source(folder), max_stories=skip + n))[skip:]


def write_corpus(path, stories):
    """A corpus file in the TinyStories format: each story followed by an <|endoftext|> line."""
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path
