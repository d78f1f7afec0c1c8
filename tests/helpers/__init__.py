"""Test helpers: conditional marks (`RunIf`) and callbacks that report what a run did."""
