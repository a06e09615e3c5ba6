"""lightning-ntk: neural-tangent-kernel surrogates of a network, their fidelity, and data attribution."""

__version__ = "0.1.0"  # before the imports: the callback records it in its store manifests

from .attribution import Attribution, attribute
from .callback import NTKAttributionCallback
from .featurize import FeatureSpec, Featurizer, embedding_features, gradient_features, project_features
from .jacobian import FunctionalForwardError, NonFiniteGradientError, PerExampleGradients, select_parameters
from .kernels import entk_from_features, exact_kernel, factored_kernel, feature_norms, kernel_blocks, kernel_from_features
from .layers import LayerGradients
from .metrics import KendallTau, SurrogateFidelity
from .projection import RandomProjector, SketchProjector
from .store import FeatureStore, StoreError, StoreMismatchError
from .surrogate import KernelSurrogate, fit_from_features, fit_from_kernel
from .task import Task

__all__ = [
    "Attribution",
    "FeatureSpec",
    "FeatureStore",
    "Featurizer",
    "FunctionalForwardError",
    "KendallTau",
    "KernelSurrogate",
    "LayerGradients",
    "NTKAttributionCallback",
    "NonFiniteGradientError",
    "PerExampleGradients",
    "RandomProjector",
    "SketchProjector",
    "StoreError",
    "StoreMismatchError",
    "SurrogateFidelity",
    "Task",
    "attribute",
    "embedding_features",
    "entk_from_features",
    "exact_kernel",
    "factored_kernel",
    "feature_norms",
    "fit_from_features",
    "fit_from_kernel",
    "gradient_features",
    "kernel_blocks",
    "kernel_from_features",
    "project_features",
    "select_parameters",
]
