"""tandem: cluster (see ARCHITECTURE.md). Built in a later issue."""
