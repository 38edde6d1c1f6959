"""Write scikit-learn's 8x8 digits in this project's own format with webdataset's ShardWriter: no
MANIFEST, no pipeline involved (as a user's existing shards would be).

    python examples/myproject/make_shards.py --out data/myproject-shards
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from sklearn.datasets import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-shard", type=int, default=150)
    args = parser.parse_args()
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    args.out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(args.out / "digits-%06d.tar"), maxcount=args.per_shard, verbose=0) as sink:
        for i, (image, digit) in enumerate(zip(images, digits.target, strict=True)):
            meta = {"height": image.shape[0], "width": image.shape[1], "digit": int(digit)}
            sink.write(
                {"__key__": f"digit{i:05d}", "pixels.bin": image.tobytes(), "meta.json": json.dumps(meta)}
            )
    print(f"wrote {len(images)} samples to {args.out}")


if __name__ == "__main__":
    main()
