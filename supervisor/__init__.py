"""The supervisor: config, VM set-up, process lifecycle and the event loop."""
