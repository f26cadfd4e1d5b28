"""Trustworthy telemetry: per-reading data quality and group estimation with honest intervals.

Feed readings to a ``QualityClassifier`` as they arrive; once per telemetry period take its
``snapshot`` and pass it to ``GroupEstimator.cycle``; aggregate the resulting ``CycleEstimate``
over any grouping into ``GroupEstimate``s.
"""

from gateway.telemetry.commands import CommandBoard, CommandInForce
from gateway.telemetry.estimator import (
    LAGS,
    CycleEstimate,
    EstimatorConfig,
    GroupEstimate,
    GroupEstimator,
)
from gateway.telemetry.fleet import CLASSES, DeviceProfile, FleetIndex
from gateway.telemetry.quality import (
    BatchQuality,
    Detail,
    DeviceStatus,
    FleetSnapshot,
    QualityClassifier,
    QualityConfig,
    RawReading,
    ReadingQuality,
    Source,
    TelemetryQuality,
    Validity,
    fingerprint_of,
)

__all__ = [
    "CLASSES",
    "LAGS",
    "BatchQuality",
    "CommandBoard",
    "CommandInForce",
    "CycleEstimate",
    "Detail",
    "DeviceProfile",
    "DeviceStatus",
    "EstimatorConfig",
    "FleetIndex",
    "FleetSnapshot",
    "GroupEstimate",
    "GroupEstimator",
    "QualityClassifier",
    "QualityConfig",
    "RawReading",
    "ReadingQuality",
    "Source",
    "TelemetryQuality",
    "Validity",
    "fingerprint_of",
]
