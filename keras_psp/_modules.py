"""Modules that are also the function they are named after."""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable


def callable_module(name: str, function: Callable) -> None:
    """Makes module `name` callable as `function`.

    `keras_psp.export` and `keras_psp.verify` are both a function of the
    public API and the module that holds it with its companions, so that
    `keras_psp.export(model, path)` runs an export while
    `keras_psp.export.VerificationError` and `import keras_psp.export` still
    reach the module (a function of the same name would shadow it).

    Args:
        name: The module's `__name__`.
        function: What calling the module calls; its signature and docstring
            are the module's `__signature__` and `__call__.__doc__`.
    """

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    CallableModule.__call__.__doc__ = function.__doc__
    module = sys.modules[name]
    module.__class__ = CallableModule
    module.__signature__ = inspect.signature(function)
