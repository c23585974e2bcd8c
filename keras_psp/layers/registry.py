"""The one registry of layer families, looked up by class hierarchy."""

from __future__ import annotations

import dataclasses
import importlib

from keras_psp.layers.base import LayerHandler, MacFunction, Rule


@dataclasses.dataclass(frozen=True)
class LayerFamily:
    """What keras_psp knows about one family of layers.

    Attributes:
        handler: How `PSP` scales its kernels (None: `PSP` cannot wrap it).
        rule: How `slim` cuts channels through it (None: every channel is
            kept, and `slim` names the layer in a warning).
        macs: Its multiply-accumulates per call (None: it counts 0 MACs).
        registered: The class the family was registered for.
    """

    handler: LayerHandler | None = None
    rule: Rule | None = None
    macs: MacFunction | None = None
    registered: type | None = None


_FAMILIES: dict[type, LayerFamily] = {}
_NONE = LayerFamily()
#: Bumped by every registration: caches of what families say compare it.
generation = 0


def register_layer(
    *layer_types: type,
    handler: LayerHandler | None = None,
    rule: Rule | None = None,
    macs: MacFunction | None = None,
) -> None:
    """Tells keras_psp how to wrap, cut and count layers of `layer_types`.

    A registered class also covers its subclasses (the closest registered
    base wins), except that a subclass with its own `call` inherits only the
    MAC count: its math may differ, so `PSP` and `slim` treat it as unknown
    until it is registered itself. Registering a class again replaces its
    family. A layer with weights whose class (or base) is not registered
    counts 0 MACs with a warning; registering it with no argument at all
    declares it known and free (zero MACs, every channel kept, no warning
    from `count_flops`).

    Args:
        *layer_types: Layer classes.
        handler: A `keras_psp.layers.LayerHandler`: where α lives for each
            structure, and the layer's math on given kernels (needed to wrap
            it in `PSP`).
        rule: A `keras_psp.layers.Rule`: `Passthrough()` for layers that map
            channel c to channel c, `Fixed()` to keep every channel without a
            warning, or a `Boundary` subclass for layers that mix channels.
        macs: `fn(layer, input_shape, output_shape) -> int`, the MACs of one
            call for one example; read channel counts from the shapes, so
            that it also counts the layer at the widths `slim` leaves.

    Example:

    ```python
    @keras.saving.register_keras_serializable("my")
    class ChannelScale(keras.layers.Layer):
        def build(self, shape):
            self.scale = self.add_weight(shape=(shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.scale

    keras_psp.register_layer(ChannelScale, rule=keras_psp.layers.Passthrough())
    ```
    """
    if not layer_types:
        raise TypeError("register_layer: name at least one layer class.")
    global generation
    for layer_type in layer_types:
        if not isinstance(layer_type, type):
            raise TypeError(f"register_layer: expected layer classes, got {layer_type!r}.")
    for layer_type in layer_types:
        _FAMILIES[layer_type] = LayerFamily(handler, rule, macs, layer_type)
    generation += 1


#: Families of other packages' layers, by top-level package: loaded the first
#: time a layer of that package is looked up (the package is imported by then).
_EXTENSIONS = {"keras_hub": "keras_psp.layers.hub"}


def _load_extension(cls: type) -> None:
    package = cls.__module__.partition(".")[0]
    module = _EXTENSIONS.pop(package, None)
    if module is not None:
        importlib.import_module(module)


def family(layer) -> LayerFamily:
    """The family of `layer` (an instance or a class): its closest registered
    class, with handler and rule dropped for a subclass that overrides `call`.
    A `LayerFamily` of Nones when nothing is registered."""
    cls = layer if isinstance(layer, type) else type(layer)
    if _EXTENSIONS:
        _load_extension(cls)
    mro = cls.__mro__
    for depth, cls in enumerate(mro):
        found = _FAMILIES.get(cls)
        if found is None:
            continue
        if depth and any("call" in vars(sub) for sub in mro[:depth]):
            return LayerFamily(macs=found.macs, registered=found.registered)
        return found
    return _NONE


def is_registered(layer) -> bool:
    """True if `layer`'s class or one of its bases is registered."""
    return family(layer).registered is not None


def handler_of(layer) -> LayerHandler | None:
    """The α handler of `layer` (an instance or a class), or None."""
    return family(layer).handler


def wrappable_types() -> tuple[type, ...]:
    """The registered classes `PSP` can wrap (and their subclasses that keep
    their `call`)."""
    return tuple(t for t, f in _FAMILIES.items() if f.handler is not None)
