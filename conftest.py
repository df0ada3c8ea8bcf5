"""Root pytest configuration: what the doctest collection must not import."""

# Importing a package's __main__ would run the demo during collection.
collect_ignore_glob = ["norm_optax/demo/__main__.py", "norm_optax/*/__main__.py"]
