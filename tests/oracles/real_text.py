"""Real English text that nobody here wrote, read at run time from an installed package.

Python's own reference documentation ships inside the interpreter as `pydoc_data.topics`
(about 465k characters). Calibration and evaluation use disjoint topics, so a held-apart text
is really held apart. No prose is committed to this repository.
"""

import pydoc_data.topics


def _topics(parity: int) -> str:
    names = sorted(pydoc_data.topics.topics)
    return "\n\n".join(pydoc_data.topics.topics[n] for i, n in enumerate(names) if i % 2 == parity)


def calibration_text() -> str:
    return _topics(0)


def heldout_text() -> str:
    return _topics(1)


def write(path, text) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)
