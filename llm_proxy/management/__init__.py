"""The rules for projects and tokens (`service`), the /manage REST API over them
(`api`, `validation`, `openapi`), and the HTTP client the CLI uses (`client`)."""
