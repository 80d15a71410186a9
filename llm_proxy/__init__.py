"""llm-proxy: a transparent, minimum-latency gateway for the OpenAI API."""

__version__ = "0.1.0"
