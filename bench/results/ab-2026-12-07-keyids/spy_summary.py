"""Busy samples per frame of a py-spy raw profile (collapsed stacks), inclusive and self.
Run: spy_summary.py FILE [N]."""
import collections
import re
import sys
from pathlib import Path

IDLE = re.compile(r"poll \(|_poll|select|sleep|wait \(")


def main(path: str, top: int) -> None:
    incl: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = busy = 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rstrip().rsplit(" ", 1)
        frames = stack.split(";")
        total += int(n)
        if IDLE.search(frames[-1]):
            continue
        busy += int(n)
        own[frames[-1]] += int(n)
        for key in {re.sub(r":\d+\)", ")", f) for f in frames}:
            incl[key] += int(n)
    print(f"total {total} busy {busy} ({100 * busy / total:.0f}%)")
    for title, counts in (("inclusive", incl), ("self", own)):
        print(f"--- {title}")
        for k, v in counts.most_common(top):
            print(f"{100 * v / busy:5.1f}% {k[:150]}")


main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
