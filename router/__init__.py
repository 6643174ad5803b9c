"""tandem: router (see ARCHITECTURE.md). Built in a later issue."""
