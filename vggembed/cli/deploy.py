"""export and serve: the network out of the process (SavedModel, .tflite), or behind HTTP."""

from __future__ import annotations

import os
import re

import click

from ..errors import VGGEmbedError
from .common import CONTEXT, fail, head_option, head_recipe, load_options, recipe_options


# ------------------------------------------------------------------ the network
def _loaded(recipe, setup):
    """(network, the recipe bound to it) for export and serve: the outputs are `embed`'s (`--layer`, `--top`),
    checked against the loaded network as `embed` checks them."""
    from ..engines.local import check_outputs
    from ..net.export import input_shape

    vgg = setup.load(recipe)
    input_shape(vgg, recipe.resize)  # first: --resize none is refused for what it is, whatever the layers
    return vgg, check_outputs(vgg, recipe)


def _with_head(ctx, recipe, head_path):
    """With --head: the head's features and classes (`top_label` carries them; every class unless --top K).
    The vectors asked with --layer stay; without --layer only the classes are answered."""
    if head_path is None:
        return recipe
    if ctx.get_parameter_source("layers") in (click.core.ParameterSource.DEFAULT, None):
        recipe = recipe.replace(outputs=())
    return head_recipe(ctx, recipe, head_path, recipe.top)


# ------------------------------------------------------------------- export
@click.command(context_settings=CONTEXT)
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["saved-model", "tflite"]), required=True,
              help="saved-model: OUT/VERSION/ for TensorFlow Serving and tf.saved_model.load; tflite: one file "
                   "for LiteRT (float32, or --precision int8), with OUT.json beside it.")
@click.option("--version", "model_version", type=click.IntRange(1), default=1, show_default=True,
              help="saved-model: the version folder under OUT (TensorFlow Serving serves the highest).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT/VERSION, or OUT.tflite and OUT.tflite.json.")
@head_option
@recipe_options(vector=True, inputs=True)
@load_options
@click.pass_context
def export(ctx, out, fmt, model_version, overwrite, head_path, recipe, setup):
    """Write the network as a TensorFlow SavedModel or a .tflite file.

    The SavedModel's serving_default signature takes encoded images (decoded,
    resized and mean-subtracted inside); its `pixels` signature takes float
    RGB pixels (N x 224 x 224 x 3, 0..255). Outputs are the layers asked
    (docs/deploy.md).

    \b
    Examples:
      vggembed export models/vgg16 --format saved-model --layer fc2 --top 5
      vggembed export vgg16.tflite --format tflite --layer pool5:avg
      vggembed export models/mine --format saved-model --head head.npz
    """
    from ..net import export as exporting

    recipe = _with_head(ctx, recipe, head_path)
    try:
        if fmt == "saved-model" and recipe.precision == "int8":
            fail("--precision int8 is a .tflite model: use --format tflite")
        if fmt == "tflite" and recipe.precision not in ("float32", "int8"):
            fail("--format tflite is float32 or int8")
        # The place first: a destination that cannot be written is one line before the slow build.
        with exporting.held(fmt, out, model_version, overwrite):
            vgg, bound = _loaded(recipe, setup)
            if fmt == "saved-model":
                where = exporting.saved_model(vgg, bound, out, model_version, overwrite)
            else:
                side = exporting.tflite(vgg, bound, out, overwrite)
        if fmt == "saved-model":
            click.echo(f"vggembed: wrote {where} (signatures serving_default: images, pixels: pixels; outputs "
                       f"{', '.join(bound.names)})", err=True)
        else:
            click.echo(f"vggembed: wrote {out} and {out}.json ({recipe.precision}; input pixels "
                       f"{side['input']['shape']}; outputs {', '.join(side['outputs'])})", err=True)
    except VGGEmbedError as e:
        fail(str(e))


# -------------------------------------------------------------------- serve
@click.command(context_settings=CONTEXT)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; other than loopback needs --token (or --insecure).")
@click.option("--port", type=click.IntRange(0, 65535), default=8501, show_default=True)
@click.option("--name", default="vggembed", show_default=True, help="The model's NAME in /v1/models/NAME.")
@click.option("--token", envvar="VGGEMBED_TOKEN",
              help="Require 'Authorization: Bearer TOKEN' on every request (or $VGGEMBED_TOKEN).")
@click.option("--insecure", is_flag=True, help="Allow another address than loopback without --token.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Most images per model batch.")
@click.option("--fixed-batch", is_flag=True,
              help="Pad every batch to --batch-size: a row then never depends on what shared its batch (equal to "
                   "embed --batch-size B's bit for bit), but one image alone costs a whole batch.")
