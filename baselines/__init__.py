"""Baseline methods for few-shot concept retrieval, one module per method.

Every public module of this package (a name that does not start with ``_``) is
imported by :func:`discover_baselines`, and every concrete :class:`SetMethod`
subclass defined in it is registered under its ``name``. Adding a baseline
therefore means adding one file; ``docs/adding_a_baseline.md`` walks through it.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import inspect
import logging
import pkgutil
import re
import traceback
from collections.abc import Mapping
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["SetMethod", "discover_baselines", "get_baseline"]

# Baseline names become wildcards and file names in the workflow.
VALID_NAME = re.compile(r"[A-Za-z0-9_-]+")


class SetMethod(abc.ABC):
    """A method that fits a model to one concept set and scores a gallery. It receives descriptors only.

    Subclasses set the class attributes below and implement :meth:`fit` and
    :meth:`score`. Parameters are passed as keyword arguments, merged over
    ``default_params`` and stored in ``self.params``. A subclass validates
    them by overriding :meth:`_check_params`.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"mean_embedding"``, used in the config.
    needs_background : bool
        True if the method needs descriptors of meta-training images (e.g. as
        negatives), which the caller passes to :meth:`set_background` before
        the first :meth:`fit`.
    default_params : Mapping[str, Any]
        Accepted parameters and their default values.
    params : dict[str, Any]
        Parameters of this instance, defaults included.
    """

    name: ClassVar[str]
    needs_background: ClassVar[bool] = False
    default_params: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.default_params))
        if unknown:
            accepted = sorted(self.default_params) or "none"
            raise ValueError(
                f"{type(self).__name__} got unknown parameter(s) {unknown}. "
                f"Accepted parameters: {accepted}."
            )

        self.params: dict[str, Any] = {**self.default_params, **params}
        self._check_params()

    def _check_params(self) -> None:
        """Raise ``ValueError`` if a value in ``self.params`` is invalid.

        The default accepts all values.
        """

    def set_background(self, descriptors: np.ndarray, concepts: np.ndarray) -> None:
        """Store descriptors of meta-training images. The default ignores them.

        Parameters
        ----------
        descriptors : ndarray of shape (N_bg, D)
        concepts : ndarray of shape (N_bg,)
            Concept label of every background descriptor.
        """

    @abc.abstractmethod
    def fit(self, concept_set: np.ndarray) -> SetMethod:
        """Fit the model to one concept set.

        Parameters
        ----------
        concept_set : ndarray of shape (n, D)
            Descriptors of the set, possibly including noise images.

        Returns
        -------
        self : SetMethod
        """

    @abc.abstractmethod
    def score(self, gallery: np.ndarray) -> np.ndarray:
        """Score gallery descriptors. A higher score means more likely the concept.

        Parameters
        ----------
        gallery : ndarray of shape (M, D)

        Returns
        -------
        scores : ndarray of shape (M,)
        """

    def get_params(self) -> dict[str, Any]:
        """Return a copy of the parameters, defaults included."""
        return dict(self.params)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.params.items())
        return f"{type(self).__name__}({arguments})"


def _methods_defined_in(module: ModuleType) -> list[type[SetMethod]]:
    """Return the concrete SetMethod subclasses defined in ``module``.

    An abstract subclass without a ``name`` of its own is a shared base class and is
    skipped. One that sets ``name`` is meant as a baseline, so its missing methods are an
    error rather than a reason to leave it out silently.
    """
    methods = []
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if not issubclass(cls, SetMethod) or cls.__module__ != module.__name__:
            continue

        if inspect.isabstract(cls):
            if "name" in vars(cls):
                missing = ", ".join(sorted(cls.__abstractmethods__))
                raise ValueError(
                    f"Baseline {cls.__qualname__} (name {cls.name!r}) in {inspect.getfile(cls)} does not "
                    f"implement {missing}. Define them with these exact names, as in SetMethod, or remove "
                    "the name attribute if the class is only a base for other baselines."
                )
            continue
        methods.append(cls)
    return methods


def discover_baselines(package: str | ModuleType | None = None) -> dict[str, type[SetMethod]]:
    """Import every public module of a package and collect the SetMethod subclasses defined there.

    Parameters
    ----------
    package : str or module, optional
        Package to scan; defaults to this ``baselines`` package. Modules whose
        name starts with ``_`` are skipped, and classes imported into a module
        from elsewhere are not counted.

    Returns
    -------
    registry : dict[str, type[SetMethod]]
        Method classes keyed by their ``name``, sorted by name.

    Raises
    ------
    ImportError
        If a public module fails to import. The message names its file.
    ValueError
        If a concrete subclass has no string ``name``, or two classes share a name.
    """
    if package is None:
        package = __name__
    if isinstance(package, str):
        package = importlib.import_module(package)

    registry: dict[str, type[SetMethod]] = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        if module_info.name.startswith("_"):
            continue

        module = _import_method_module(f"{package.__name__}.{module_info.name}")
        for cls in _methods_defined_in(module):
            _register(registry, cls)

    logger.debug("Discovered baselines in %s: %s", package.__name__, sorted(registry))
    return dict(sorted(registry.items()))


def _import_method_module(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except Exception as error:
        spec = importlib.util.find_spec(module_name)
        location = spec.origin if spec is not None else module_name
        line = _failing_line(error, location)
        where = location if line is None else f"{location}, line {line},"
        raise ImportError(
            f"Baseline module {where} failed to import: {type(error).__name__}: {error}. "
            f"Every public module of the package is imported to find the baselines, so fix the module, "
            f"install what it needs, or rename it with a leading underscore to leave it out."
        ) from error


def _failing_line(error: Exception, path: str) -> int | None:
    """Return the line of ``path`` where ``error`` was raised or its syntax error lies, or None."""
    if isinstance(error, SyntaxError) and error.filename == path:
        return error.lineno
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == path]
    return frames[-1].lineno if frames else None


def _register(registry: dict[str, type[SetMethod]], cls: type[SetMethod]) -> None:
    qualified_name = f"{cls.__module__}.{cls.__qualname__}"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"{qualified_name} has no valid name (got {name!r}). Set the class "
            f"attribute name to a non-empty string such as 'my_method'."
        )
    if not VALID_NAME.fullmatch(name):
        raise ValueError(
            f"{qualified_name} has the name {name!r}, which contains characters other than letters, "
            "digits, '_' and '-'. The name becomes part of output file names; rename it, for example "
            f"to {re.sub(r'[^A-Za-z0-9_-]', '_', name)!r}."
        )

    if name in registry:
        other = registry[name]
        raise ValueError(
            f"Duplicate baseline name {name!r}: defined by "
            f"{other.__module__}.{other.__qualname__} and {qualified_name}. "
            f"Rename one of them."
        )
    registry[name] = cls


def get_baseline(name: str, **params: Any) -> SetMethod:
    """Instantiate the baseline registered under ``name`` with ``params``.

    Raises
    ------
    ValueError
        If no baseline has that name (the message lists the available names),
        or if a parameter is unknown or invalid.
    """
    registry = discover_baselines()
    if name not in registry:
        raise ValueError(
            f"Unknown baseline {name!r}. Available baselines: {sorted(registry)}."
        )
    return registry[name](**params)
