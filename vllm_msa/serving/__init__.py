"""MSA serving: engine options, front-end admission, the selection channel and HTTP routes."""
