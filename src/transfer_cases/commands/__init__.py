"""The console commands: each parses its config and hands the work to the library."""
