"""One module per `tokengraft` subcommand: ``register(subparsers, name)`` and ``run(args)``."""
