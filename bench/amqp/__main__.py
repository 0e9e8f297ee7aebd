"""``python -m bench.amqp``: see bench.amqp.runner."""

from bench.amqp.runner import main

if __name__ == "__main__":
    main()