@click.option("--max-wait", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Milliseconds a batch waits for more requests to fill it.")
@click.option("--queue-size", type=click.IntRange(1), default=None, show_default="4 x --batch-size",
              help="Images admitted and not yet running; beyond it requests get 503 with Retry-After.")
@click.option("--max-body", type=click.IntRange(1), default=64 << 20, show_default=True,
              help="Largest request body in bytes (413 above).")
@click.option("--read-timeout", type=click.FloatRange(0.001), default=30.0, show_default=True,
              help="Seconds a client has to send its body (408 after); a connection that sends no whole "
                   "request head in that time, or idles that long, is closed.")
@click.option("--workers", type=click.IntRange(1), default=min(8, os.cpu_count() or 2),
              show_default="CPU count, at most 8", help="Decoding threads.")
@click.option("--max-pixels", type=click.IntRange(1), default=None,
              help="Refuse larger images (default Pillow's 89.5 million), as embed does.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None,
              help="Also serve TensorFlow Serving's gRPC API (PredictionService, ModelService) on this port "
                   "(TF Serving's is 8500); off by default. Needs pip install \"vggembed[grpc]\".")
@click.option("--max-connections", type=click.IntRange(1), default=1024, show_default=True,
              help="Open connections per API; beyond it a new one is refused at once (REST: 503).")
@click.option("--max-connection-age", type=click.FloatRange(0.001), default=None,
              help="gRPC: seconds after which a connection is asked to go away (clients reconnect, so a load "
                   "balancer can spread them); off by default.")
@click.option("--version-label", "version_labels", multiple=True, metavar="LABEL",
              help="A label naming the served version (model_spec.version_label, /labels/LABEL); repeatable.")
@head_option
@recipe_options(vector=True, inputs=True)
@load_options
@click.pass_context
def serve(ctx, host, port, name, token, insecure, batch_size, fixed_batch, max_wait, queue_size, max_body,
          read_timeout, workers, max_pixels, grpc_port, max_connections, max_connection_age, version_labels,
          head_path, recipe, setup):
    """Serve the network with TensorFlow Serving's REST API (and its gRPC API).

    POST /v1/models/NAME:predict with {"instances": [{"b64": "..."}]} answers
    {"predictions": [...]}; :classify answers labels (--top); GET
    /v1/models/NAME is the status, /v1/models/NAME/metadata the signatures;
    POST /embed takes one raw image; GET /metrics is Prometheus text. With
    --grpc-port, PredictionService.Predict/GetModelMetadata and
    ModelService.GetModelStatus for tensorflow-serving-api clients; both APIs
    share one batching queue. SIGTERM answers the requests in flight, then
    exits 0 (docs/deploy.md).

    \b
    Examples:
      vggembed serve --layer fc2 --top 5
      vggembed serve --layer fc2 --grpc-port 8500
      vggembed serve --head head.npz      # your own classes (top_label, :classify)
      curl -s localhost:8501/embed --data-binary @cat.jpg
    """
    from ..engines import serve as serving
    from ..engines import serve_rest
    from ..images.decode import DEFAULT_MAX_PIXELS

    recipe = _with_head(ctx, recipe, head_path)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise click.BadParameter("letters, digits, '_', '.' and '-' only (it is part of the URL)",
                                 param_hint="--name")
    if not serving.is_loopback(host) and not token and not insecure:
        raise click.UsageError(f"--host {host} is reachable from other machines: give --token (or set "
                               "$VGGEMBED_TOKEN), or --insecure to serve without one")
    for label in version_labels:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
            raise click.BadParameter("letters, digits, '_', '.' and '-' only (it is part of the URL)",
                                     param_hint="--version-label")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        fail('vggembed serve needs aiohttp: pip install "vggembed[serve]"')
    if grpc_port is not None:
        # gRPC's own C++ log (a failed bind is also our one-line error) only when asked, as TensorFlow's.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if setup.verbose else "NONE")
        try:
            import grpc  # noqa: F401
            import google.protobuf  # noqa: F401
        except ImportError:
            fail('vggembed serve --grpc-port needs grpcio: pip install "vggembed[grpc]"')
    config = serving.Config(host=host, port=port, name=name, batch_size=batch_size, fixed_batch=fixed_batch,
                            max_wait=max_wait / 1000,
                            queue_size=queue_size or 4 * batch_size, max_body=max_body, read_timeout=read_timeout,
                            workers=workers, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, token=token or None,
                            grpc_port=grpc_port, max_connections=max_connections,
                            max_connection_age=max_connection_age, version_labels=tuple(version_labels))
    try:
        vgg, bound = _loaded(recipe, setup)
        server = serving.Server(vgg, bound, config)
        server.warm_up()
        def ready(addresses):
            def shown(address):
                return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"

            click.echo(f"vggembed: serving {name} on http://{shown(addresses['rest'])} (outputs "
                       f"{', '.join(server.names)}; {recipe.precision}, batches of {batch_size}, waiting at most "
                       f"{max_wait:g} ms)", err=True)
            if "grpc" in addresses:
                click.echo(f"vggembed: gRPC (tensorflow.serving.PredictionService, ModelService) on "
                           f"{shown(addresses['grpc'])}", err=True)

        protocols = [serve_rest.start]
        if grpc_port is not None:
            from ..engines import serve_grpc

            protocols.append(serve_grpc.start)
        how = serving.run(server, protocols, ready)
    except OSError as e:
        fail(f"cannot listen on {host} (port {port}{'' if grpc_port is None else f', gRPC {grpc_port}'}): "
             f"{e.strerror or e}")
    except VGGEmbedError as e:
        fail(str(e))
    click.echo(f"vggembed: stopped by {how}; every request in flight was answered", err=True)
