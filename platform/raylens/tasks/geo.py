"""Great-circle error for place classification: predicted class centroid vs true coordinates."""

from __future__ import annotations

import numpy as np

EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (broadcasts)."""
    lat1, lon1, lat2, lon2 = (
        np.radians(np.asarray(x, dtype=np.float64)) for x in (lat1, lon1, lat2, lon2)
    )
    a = (
        np.sin((lat2 - lat1) / 2) ** 2
        + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def class_centroids(
    labels: np.ndarray, lat: np.ndarray, lon: np.ndarray, num_classes: int
) -> np.ndarray:
    """``[num_classes, 2]`` (lat, lon) centroid of each class's samples, NaN for empty classes.

    The centroid is the normalized mean of unit vectors, so classes spanning the
    antimeridian get a sensible centre.
    """
    phi, lam = np.radians(lat), np.radians(lon)
    xyz = np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=1)
    out = np.full((num_classes, 2), np.nan)
    for c in range(num_classes):
        m = labels == c
        if not m.any():
            continue
        v = xyz[m].mean(axis=0)
        v /= np.linalg.norm(v) or 1.0
        out[c] = np.degrees([np.arcsin(v[2]), np.arctan2(v[1], v[0])])
    return out


def median_error_km(
    pred: np.ndarray, lat: np.ndarray, lon: np.ndarray, centroids: np.ndarray
) -> float:
    """Median distance from each sample's true (lat, lon) to its predicted class's centroid."""
    c = centroids[np.asarray(pred)]
    return float(np.nanmedian(haversine_km(lat, lon, c[:, 0], c[:, 1])))
