"""``mdgru-localize serve``: the in-process development server (TF Serving's gRPC and REST APIs, loopback)."""

from __future__ import annotations

from pathlib import Path

import click

from mdgru_keras.commands._options import shipped_model_dir

DEFAULT_GRPC_PORT = 8500  # TensorFlow Serving's defaults
DEFAULT_REST_PORT = 8501


@click.command("serve")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Exported model: BASE/NAME (the newest numbered version is served) or one version folder BASE/NAME/V. "
    "Default: the model shipped with the package, all 32 AFIDs (docs/MODEL_CARD.md).",
)
@click.option("--model-name", default="mdgru", show_default=True, help="The name clients ask for.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Loopback address to listen on (127.0.0.1, ::1 or localhost; other addresses are refused).",
)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_GRPC_PORT,
    show_default=True,
    help="gRPC port (TF Serving's PredictionService and ModelService); 0: no gRPC.",
)
@click.option(
    "--rest-port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_REST_PORT,
    show_default=True,
    help="REST port (/v1/models/NAME, :predict, /metadata); 0: no REST.",
)
def serve(model_dir: Path | None, model_name: str, host: str, grpc_port: int, rest_port: int) -> None:
    """Serve an exported model with TensorFlow Serving's gRPC and REST APIs: a DEVELOPMENT server.

    It runs in this Python process, listens on loopback only, has no authentication, and serves one model
    version (no reloading, batching or monitoring). It is for trying the clients and `predict --server`
    on a machine without Docker, and for tests. In production run the official TensorFlow Serving image
    (tensorflow/serving) on the export: the docker command is in serving/README.md of the source repository.

    Once the model is loaded it prints one line, "serving 'NAME' version V from DIR: gRPC on HOST:PORT, REST
    on http://HOST:PORT", and serves until Ctrl-C or SIGTERM.

    Examples:

    \b
      mdgru-localize serve                                   # the shipped model, gRPC 8500 and REST 8501
      mdgru-localize serve --model export/mdgru --rest-port 0
      mdgru-localize predict scan.nii.gz --server 127.0.0.1:8500
    """
    if not grpc_port and not rest_port:
        raise click.UsageError("--grpc-port 0 and --rest-port 0: nothing to serve; give at least one port")
    from mdgru_keras.serving.server_common import check_loopback

    try:
        check_loopback(host)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--host") from None
    if model_dir is None:
        model_dir = shipped_model_dir()

    import signal
    import threading

    from mdgru_keras.serving.grpc_server import GrpcServer
    from mdgru_keras.serving.rest_server import RestServer
    from mdgru_keras.serving.servable import Servable

    servable = Servable(model_dir, model_name)
    servers: list[GrpcServer | RestServer] = []
    try:
        addresses = []
        if grpc_port:
            servers.append(GrpcServer(servable=servable, host=host, port=grpc_port).start())
            addresses.append(f"gRPC on {servers[-1].address}")
        if rest_port:
            servers.append(RestServer(servable=servable, host=host, port=rest_port).start())
            addresses.append(f"REST on {servers[-1].url}")
        click.echo(
            f"serving {model_name!r} version {servable.version} from {servable.version_dir}: {', '.join(addresses)}"
        )
        click.echo("development server, loopback only (production: TensorFlow Serving, serving/README.md); "
                   "stop with Ctrl-C", err=True)
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        try:
            stopped.wait()
        except KeyboardInterrupt:
            pass
    finally:
        for server in reversed(servers):
            server.stop()
