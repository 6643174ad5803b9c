"""tandem: prefill_worker (see ARCHITECTURE.md). Built in a later issue."""
