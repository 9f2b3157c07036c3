"""Recipes: the YAML configs of ``configs/`` as Python objects, with explicit overrides on top.

A recipe is what ``weakseg fit --config configs/<regime>.yaml`` trains — the module class and its keyword
arguments, the callbacks, the data module's arguments — read without LightningCLI, so that the benchmarks and
``weakseg demo`` build their runs from the same files. A data config (``configs/data/<name>.yaml``) describes a
real data set's folder layout; ``weakseg fit --config configs/noisy.yaml --config configs/data/kvasir.yaml`` lays
its ``data:`` section over the regime's.

Overrides are a dict of sections: ``"model"`` (keyword arguments of the module, set one by one), ``"class_path"``
(another module class), ``"data"`` (arguments of ``WeakSegDataModule``, set one by one), ``"callbacks"`` (class
name → its arguments, replacing the config's or added; ``None`` removes it) and ``"trainer"``. A value is set as
given, ``None`` included (a nested dict such as ``weakify`` or ``loss_weights`` is replaced, not merged).

>>> r = load_recipe("noisy", {"model": {"forget_rate": 0.5}, "callbacks": {"SegmentationImageLogger": None}})
>>> r.model_class.__name__, r.model["forget_rate"], r.data["train_labels"], r.callback_names
('CoTeachingSegModule', 0.5, ['noisy_mask'], ('ForgetRateSchedule',))
"""
from __future__ import annotations

import copy
import importlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

__all__ = ["Recipe", "CONFIG_DIR", "config_path", "load_recipe", "load_data_config", "import_object",
           "OVERRIDE_SECTIONS"]

#: Where named configs live: ``$WEAKSEG_CONFIG_DIR``, else the ``configs/`` folder of the source checkout.
CONFIG_DIR = Path(os.environ.get("WEAKSEG_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))
OVERRIDE_SECTIONS = ("model", "class_path", "data", "callbacks", "trainer")


def import_object(path: str):
    """``"pkg.mod.Name"`` or ``"pkg.mod:Name"`` → the object."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ValueError(f"expected a class path 'package.module.Name' or 'package.module:Name', got {path!r}")
    return getattr(importlib.import_module(module), name)


def config_path(config: str | os.PathLike, folder: str | None = None) -> Path:
    """A config file: ``config`` itself when it names an existing file, else ``CONFIG_DIR/[folder/]<config>.yaml``."""
    p = Path(config)
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml"
    found = CONFIG_DIR / folder / name if folder else CONFIG_DIR / name
    if not found.is_file():
        raise FileNotFoundError(f"no config {config!r}: neither a file nor {found} (configs are read from the "
                                "source checkout's configs/ folder, or from $WEAKSEG_CONFIG_DIR)")
    return found


def _read(path: Path) -> dict:
    import yaml

    content = yaml.safe_load(path.read_text()) or {}
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a mapping with model/data/trainer sections, got {type(content).__name__}")
    return content


@dataclass(frozen=True)
class Recipe:
    """One training recipe: ``model_class(**model)`` on ``WeakSegDataModule(**data)`` with ``callbacks``."""

    path: Path
    class_path: str
    model: dict
    data: dict
    callbacks: tuple[tuple[str, dict], ...]
    trainer: dict
    seed: int | None = None

    @property
    def model_class(self) -> type:
        return import_object(self.class_path)

    @property
    def callback_names(self) -> tuple[str, ...]:
        return tuple(_short(c) for c, _ in self.callbacks)

    @property
    def train_labels(self) -> tuple[str, ...]:
        return tuple(self.data.get("train_labels") or ("mask",))

    def build_model(self, **kwargs):
        """The module, with ``kwargs`` (e.g. ``num_classes`` and ``in_channels`` from the data) over the recipe's."""
        return self.model_class(**{**copy.deepcopy(self.model), **kwargs})

    def build_callbacks(self, skip: tuple[str, ...] = ()) -> list:
        """Fresh callback objects, leaving out those whose class name is in ``skip``."""
        return [import_object(c)(**copy.deepcopy(kw)) for c, kw in self.callbacks if _short(c) not in skip]

    def build_datamodule(self, **kwargs):
        from .data import WeakSegDataModule

        return WeakSegDataModule(**{**copy.deepcopy(self.data), **kwargs})

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> Recipe:
        """This recipe with ``overrides`` applied (see the module docstring)."""
        if not overrides:
            return self
        unknown = sorted(set(overrides) - set(OVERRIDE_SECTIONS))
        if unknown:
            raise ValueError(f"recipe overrides: unknown sections {unknown}; expected some of {OVERRIDE_SECTIONS}")
        callbacks = dict(self.callbacks_by_name())
        for name, args in (overrides.get("callbacks") or {}).items():
            key = _short(name)
            if args is None:
                callbacks.pop(key, None)
            else:
                path = callbacks[key][0] if key in callbacks and "." not in name else \
                    (name if "." in name else f"lightning_weakseg.callbacks.{name}")
                callbacks[key] = (path, dict(args))
        return replace(self, class_path=overrides.get("class_path", self.class_path),
                       model={**self.model, **copy.deepcopy(dict(overrides.get("model") or {}))},
                       data={**self.data, **copy.deepcopy(dict(overrides.get("data") or {}))},
                       callbacks=tuple(callbacks.values()),
                       trainer={**self.trainer, **copy.deepcopy(dict(overrides.get("trainer") or {}))})

    def callbacks_by_name(self) -> dict[str, tuple[str, dict]]:
        return {_short(c): (c, kw) for c, kw in self.callbacks}


def _short(class_path: str) -> str:
    return class_path.replace(":", ".").rsplit(".", 1)[-1]


def load_recipe(config: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """The recipe of a LightningCLI config (a name in :data:`CONFIG_DIR`, e.g. ``"noisy"``, or a path), with
    ``overrides`` applied."""
    path = config_path(config)
    cfg = _read(path)
    model = cfg.get("model") or {}
    if isinstance(model, str):
        model = {"class_path": model}
    class_path = model.get("class_path", "lightning_weakseg.WeakSegModule")
    trainer = dict(cfg.get("trainer") or {})
    callbacks = []
    for cb in trainer.pop("callbacks", None) or []:
        cb = {"class_path": cb} if isinstance(cb, str) else cb
        callbacks.append((cb["class_path"], dict(cb.get("init_args") or {})))
    recipe = Recipe(path=path, class_path=class_path, model=dict(model.get("init_args") or {}),
                    data=dict(cfg.get("data") or {}), callbacks=tuple(callbacks), trainer=trainer,
                    seed=cfg.get("seed_everything"))
    return recipe.with_overrides(overrides)


def load_data_config(name: str | os.PathLike) -> dict:
    """The ``data:`` section of a data config (``configs/data/<name>.yaml``, or a path): a real data set's folder
    layout, classes and channels."""
    path = config_path(name, folder="data")
    data = _read(path).get("data")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a 'data:' section")
    return dict(data)
