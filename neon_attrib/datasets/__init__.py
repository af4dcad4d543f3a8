"""Small data sets embedded in the package (with their licences), for demos, docs and tests.

* ``wholesale_customers.csv``: UCI "Wholesale customers" (id 292), 440 customers × annual spending in 6 product
  categories. CC BY 4.0; cite Cardoso, M. (2013), UCI Machine Learning Repository, https://doi.org/10.24432/C5030X.
  See ``WHOLESALE_LICENSE.md`` beside this file.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

__all__ = ["load_wholesale", "preprocess_wholesale", "WHOLESALE_FEATURES"]

#: The six spending categories, in the CSV's order and spelling ("Delicassen" is the original's).
WHOLESALE_FEATURES: tuple[str, ...] = ("Fresh", "Milk", "Grocery", "Frozen", "Detergents_Paper", "Delicassen")


def load_wholesale() -> tuple[np.ndarray, list[str]]:
    """Load the Wholesale customers data: the raw annual spending (440, 6) as float64, and the feature names.

    Rows keep the file's order; the book's "instance 338" and "instance 339" are rows 337 and 338 (0-based). The
    ``Channel`` and ``Region`` columns are dropped, as in the book.

    Examples
    --------
    >>> X, names = load_wholesale()
    >>> X.shape, names[3]
    ((440, 6), 'Frozen')
    >>> X[338].tolist()
    [3.0, 333.0, 7021.0, 15601.0, 15.0, 550.0]
    """
    text = resources.files(__name__).joinpath("wholesale_customers.csv").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0].split(",")
    columns = [header.index(name) for name in WHOLESALE_FEATURES]
    rows = [[float(line.split(",")[c]) for c in columns] for line in lines[1:]]
    return np.asarray(rows, dtype=np.float64), list(WHOLESALE_FEATURES)


def preprocess_wholesale(X: np.ndarray) -> np.ndarray:
    """The book's preprocessing: natural logarithm of each spending, then standardisation (mean 0, variance 1)."""
    logged = np.log(np.asarray(X, dtype=np.float64))
    return (logged - logged.mean(0)) / logged.std(0)
