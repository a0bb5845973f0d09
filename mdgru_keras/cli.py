"""The ``mdgru-localize`` command line: thin wrappers around the library.

Each sub-command lives in its own module under :mod:`mdgru_keras.commands` and is imported only when it is
run (or listed), so that ``mdgru-localize --help`` answers quickly.

Errors have one boundary, :meth:`LazyGroup.invoke`: an expected failure of any command (bad input or config,
a file that cannot be read or written, a model that cannot be loaded, a refusing server, out of memory; see
:func:`mdgru_keras.errors.describe_failure`) ends as one line ``Error: PATH: problem`` on standard error with
exit status 1; click's usage errors keep exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import click

# command name -> "module:function"; each module defines one click command.
COMMANDS: dict[str, str] = {
    "demo-data": "mdgru_keras.commands.demo_data:demo_data",
    "synth": "mdgru_keras.commands.synth:synth",
    "prepare": "mdgru_keras.commands.prepare:prepare",
    "train": "mdgru_keras.commands.train:train",
    "export": "mdgru_keras.commands.export:export",
    "predict": "mdgru_keras.commands.predict:predict",
    "serve": "mdgru_keras.commands.serve:serve",
    "evaluate": "mdgru_keras.commands.evaluate:evaluate",
    "train-unet": "mdgru_keras.commands.train_unet:train_unet",
}


def _available(target: str) -> bool:
    return importlib.util.find_spec(target.split(":")[0]) is not None


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, target in COMMANDS.items() if _available(target)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None or not _available(target):
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def invoke(self, ctx: click.Context):
        """Run the command; an expected failure becomes one line and exit status 1 (module docstring)."""
        from mdgru_keras.errors import describe_failure

        try:
            return super().invoke(ctx)
        except Exception as error:  # click's own exceptions (usage errors, Exit, Abort) are not described
            message = describe_failure(error)
            if message is None:
                raise
            raise click.ClickException(message) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mdgru-keras")
def main() -> None:
    """Find anatomical landmarks in 3D scans with coarse-to-fine MD-GRU networks.

    A typical session: `prepare` a dataset from NIfTI scans and landmark files, `train` the coarse and the
    fine stage, `export` both as one SavedModel, then `predict` on new scans (locally or through TensorFlow
    Serving; `serve` is a development server for that) and `evaluate` against ground truth. `demo-data` and
    `synth` make a labelled demo population. Run any command with --help for its options.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


if __name__ == "__main__":
    main()
