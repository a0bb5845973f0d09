"""The ``mdgru-localize`` command line: thin wrappers around the library.

Each sub-command lives in its own module under :mod:`mdgru_keras.commands` and is imported only when it is
run (or listed), so that ``mdgru-localize --help`` answers quickly.

Errors have one boundary, :meth:`LazyGroup.invoke`: an expected failure of any command (bad input or config,
a file that cannot be read or written, a model that cannot be loaded, a refusing server, out of memory; see
:func:`mdgru_keras.errors.describe_failure`) ends as one line ``Error: PATH: problem`` on standard error with
exit status 1; click's usage errors keep exit status 2; anything else is a bug and keeps its traceback.
``mdgru-localize --debug COMMAND ...`` (or ``MDGRU_DEBUG=1``) lets expected failures through with their
traceback too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import click

# The exit statuses, shown at the end of `mdgru-localize --help` (docs/ERRORS.md has the same list).
EXIT_STATUSES = """\b
Exit status:
  0  success, also when predict or bids flags landmarks ("warning: SCAN: ..." on standard error)
  1  an expected failure: one line "Error: PATH: problem" on standard error (bad input, config or
     model, a file that cannot be read or written, out of memory); predict, evaluate and bids also
     exit 1 when they skipped scans that failed ("error: SCAN: problem" lines) and wrote the others
     (bids group: when scans have no outputs)
  2  a usage error: a missing or invalid option or argument, e.g. a --landmarks name that the
     model (predict, bids), the dataset (train) or the first landmark file (prepare) lacks
A bug shows its traceback (exit status 1). --debug (or MDGRU_DEBUG=1) shows the traceback of an
expected failure too. Each kind of bad input and what it prints: docs/ERRORS.md.
"""

# The environment variable that turns on --debug.
DEBUG_ENV = "MDGRU_DEBUG"

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
    "bids": "mdgru_keras.commands.bids:bids",
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
        """Run the command; an expected failure becomes one line and exit status 1 (module docstring), unless
        --debug asks for its traceback."""
        from mdgru_keras.errors import describe_failure

        try:
            return super().invoke(ctx)
        except Exception as error:  # click's own exceptions (usage errors, Exit, Abort) are not described
            message = describe_failure(error)
            if message is None or ctx.params.get("debug"):
                raise
            raise click.ClickException(message) from None


def debug_enabled() -> bool:
    """Whether the running command was started with ``mdgru-localize --debug`` (or ``MDGRU_DEBUG=1``)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


@click.group(cls=LazyGroup, epilog=EXIT_STATUSES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mdgru-keras")
@click.option("--debug", is_flag=True, envvar=DEBUG_ENV, show_envvar=True,
              help="Show the full traceback of an expected failure instead of the one line 'Error: PATH: "
                   "problem' (and of each scan predict skips).")
def main(debug: bool) -> None:
    """Find anatomical landmarks in 3D scans with coarse-to-fine MD-GRU networks.

    A typical session: `prepare` a dataset from NIfTI scans and landmark files, `train` the coarse and the
    fine stage, `export` both as one SavedModel, then `predict` on new scans (locally or through TensorFlow
    Serving; `serve` is a development server for that) and `evaluate` against ground truth. `demo-data` and
    `synth` make a labelled demo population; `bids` runs on a whole BIDS dataset as a BIDS App. Run any
    command with --help for its options.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


if __name__ == "__main__":
    main()
