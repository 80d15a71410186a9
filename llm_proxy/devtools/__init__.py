"""Tools for people and tests: the benchmark, its report, the fake OpenAI upstream.

Never imported by the product at run time (an import-linter contract keeps it so);
`llm-proxy bench` and `llm-proxy fake-upstream` import them lazily.
"""
