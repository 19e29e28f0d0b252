"""Write vitsd_nbdev/assets/digits.npz, the digits this package ships, from scikit-learn's copy.

Run once from the repository root, with the development extra installed (it has scikit-learn):
`.venv/bin/python tools/make_digits.py`. The arrays are exactly `sklearn.datasets.load_digits()`'s:
`images`, uint8 [1797, 8, 8] with the original values 0..16 (ink counts in 4×4 blocks), and
`labels`, uint8 [1797]. The file's bytes carry zip timestamps, so a rerun gives equal arrays, not
equal bytes; tests/test_data.py compares the arrays with scikit-learn's where scikit-learn is
installed. Licence and attribution: vitsd_nbdev/assets/DIGITS_LICENSE.md.
"""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "vitsd_nbdev" / "assets" / "digits.npz"


def main():
    d = load_digits()
    images, labels = d.images.astype(np.uint8), d.target.astype(np.uint8)
    # nothing lost in the cast
    assert np.array_equal(images, d.images) and np.array_equal(labels, d.target)
    assert images.shape == (1797, 8, 8) and images.max() == 16 and set(labels) == set(range(10))
    np.savez_compressed(OUT, images=images, labels=labels)
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
