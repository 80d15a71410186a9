"""`python -m llm_proxy` runs the `llm-proxy` command line."""

from llm_proxy.cli import main

main()
