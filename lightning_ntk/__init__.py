"""lightning-ntk: neural-tangent-kernel surrogates of a network, their fidelity, and data attribution."""

from .attribution import Attribution, attribute
from .callback import NTKAttributionCallback
from .config import ProjectionConfig, StoreConfig, SubsetConfig, SurrogateConfig
from .featurize import FeatureSpec, Featurizer, embedding_features, gradient_features, project_features
from .errors import LabelError, LogitsError, LogitsShapeError, LogitsTypeError
from .jacobian import FunctionalForwardError, NonFiniteGradientError
from .kernels import exact_kernel, factored_kernel, kernel_blocks, kernel_from_features
from .metrics import KendallTau, SurrogateFidelity
from .pipeline import Checkpoint, CheckpointFeatures, CheckpointRecord, FidelityPipeline
from .projection import RandomProjector, SketchProjector
from .registry import KERNELS, Kernel, get_kernel
from .sharding import Shard
from .store import FeatureStore, StoreError, StoreMismatchError
from .surrogate import KernelSurrogate, fit_from_features, fit_from_kernel
from .task import Task
from .version import __version__

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
    "LabelError",
    "LogitsError",
    "LogitsShapeError",
    "LogitsTypeError",
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
