"""`python -m llm_proxy` runs the `llm-proxy` command line."""

from llm_proxy.cli import main

if __name__ == "__main__":  # not when a spawned worker process re-imports it
    main()
