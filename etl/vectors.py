"""Embedding vectors on Spark: unit rows, spherical k-means fitted on a capped sample, and
nearest-centre assignment in one vectorised pass.

Near dedup (:mod:`etl.dedup`) and DataComp's image-based filter (:mod:`etl.targets`) share
this k-means. The fit runs on at most ``fit_rows`` rows sampled on the executors; only the
``k x dim`` centres come to the driver, and they reach the executors as one broadcast.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf

from etl.compat import Shared, Staging

FIT_ROWS = 200_000  # default cap on the rows k-means is fitted on
BLOCK = 4096  # rows per matrix product in an assignment batch


def unit_rows(values: pd.Series) -> np.ndarray:
    """Stack a Series of vectors into a float32 matrix with L2-normalised rows."""
    mat = np.stack([np.asarray(v, dtype=np.float32) for v in values])
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    return mat / np.maximum(norms, 1e-12)


def fit_centers(emb: DataFrame, k: int, iters: int, seed: int = 0, fit_rows: int = FIT_ROWS,
                count: int | None = None, col: str = "embedding") -> np.ndarray:
    """Unit-length centres (``k x dim``) of spherical k-means (pyspark.ml KMeans, cosine
    distance) fitted on a seeded sample of at most about ``fit_rows`` non-null rows."""
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector

    rows = emb.where(F.col(col).isNotNull())
    n = rows.count() if count is None else count
    vec = rows.select(array_to_vector(col).alias("_vec"))
    sample = vec if n <= fit_rows else vec.sample(False, min(1.0, 1.2 * fit_rows / n), seed)
    model = KMeans(k=k, maxIter=iters, seed=seed, distanceMeasure="cosine",
                   featuresCol="_vec").fit(sample)
    centers = np.stack([np.asarray(c, np.float32) for c in model.clusterCenters()])
    return centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)


def nearest(vectors: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the most cosine-similar centre of each unit row (ties: the lowest index)."""
    out = np.empty(len(vectors), np.int32)
    for s in range(0, len(vectors), BLOCK):
        out[s:s + BLOCK] = np.argmax(vectors[s:s + BLOCK] @ centers.T, axis=1)
    return out


def cluster_column(centers: np.ndarray, stage: Staging | None = None):
    """A column function: embedding -> index of its nearest centre (null for a null vector).
    The centres reach the workers in the UDF, or staged under ``stage`` when large
    (:class:`etl.compat.Shared`)."""
    shared = Shared((np.asarray(centers, np.float32),), stage)

    @pandas_udf("int")
    def assign(vectors: pd.Series) -> pd.Series:
        out = pd.Series(pd.NA, index=vectors.index, dtype="Int32")
        present = vectors.notna().to_numpy()
        if present.any():
            out[present] = nearest(unit_rows(vectors[present]), shared.value[0])
        return out

    def column(embedding: str | Column) -> Column:
        return assign(F.col(embedding) if isinstance(embedding, str) else embedding)

    return column
