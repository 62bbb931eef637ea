"""Build the built-in sample disk: a sparse raw image with a mix of text-like,
random and zero regions, partly unaligned (no download needed)."""

import os
import random
import sys

SIZE = 64 * 1024 * 1024


def main(path: str) -> None:
    rng = random.Random(20261121)
    words = [b"qcow2", b"cluster", b"refcount", b"snapshot", b"backing", b"nova", b"image",
             b"compute", b"host", b"disk", b"sparse", b"zstd", b"deflate", b"\n"]
    with open(path, "wb") as f:
        f.truncate(SIZE)
        pos = 0
        while pos < SIZE:
            kind = rng.choice(("text", "text", "random", "hole", "hole", "zeros"))
            n = rng.choice((4096, 65536, 300000, 1 << 20)) + rng.randrange(0, 4096, 512)
            n = min(n, SIZE - pos)
            if kind == "text":
                buf = b" ".join(rng.choice(words) for _ in range(n // 5))[:n]
                f.seek(pos)
                f.write(buf.ljust(n, b"."))
            elif kind == "random":
                f.seek(pos)
                f.write(rng.randbytes(n))
            elif kind == "zeros":
                f.seek(pos)
                f.write(bytes(n))
            pos += n


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sample.raw")
    print(os.path.getsize(sys.argv[1] if len(sys.argv) > 1 else "sample.raw"))
