"""tandem: proto (see ARCHITECTURE.md). Built in a later issue."""
