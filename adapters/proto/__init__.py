"""The shadow's wire schema (`shadow_events.proto`) and the Python module protoc generates from it."""
