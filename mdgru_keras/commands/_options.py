"""Click parameter types that several commands share. Imports only click at module level, so that
``mdgru-localize --help`` stays quick.

:class:`LandmarkList` is the one parser of every ``--landmarks A,B,...|all`` option (``prepare``, ``train``,
``predict``): comma-separated names, case-sensitive as in the landmark files (``pmj`` is not ``PMJ``), unique,
or ``all`` alone. What ``all`` stands for, and which names are valid, is known only to the command: the
landmarks of the first subject's file (``prepare``), of the dataset (``train``), of the model (``predict``;
the 32 AFIDs for the shipped model). :func:`select_landmarks` resolves a value against such a list and refuses
unknown names in one line that lists the valid ones.

:func:`shipped_model_dir` is what ``predict`` and ``serve`` use when no ``--model`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

ALL = "all"
ALL_LANDMARKS: tuple[str, ...] = (ALL,)  # LandmarkList's value for "--landmarks all"


class LandmarkList(click.ParamType):
    """``--landmarks A,B,...`` or ``--landmarks all`` -> a tuple of unique names, or :data:`ALL_LANDMARKS`."""

    name = "landmarks"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "A,B,...|all"

    def convert(self, value, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        from mdgru_keras.config import landmark_list_problem

        if isinstance(value, (list, tuple)):
            names = tuple(str(name).strip() for name in value)
        else:
            names = tuple(name.strip() for name in str(value).split(","))
        names = tuple(name for name in names if name)
        if not names:
            self.fail("give at least one landmark name, e.g. --landmarks AC,PC, or --landmarks all", param, ctx)
        if ALL in names and len(names) > 1:
            self.fail(f"'{ALL}' stands alone: give '{ALL}' or names, not both", param, ctx)
        if problem := landmark_list_problem(names):
            self.fail(problem, param, ctx)
        return names


LANDMARK_LIST = LandmarkList()


def select_landmarks(requested: Sequence[str], known: Sequence[str], owner: str = "the model") -> tuple[str, ...]:
    """``requested`` (a :class:`LandmarkList` value) as names among ``known``: ``all`` is every known name.

    An unknown name is a usage error (exit status 2) naming it and listing the ``known`` ones, e.g.
    ``Invalid value for '--landmarks': unknown landmark PMJ; the model knows 2: A, B``.
    """
    if tuple(requested) == ALL_LANDMARKS:
        return tuple(known)
    from mdgru_keras.prediction import unknown_landmarks

    if problem := unknown_landmarks(requested, known, owner):
        raise click.BadParameter(problem, param_hint="'--landmarks'")
    return tuple(requested)


def shipped_model_dir() -> Path:
    """The SavedModel shipped with the package (the default ``--model``); a missing or damaged one is a
    :class:`click.ClickException` that says how to give another."""
    from mdgru_keras.errors import InputError
    from mdgru_keras.pretrained import DEFAULT_MODEL, pretrained_model_dir

    try:
        return pretrained_model_dir(DEFAULT_MODEL)
    except InputError as error:
        raise click.ClickException(f"{error} (or give --model EXPORT_DIR)") from None


def load_for_inference(model_dir: Path):
    """The exported model at ``model_dir`` as a :class:`~mdgru_keras.serving.servable.LocalLocalizationClient`,
    in a process that only localizes (predict, bids).

    Grappler's graph optimizations are switched off for the process first: on the shipped model they took about
    4 s of the first scan (load and first scan 12.1 s instead of 16.0 s) and gained nothing after it (2.07 s per
    1 mm head against 2.13 s, the same coordinates; docs/SERVING.md). The setting is process-wide, which is why it
    lives here, in the commands, and not in the library; it is undone when the command ends (a command run
    in-process, as the tests do, leaves the process as it found it).
    """
    import tensorflow as tf

    from mdgru_keras.serving.servable import LocalLocalizationClient

    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    context = click.get_current_context(silent=True)
    if context is not None:
        context.call_on_close(lambda: tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before}))
    return LocalLocalizationClient(model_dir)
