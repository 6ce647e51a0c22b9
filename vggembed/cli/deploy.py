"""export and serve: the network out of the process (SavedModel, .tflite), or behind HTTP."""

from __future__ import annotations

import os
import re

import click

from ..errors import VGGEmbedError
from .common import CONTEXT, POOLS, fail, load_options, recipe_options


# ------------------------------------------------------------------ outputs
def parse_outputs(layers: tuple[str, ...], top: int | None):
    """`--layer NAME[:POOL]` (repeatable, or a comma list) and `--top K` -> ([Output], top).

    The one place these options are read, so it can give way to `embed`'s own
    parser of the same options. An output is named after its layer, with the
    pool after an underscore (`pool5:avg` -> `pool5_avg`). Without --layer and
    --top: fc2, as `embed`.
    """
    from ..net.outputs import Output

    items = [s.strip() for value in layers for s in value.split(",") if s.strip()]
    if not items and not top:
        items = ["fc2"]
    outputs = []
    for item in items:
        layer, _, pool = item.partition(":")
        if pool and pool not in POOLS:
            raise click.BadParameter(f"{item!r}: the pool after ':' must be one of {', '.join(POOLS)}",
                                     param_hint="--layer")
        outputs.append(Output(f"{layer}_{pool}" if pool else layer, layer, pool or None))
    return outputs, top


def output_options(f):
    f = click.option("--top", type=click.IntRange(1), default=None,
                     help="Also return the top K classes: top_indices, top_probabilities, top_labels.")(f)
    f = click.option("--layer", "layers", multiple=True,
                     help="NAME or NAME:POOL (avg, max, flatten), repeatable or comma-separated; each becomes "
                          "an output named NAME or NAME_POOL. Default: fc2 (none with --top alone).")(f)
    return f


def _loaded(recipe, setup, layers, top):
    """(network, bound outputs, top, the recorded recipe) for export and serve."""
    from ..net.outputs import bind, input_shape

    outputs, top = parse_outputs(layers, top)
    vgg = setup.load(recipe)
    outputs = bind(vgg, outputs)
    input_shape(vgg, recipe.resize)
    bound = recipe.bind(vgg.spec, outputs[0].layer if outputs else "prob")
    doc = bound.to_dict()
    doc.update(layer=[o.layer for o in outputs], pool=[o.pool for o in outputs],
               outputs=[{"name": o.name, "layer": o.layer, "pool": o.pool} for o in outputs], top=top)
    return vgg, outputs, top, bound, doc


# ------------------------------------------------------------------- export
@click.command(context_settings=CONTEXT)
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["saved-model", "tflite"]), required=True,
              help="saved-model: OUT/VERSION/ for TensorFlow Serving and tf.saved_model.load; tflite: one file "
                   "for LiteRT (float32, or --precision int8), with OUT.json beside it.")
@click.option("--version", "model_version", type=click.IntRange(1), default=1, show_default=True,
              help="saved-model: the version folder under OUT (TensorFlow Serving serves the highest).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT/VERSION or OUT.tflite.")
@output_options
@recipe_options(inputs=True)
@load_options
def export(out, fmt, model_version, overwrite, layers, top, recipe, setup):
    """Write the network as a TensorFlow SavedModel or a .tflite file.

    The SavedModel's serving_default signature takes encoded images (decoded,
    resized and mean-subtracted inside); its `pixels` signature takes float
    RGB pixels (N x 224 x 224 x 3, 0..255). Outputs are the layers asked
    (docs/deploy.md).

    \b
    Examples:
      vggembed export models/vgg16 --format saved-model --layer fc2 --top 5
      vggembed export vgg16.tflite --format tflite --layer pool5:avg
    """
    from ..net import export as exporting
    from ..net.outputs import names

    try:
        if fmt == "saved-model" and recipe.precision == "int8":
            fail("--precision int8 is a .tflite model: use --format tflite")
        if fmt == "tflite" and recipe.precision not in ("float32", "int8"):
            fail("--format tflite is float32 or int8")
        vgg, outputs, top, _, doc = _loaded(recipe, setup, layers, top)
        doc["format"] = fmt
        if fmt == "saved-model":
            where = exporting.saved_model(vgg, outputs, top, doc, out, model_version, overwrite)
            click.echo(f"vggembed: wrote {where} (signatures serving_default: images, pixels: pixels; outputs "
                       f"{', '.join(names(outputs, top))})", err=True)
        else:
            side = exporting.tflite(vgg, outputs, top, doc, out, overwrite)
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
              help="Seconds a client has to send its body (408 after).")
@click.option("--workers", type=click.IntRange(1), default=min(8, os.cpu_count() or 2),
              show_default="CPU count, at most 8", help="Decoding threads.")
@click.option("--max-pixels", type=click.IntRange(1), default=None,
              help="Refuse larger images (default Pillow's 89.5 million), as embed does.")
@output_options
@recipe_options(inputs=True)
@load_options
def serve(host, port, name, token, insecure, batch_size, fixed_batch, max_wait, queue_size, max_body, read_timeout, workers,
          max_pixels, layers, top, recipe, setup):
    """Serve the network over HTTP with TensorFlow Serving's REST predict API.

    POST /v1/models/NAME:predict with {"instances": [{"b64": "..."}]} answers
    {"predictions": [...]}; GET /v1/models/NAME is the status; POST /embed
    takes one raw image; GET /metrics is Prometheus text. SIGTERM answers the
    requests in flight, then exits 0 (docs/deploy.md).

    \b
    Examples:
      vggembed serve --layer fc2 --top 5
      curl -s localhost:8501/embed --data-binary @cat.jpg
    """
    from ..engines import serve as serving
    from ..images.decode import DEFAULT_MAX_PIXELS

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise click.BadParameter("letters, digits, '_', '.' and '-' only (it is part of the URL)",
                                 param_hint="--name")
    if not serving.is_loopback(host) and not token and not insecure:
        raise click.UsageError(f"--host {host} is reachable from other machines: give --token (or set "
                               "$VGGEMBED_TOKEN), or --insecure to serve without one")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        fail('vggembed serve needs aiohttp: pip install "vggembed[serve]"')
    config = serving.Config(host=host, port=port, name=name, batch_size=batch_size, fixed_batch=fixed_batch,
                            max_wait=max_wait / 1000,
                            queue_size=queue_size or 4 * batch_size, max_body=max_body, read_timeout=read_timeout,
                            workers=workers, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, token=token or None)
    try:
        vgg, outputs, top, bound, _ = _loaded(recipe, setup, layers, top)
        server = serving.Server(vgg, outputs, top, bound, config)
        server.warm_up()
        def ready(address):
            shown = f"[{address[0]}]" if ":" in address[0] else address[0]
            click.echo(f"vggembed: serving {name} on http://{shown}:{address[1]} (outputs {', '.join(server.names)}; "
                       f"{recipe.precision}, batches of {batch_size}, waiting at most {max_wait:g} ms)", err=True)

        how = serving.run(server, ready)
    except OSError as e:
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    except VGGEmbedError as e:
        fail(str(e))
    click.echo(f"vggembed: stopped by {how}; every request in flight was answered", err=True)
