"""The OpenAI-compatible HTTP API (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``), served by each gRPC frontend beside gRPC (``http_server``) over the same
validation, tokenizer and router feed. Not named ``openai``: that is the client's package."""
