"""The demo page: `generation` does one request (no web framework), `app` is the Gradio page around it."""
