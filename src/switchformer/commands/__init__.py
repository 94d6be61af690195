"""One module per subcommand of ``switchformer``, each with ``NAME``, ``HELP``, ``EPILOG`` (its
examples), ``add_arguments(parser)`` and ``run(args) -> int``; :mod:`switchformer.cli` builds the
parser from them. A command parses, calls the library and prints; what it computes lives below."""

from switchformer.commands import (
    compare,
    convert,
    distill,
    eval,  # noqa: A004 (the subcommand's name)
    generate,
    info,
    report,
    serve,
    train,
    translate,
    upcycle,
)

COMMANDS = (train, eval, generate, translate, serve, upcycle, distill, compare, convert, info, report)
