"""Prompts shared by the benchmarks: distinct, same length, so no request reuses another's cache."""

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
         "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def prompt_text(i: int, n_words: int, shared_prefix: str = "") -> str:
    return shared_prefix + f"Story {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n_words))
