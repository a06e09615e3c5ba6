"""lightning-ntk: neural-tangent-kernel surrogates of a network, their fidelity, and data attribution."""

__version__ = "0.1.0"  # before the imports: the callback records it in its store manifests

from .callback import NTKAttributionCallback
from .featurize import FeatureSpec, Featurizer, embedding_features, gradient_features, project_features
from .jacobian import FunctionalForwardError, NonFiniteGradientError, PerExampleGradients, select_parameters
from .kernels import entk_from_features, exact_kernel, factored_kernel, feature_norms, kernel_blocks, kernel_from_features
from .layers import LayerGradients
from .projection import RandomProjector, SketchProjector
from .store import FeatureStore, StoreError, StoreMismatchError
from .task import Task

__all__ = [
    "FeatureSpec",
    "FeatureStore",
    "Featurizer",
    "FunctionalForwardError",
    "LayerGradients",
    "NTKAttributionCallback",
    "NonFiniteGradientError",
    "PerExampleGradients",
    "RandomProjector",
    "SketchProjector",
    "StoreError",
    "StoreMismatchError",
    "Task",
    "embedding_features",
    "entk_from_features",
    "exact_kernel",
    "factored_kernel",
    "feature_norms",
    "gradient_features",
    "kernel_blocks",
    "kernel_from_features",
    "project_features",
    "select_parameters",
]
