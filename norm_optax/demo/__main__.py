"""Entry point of ``python -m norm_optax.demo``."""

from norm_optax.demo import main

if __name__ == "__main__":
    main()
