"""lightning-ntk: neural-tangent-kernel surrogates of a network, their fidelity, and data attribution."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lightning-ntk")  # the one place it is set is pyproject.toml
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from .attribution import Attribution, attribute  # noqa: E402 (the store manifests import __version__ from here)
from .callback import NTKAttributionCallback  # noqa: E402
from .config import ProjectionConfig, StoreConfig, SubsetConfig, SurrogateConfig  # noqa: E402
from .featurize import FeatureSpec, Featurizer, embedding_features, gradient_features, project_features  # noqa: E402
from .jacobian import FunctionalForwardError, NonFiniteGradientError  # noqa: E402
from .kernels import exact_kernel, factored_kernel, kernel_blocks, kernel_from_features  # noqa: E402
from .metrics import KendallTau, SurrogateFidelity  # noqa: E402
from .pipeline import Checkpoint, CheckpointFeatures, CheckpointRecord, FidelityPipeline  # noqa: E402
from .projection import RandomProjector, SketchProjector  # noqa: E402
from .registry import KERNELS, Kernel, get_kernel  # noqa: E402
from .store import FeatureStore, StoreError, StoreMismatchError  # noqa: E402
from .sharding import Shard  # noqa: E402
from .surrogate import KernelSurrogate, fit_from_features, fit_from_kernel  # noqa: E402
from .task import Task  # noqa: E402

__all__ = [
    "KERNELS",
    "Attribution",
    "Checkpoint",
    "CheckpointFeatures",
    "CheckpointRecord",
    "FeatureSpec",
    "FeatureStore",
    "Featurizer",
    "FidelityPipeline",
    "FunctionalForwardError",
    "KendallTau",
    "Kernel",
    "KernelSurrogate",
    "NTKAttributionCallback",
    "NonFiniteGradientError",
    "ProjectionConfig",
    "RandomProjector",
    "Shard",
    "SketchProjector",
    "StoreConfig",
    "StoreError",
    "StoreMismatchError",
    "SubsetConfig",
    "SurrogateConfig",
    "SurrogateFidelity",
    "Task",
    "attribute",
    "embedding_features",
    "exact_kernel",
    "factored_kernel",
    "fit_from_features",
    "fit_from_kernel",
    "get_kernel",
    "gradient_features",
    "kernel_blocks",
    "kernel_from_features",
    "project_features",
]
